"""``seap prune`` as a plan of one job chain: every unit of a mixture-of-experts model, the
cache it shares with the plan, and the one rule for reconstruction's default."""

import json

import pytest
import torch

from seap.cli import main
from seap.maths.mask_formats import load_mask
from seap.model.checkpoint import PRUNED_MASK_DIR, load_pruned
from tests.helpers import SENTENCES, make_tiny_moe


@pytest.fixture(scope="module")
def moe_files(tmp_path_factory):
    """A tiny Qwen3-MoE and a tiny Mixtral checkpoint, and a calibration file of two tasks."""
    root = tmp_path_factory.mktemp("moe")
    for arch in ("qwen3_moe", "mixtral"):
        tiny = make_tiny_moe(arch, layers=3)
        tiny.model.save_pretrained(root / arch)
        tiny.tokenizer.save_pretrained(root / arch)
    calib = root / "calib.jsonl"
    lines = [{"task": "facts" if i % 2 else "chat", "text": s} for i, s in enumerate(SENTENCES)]
    calib.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return root, calib


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("unit", [None, "both"], ids=["default-experts", "both"])
def test_prune_prunes_a_mixture_of_experts_model(moe_files, tmp_path, arch, unit, capsys) -> None:
    root, calib = moe_files
    out = tmp_path / "pruned"
    args = ["--no-progress", "prune", "--model", str(root / arch), "--calib", str(calib), "--sparsity", "0.5",
            "--out", str(out), "--workdir", str(tmp_path / "work"), "--json", "--schedule", "uniform",
            *(["--unit", unit] if unit else [])]
    assert main(args) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["pruned_params"] < summary["dense_params"]
    pruned = load_pruned(out)
    meta = pruned.model.config.seap_pruning
    assert meta["unit"] == (unit or "experts") and meta["task"] == "general"
    assert load_mask(out / "seap_mask").meta["method"] == "seap-general"
    # experts: half of every layer's 8 routed experts are gone from the saved checkpoint; both: fewer
    # experts are dropped and the kept ones lose channels (32 -> 24), for about the same sparsity
    kept, channels = (4, 32) if unit is None else (6, 24)
    experts = [m for name, m in pruned.model.named_modules() if name.endswith("mlp.experts")]
    assert experts and all(_shape(e) == (kept, channels) for e in experts)
    ids = pruned.tokenizer(["the city"], return_tensors="pt")
    with torch.no_grad():
        generated = pruned.model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 3


def _shape(experts: torch.nn.Module) -> tuple[int, int]:
    """(routed experts, channels per expert) of an MoE block's fused expert tensors."""
    down = dict(experts.named_parameters())["down_proj"]  # [experts, hidden, channels]
    return down.shape[0], down.shape[2]


def test_a_second_prune_reuses_the_statistics_and_refuses_bad_options_before_any_work(moe_files, tmp_path,
                                                                                      capsys) -> None:
    root, calib = moe_files
    work = tmp_path / "work"
    common = ["--no-progress", "prune", "--model", str(root / "qwen3_moe"), "--calib", str(calib), "--task", "facts",
              "--workdir", str(work), "--json", "--schedule", "uniform"]
    assert main([*common, "--sparsity", "0.25", "--out", str(tmp_path / "a")]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["reused"] == []
    assert main([*common, "--sparsity", "0.5", "--out", str(tmp_path / "b")]) == 0
    second = json.loads(capsys.readouterr().out)
    assert {"corpus", "statistics/tasks"} <= set(second["reused"])  # only the mask and the checkpoint are new
    assert not any(k.startswith(("masks", "checkpoint")) for k in second["reused"])
    # a dense-only method on an MoE model is refused by name, before a model is loaded
    assert main([*common, "--sparsity", "0.5", "--method", "wanda-sp", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "wanda-sp cannot prune" in err and "fix:" in err and not (tmp_path / "c").exists()


@pytest.mark.parametrize("unit", ["experts", "both"])
def test_stage_by_stage_equals_one_shot_on_a_mixture_of_experts_model(moe_files, tmp_path, unit) -> None:
    """``seap stats`` / ``masks --stats`` / ``apply`` build the same expert mask as ``seap prune``:
    both go through the one mask-building function."""
    root, calib = moe_files
    model, d = str(root / "mixtral"), tmp_path
    assert main(["--no-progress", "corpus", "--records", str(calib), "--out", str(d / "corpus.jsonl")]) == 0
    assert main(["--no-progress", "stats", "--model", model, "--corpus", str(d / "corpus.jsonl"), "--unit", unit,
                 "--out", str(d / "stats")]) == 0
    assert main(["masks", "--stats", str(d / "stats" / "chat"), str(d / "stats" / "facts"), "--general", "--unit",
                 unit, "--schedule", "uniform", "--sparsity", "0.5", "--out", str(d / "mask")]) == 0
    assert main(["apply", "--model", model, "--mask", str(d / "mask"), "--out", str(d / "staged")]) == 0
    assert main(["--no-progress", "prune", "--model", model, "--calib", str(calib), "--unit", unit, "--schedule",
                 "uniform", "--sparsity", "0.5", "--workdir", str(d / "work"), "--out", str(d / "oneshot")]) == 0
    a, b = load_pruned(d / "staged"), load_pruned(d / "oneshot")
    assert load_mask(d / "mask").digest() == load_mask(d / "oneshot" / "seap_mask").digest()
    ids = a.tokenizer(SENTENCES[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(a.model(**ids).logits, b.model(**ids).logits, rtol=0, atol=0)


def _kill_when(process, condition, timeout: float = 300.0) -> bool:
    """Freeze and kill -9 ``process`` as soon as ``condition()`` holds; False if it ended first."""
    import os
    import signal
    import time

    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if condition():
            os.kill(process.pid, signal.SIGSTOP)  # (frozen at once, then killed: no clean-up runs)
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.005)
    return False


@pytest.mark.slow
def test_prune_killed_mid_walk_resumes_after_the_last_finished_layer_with_identical_results(tmp_path) -> None:
    """``seap prune`` killed with SIGKILL part-way through the statistics walk, then the same
    command again: it resumes after the last finished layer (the walk's progress record) and
    writes the same pruned checkpoint as an uninterrupted run."""
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers import make_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(make_tokenizer()), hidden_size=128, intermediate_size=512,
                         num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    base = tmp_path / "base"
    LlamaForCausalLM(config).save_pretrained(base)
    make_tokenizer().save_pretrained(base)
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": " ".join(SENTENCES[i % len(SENTENCES):] + SENTENCES)})
                               for i in range(80)) + "\n")

    def prune(workdir, out):
        return [sys.executable, "-m", "seap", "--no-progress", "prune", "--model", str(base), "--calib", str(calib),
                "--sparsity", "0.3", "--samples", "80", "--out", str(out), "--workdir", str(workdir)]

    subprocess.run(prune(tmp_path / "plain", tmp_path / "plain-out"), check=True, capture_output=True)
    work = tmp_path / "killed"

    def records():
        return [json.loads(p.read_text()) for p in work.glob("statistics/.*.partial/layers/progress.json")]

    process = subprocess.Popen(prune(work, tmp_path / "resumed-out"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    assert _kill_when(process, lambda: any(r.get("done", 0) >= 3 for r in records())), \
        "the run finished before it could be killed"
    done = max(r["done"] for r in records())
    assert 3 <= done < 8 and not (tmp_path / "resumed-out").exists()
    again = subprocess.run(prune(work, tmp_path / "resumed-out"), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert not list(work.glob("*/.*.partial")), "the finished job's progress is removed"
    plain, resumed = load_pruned(tmp_path / "plain-out"), load_pruned(tmp_path / "resumed-out")
    assert resumed.fingerprint == plain.fingerprint
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    assert torch.equal(resumed.model(ids).logits, plain.model(ids).logits)


def test_prune_with_an_accuracy_budget_keeps_the_expert_the_search_chooses(tmp_path, capsys) -> None:
    """``seap prune --max-drop``: one task's expert sized by the same search as ``seap eval``
    (the selection items held out of its train split), and that expert is the checkpoint."""
    from seap.maths.budget import allowed_drop, chosen_sparsity
    from tests.helpers_flows import tiny_project

    base, data = tiny_project(tmp_path)
    out, work = tmp_path / "pruned", tmp_path / "work"
    args = ["--no-progress", "prune", "--model", str(base), "--task", "geo", "--data-dir", str(data), "--max-drop", "5",
            "--budget-grid", "0.15", "0.3", "0.6", "--selection-items", "6", "--schedule", "uniform",
            "--out", str(out), "--workdir", str(work)]
    assert main([*args, "--sparsity", "0.3"]) == 2  # (the budget chooses the sparsity: refused before any work)
    assert "both given" in capsys.readouterr().err and not work.exists()
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    choice = next(work.glob("budget/budget-*/budget.json"))
    record = json.loads(choice.read_text())["tasks"]["geo"]
    curve = {float(s): a for s, a in record["curve"].items()}
    assert record["chosen"] == chosen_sparsity(curve, record["dense"], allowed_drop(record["dense"], 5.0))
    mask = load_mask(out / PRUNED_MASK_DIR)
    assert mask.meta["accuracy_budget"]["chosen_sparsity"] == record["chosen"]
    assert f"chosen {record['chosen'] * 100:g}%" in printed and "held-out train items" in printed
    assert load_pruned(out).fingerprint
    # a bisection instead of the grid: the same choice rule on the points it measured
    bisected = tmp_path / "bisected"
    assert main([*args[:-4], "--out", str(bisected), "--workdir", str(work), "--budget-search", "bisect",
                 "--budget-step", "0.15"]) == 0, capsys.readouterr().err
    searched = json.loads(next(work.glob("search/search-*/search.json")).read_text())
    curve = {float(s): a for s, a in searched["curves"]["geo"].items()}
    assert searched["rounds"] and set(curve) <= {0.15, 0.3, 0.45, 0.6}
    sized_by = load_mask(bisected / PRUNED_MASK_DIR).meta["accuracy_budget"]
    dense = sized_by["selection_dense"]
    assert sized_by["chosen_sparsity"] == chosen_sparsity(curve, dense, allowed_drop(dense, 5.0))

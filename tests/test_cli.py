import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from seap.cli import main
from seap.maths.masks import PruningMask
from seap.model.checkpoint import load_pruned
from tests.helpers import SENTENCES, make_tiny_model


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """seap prune caches in ./runs/work: every test here runs in its own folder, not the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def model_dir(tmp_path):
    tiny = make_tiny_model("llama-gqa")
    tiny.model.save_pretrained(tmp_path / "base")
    tiny.tokenizer.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.jsonl"
    lines = [{"task": "facts" if i % 2 else "chat", "text": s} for i, s in enumerate(SENTENCES)]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_help_lists_stages() -> None:
    out = subprocess.run([sys.executable, "-m", "seap", "--help"], capture_output=True, text=True, check=True).stdout
    for stage in ("corpus", "stats", "merge-stats", "scores", "masks", "apply", "prune"):
        assert stage in out


def test_one_shot_prune(model_dir, calib, tmp_path, capsys) -> None:
    out = tmp_path / "pruned"
    code = main(["--no-progress", "prune", "--model", str(model_dir), "--calib", str(calib), "--sparsity", "0.4",
                 "--protect-first", "1", "--protect-last", "1", "--out", str(out), "--device", "cpu"])
    text = capsys.readouterr().out
    assert code == 0
    assert "target sparsity:   0.4000" in text and "realised sparsity:" in text
    pruned = load_pruned(out)
    assert pruned.model.config.seap_pruning["task"] == "general"
    assert pruned.model.config.seap_pruning["reconstruction"]["alpha"] == 0.01  # refitted by default
    ids = pruned.tokenizer(["the city"], return_tensors="pt")
    assert pruned.model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=0).shape[1] == 5


@pytest.mark.parametrize("tasks", [["facts"], []], ids=["expert", "general"])
@pytest.mark.parametrize("method", ["wanda-sp", "flap"])
@pytest.mark.parametrize("refit", [[], ["--no-reconstruct"]], ids=["default", "no-reconstruct"])
def test_baseline_methods(model_dir, calib, tmp_path, method, tasks, refit, capsys) -> None:
    out = tmp_path / method
    task_args = [a for t in tasks for a in ("--task", t)]
    assert main(["--no-progress", "prune", "--model", str(model_dir), "--calib", str(calib), *task_args, *refit,
                 "--method", method, "--sparsity", "0.3", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    mask = PruningMask.load(out / "seap_mask")
    assert mask.meta["score"] == {"wanda-sp": "wanda-sp", "flap": "flap"}[method]
    assert mask.meta["schedule"] == {"wanda-sp": "uniform", "flap": "flap-adaptive"}[method]
    # reconstruction is the default and replaces FLAP's bias compensation; without it, FLAP keeps its own
    assert mask.is_reconstructed == (not refit)
    assert mask.has_bias_compensation == (method == "flap" and bool(refit))
    assert summary["tasks"] == (tasks or ["chat", "facts"])


def test_stage_by_stage_equals_one_shot(model_dir, calib, tmp_path, capsys) -> None:
    d = tmp_path
    assert main(["--no-progress", "corpus", "--records", str(calib), "--out", str(d / "corpus.jsonl")]) == 0
    assert main(["--no-progress", "stats", "--model", str(model_dir), "--corpus", str(d / "corpus.jsonl"),
                 "--out", str(d / "stats")]) == 0
    for task in ("facts", "chat"):
        assert main(["scores", "--stats", str(d / "stats" / task), "--out", str(d / "scores" / task)]) == 0
    assert main(["masks", "--scores", str(d / "scores" / "facts"), str(d / "scores" / "chat"), "--general",
                 "--sparsity", "0.4", "--protect-first", "1", "--protect-last", "1", "--out", str(d / "mask")]) == 0
    assert main(["apply", "--model", str(model_dir), "--mask", str(d / "mask"), "--out", str(d / "staged")]) == 0
    assert main(["--no-progress", "prune", "--model", str(model_dir), "--calib", str(calib), "--sparsity", "0.4",
                 "--protect-first", "1", "--protect-last", "1", "--no-reconstruct", "--out", str(d / "oneshot")]) == 0
    a, b = load_pruned(d / "staged"), load_pruned(d / "oneshot")
    ids = a.tokenizer(SENTENCES[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(a.model(**ids).logits, b.model(**ids).logits)


def test_sharded_stats_cli(model_dir, calib, tmp_path) -> None:
    d = tmp_path
    main(["--no-progress", "corpus", "--records", str(calib), "--task", "facts", "--out", str(d / "c.jsonl")])
    for i in range(2):
        assert main(["--no-progress", "stats", "--model", str(model_dir), "--corpus", str(d / "c.jsonl"),
                     "--shard", f"{i}/2", "--out", str(d / f"shard{i}")]) == 0
    assert main(["merge-stats", str(d / "shard0" / "facts"), str(d / "shard1" / "facts"), "--out", str(d / "merged")]) == 0
    from seap.maths.statistics import ActivationStatistics

    assert ActivationStatistics.load(d / "merged").meta["num_texts"] == 6


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.5"], "outside [0, 1)"),
    (["--sparsity", "0.3", "--score", "bogus"], "invalid choice"),
    (["--sparsity", "0.3", "--schedule", "bogus"], "invalid choice"),
])
def test_bad_cli_input(model_dir, calib, tmp_path, capsys, args, message) -> None:
    out = tmp_path / "never"
    try:
        code = main(["prune", "--model", str(model_dir), "--calib", str(calib), "--out", str(out), *args])
    except SystemExit as exc:  # argparse rejects unknown choices itself
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_foreign_mask_and_empty_calib(model_dir, calib, tmp_path, capsys) -> None:
    other = make_tiny_model("llama-gqa", seed=9)
    other.model.save_pretrained(tmp_path / "other")
    other.tokenizer.save_pretrained(tmp_path / "other")
    main(["--no-progress", "prune", "--model", str(model_dir), "--calib", str(calib), "--sparsity", "0.3",
          "--protect-first", "1", "--protect-last", "1", "--out", str(tmp_path / "p")])
    capsys.readouterr()
    code = main(["apply", "--model", str(tmp_path / "other"), "--mask", str(tmp_path / "p" / "seap_mask"),
                 "--out", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert code == 2 and "was built for base model" in err and not (tmp_path / "never").exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code = main(["prune", "--model", str(model_dir), "--calib", str(empty), "--sparsity", "0.3", "--out", str(tmp_path / "n2")])
    assert code == 2 and "holds no records" in capsys.readouterr().err


@pytest.mark.parametrize("sequential", [False, True])
def test_reconstructed_stage_by_stage_equals_one_shot(model_dir, calib, tmp_path, capsys, sequential) -> None:
    d = tmp_path
    refit = ["--reconstruct", "--refit-alpha", "0.05", *(["--refit-sequential"] if sequential else [])]
    source = ["--refit-corpus", str(d / "corpus.jsonl")]  # one-shot or sequential: the text, streamed
    schedule = ["--sparsity", "0.4", "--protect-first", "1", "--protect-last", "1"]
    assert main(["--no-progress", "corpus", "--records", str(calib), "--out", str(d / "corpus.jsonl")]) == 0
    assert main(["--no-progress", "stats", "--model", str(model_dir), "--corpus", str(d / "corpus.jsonl"),
                 "--out", str(d / "stats")]) == 0
    for task in ("facts", "chat"):
        assert main(["scores", "--stats", str(d / "stats" / task), "--out", str(d / "scores" / task)]) == 0
    scores = [str(d / "scores" / "facts"), str(d / "scores" / "chat")]
    assert main(["masks", "--scores", *scores, "--general", *schedule, *refit, "--model", str(model_dir),
                 *source, "--batch-size", "3", "--out", str(d / "mask")]) == 0
    assert "(reconstructed)" in capsys.readouterr().out
    mask = PruningMask.load(d / "mask")
    assert mask.is_reconstructed and mask.meta["reconstruction"]["alpha"] == 0.05
    assert mask.meta["reconstruction"]["sequential"] is sequential
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    assert mask.meta["reconstruction"]["tokens"] == sum(len(tokenizer(s)["input_ids"]) for s in SENTENCES)  # all tasks
    assert main(["apply", "--model", str(model_dir), "--mask", str(d / "mask"), "--out", str(d / "staged")]) == 0
    assert main(["--no-progress", "prune", "--model", str(model_dir), "--calib", str(calib), *schedule, *refit,
                 "--out", str(d / "oneshot")]) == 0
    a, b = load_pruned(d / "staged"), load_pruned(d / "oneshot")
    assert b.model.config.seap_pruning["reconstruction"]["alpha"] == 0.05
    ids = a.tokenizer(SENTENCES[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(a.model(**ids).logits, b.model(**ids).logits, rtol=1e-4, atol=1e-4)


def test_reconstruction_needs_the_base_and_its_text_and_excludes_bias_compensation(model_dir, calib, tmp_path,
                                                                                  capsys) -> None:
    d = tmp_path
    assert main(["--no-progress", "corpus", "--records", str(calib), "--out", str(d / "corpus.jsonl")]) == 0
    assert main(["--no-progress", "stats", "--model", str(model_dir), "--corpus", str(d / "corpus.jsonl"),
                 "--task", "facts", "--out", str(d / "stats")]) == 0
    assert sorted(p.name for p in (d / "stats" / "facts").iterdir()) == ["stats.json", "stats.safetensors"]
    assert main(["scores", "--stats", str(d / "stats" / "facts"), "--out", str(d / "scores")]) == 0
    capsys.readouterr()
    base = ["masks", "--scores", str(d / "scores"), "--sparsity", "0.3", "--out", str(d / "mask")]
    assert main([*base, "--reconstruct"]) == 2
    assert "--reconstruct runs the calibration text through the base model" in capsys.readouterr().err
    assert main([*base, "--reconstruct", "--model", str(model_dir)]) == 2
    assert "--refit-corpus" in capsys.readouterr().err and not (d / "mask").exists()
    assert main([*base, "--model", str(model_dir), "--refit-corpus", str(d / "corpus.jsonl"),
                 "--refit-task", "nope"]) == 2
    assert "nope" in capsys.readouterr().err and not (d / "mask").exists()
    for option, removed in (("--refit-stats", [*base, "--model", str(model_dir), "--refit-stats", str(d / "stats")]),
                            ("--second-moments", ["stats", "--model", str(model_dir), "--corpus",
                                                  str(d / "corpus.jsonl"), "--second-moments", "--out", str(d / "s2")])):
        with pytest.raises(SystemExit) as exit_:  # the options of second moments are gone
            main(removed)
        assert exit_.value.code == 2 and f"unrecognized arguments: {option}" in capsys.readouterr().err
    # an expert mask refitted on its own task's text
    assert main([*base, "--model", str(model_dir), "--refit-corpus", str(d / "corpus.jsonl"),
                 "--refit-task", "facts"]) == 0
    assert PruningMask.load(d / "mask").meta["reconstruction"]["statistics_task"] == "facts"
    assert main(["--no-progress", "prune", "--model", str(model_dir), "--calib", str(calib), "--method", "flap",
                 "--sparsity", "0.3", "--reconstruct", "--bias-compensation", "--out", str(d / "p")]) == 2
    assert "reconstruction replaces bias compensation" in capsys.readouterr().err and not (d / "p").exists()

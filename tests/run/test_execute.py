"""The plan run in one process (``seap eval``): every row on a tiny model, content-addressed
caching and resume, the routed row's reuse of the expert row, and checks before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from seap.cli import main
from seap.errors import SeapError
from seap.run.config import RunConfig
from seap.run.execute import execute
from seap.run.methods import NEURON_METHODS
from seap.run.plan import make_plan
from tests.helpers_flows import tiny_project
from tests.helpers_tasks import direct_mc_accuracy


def tiny_config(root: Path, **changes) -> RunConfig:
    base, data = (root / "base", root / "data") if (root / "base").exists() else tiny_project(root)
    values = dict(model=str(base), tasks=["geo", "life"], data_dir=str(data), sparsities=[0.3], limit=6, samples=20,
                  schedule="uniform", bench_repeats=1, workdir=str(root / "work"), out=str(root / "out"),
                  registry_dir=str(root / "registry"), mlflow=False)
    values.update(changes)
    return RunConfig(**values).validate()


@pytest.fixture(scope="module")
def every_method(tmp_path_factory):
    """One run of the plan with every method of the table."""
    root = tmp_path_factory.mktemp("every-method")
    config = tiny_config(root, methods=list(NEURON_METHODS))
    return root, config, execute(make_plan(config))


def test_every_method_of_the_table_is_a_row(every_method) -> None:
    root, config, done = every_method
    results = json.loads((done.path("report") / "results.json").read_text())
    rows = {(r["method"], r["sparsity"]) for r in results["rows"]}
    assert rows == {("dense", 0.0)} | {(m, 0.3) for m in NEURON_METHODS}
    for row in results["rows"]:  # the table's average is the mean of the tasks' acc (the default metric)
        assert set(row["tasks"]) == {"geo", "life"}
        assert row["average"]["table"] == pytest.approx(sum(t["acc"] for t in row["tasks"].values()) / 2)
        assert all(t["chance"] == pytest.approx(1 / 3) for t in row["tasks"].values())  # three choices an item
    # the dense row and each task's expert give the accuracy of a direct computation on the same 6 items
    import torch

    from seap.maths.masks import PruningMask
    from seap.model.loading import load_model
    from seap.model.masking import apply_mask

    base = load_model(config.model.model, device="cpu")
    by_method = {r["method"]: r for r in results["rows"]}
    for task in ("geo", "life"):
        eval_file = Path(config.data.data_dir) / task / "validation.jsonl"
        assert {m: by_method["dense"]["tasks"][task][m] for m in ("acc", "acc_norm")} == \
            pytest.approx(direct_mc_accuracy(base, eval_file, limit=6))
        expert = apply_mask(base, PruningMask.load(done.path(f"refits/seap-expert@0.3/{task}")), "hard")
        assert by_method["seap-expert"]["tasks"][task]["acc"] == pytest.approx(
            direct_mc_accuracy(expert, eval_file, limit=6)["acc"])
    routed = next(r for r in results["rows"] if r["method"] == "seap-routed")
    assert routed["routing"]["docs"] == 12 and 0 <= routed["router_overhead"] < 1
    assert results["router"]["heldout_accuracy"] >= 0.8
    assert {"dense", "seap-general@0.3:general", "flap@0.3:general"} <= set(results["speed"]["models"])
    assert (done.path("report") / "accuracy_vs_sparsity.png").read_bytes()[:4] == b"\x89PNG"
    # experts calibrated per task, baselines on the pooled statistics; every mask refitted (the default),
    # which replaces FLAP's bias compensation
    from seap.maths.masks import PruningMask

    flap = PruningMask.load(done.path("refits/flap@0.3/general"))
    assert flap.is_reconstructed and not flap.has_bias_compensation
    plain = PruningMask.load(done.path("masks/flap@0.3/general"))  # built plain, refitted in the walk
    assert not plain.is_reconstructed and not plain.has_bias_compensation
    assert all(torch.equal(a.channels, b.channels) and torch.equal(a.heads, b.heads)
               for a, b in zip(plain.layers, flap.layers, strict=True))
    expert = PruningMask.load(done.path("refits/seap-expert@0.3/geo"))
    assert expert.is_reconstructed and not expert.has_bias_compensation and expert.task == "geo"


def test_a_second_run_reuses_every_output_and_a_changed_option_reruns_only_what_depends_on_it(every_method) -> None:
    root, config, first = every_method
    again = execute(make_plan(config))
    always = {"model", "register"}
    assert again.cached == {k for k in again.outputs if k not in always}
    assert {k: v["path"] for k, v in again.outputs.items() if k not in always} == \
        {k: v["path"] for k, v in first.outputs.items() if k not in always}
    changed = execute(make_plan(config.replace(limit=5)))
    rerun = {k.split("/")[0] for k in changed.outputs if k not in changed.cached} - always
    assert rerun == {"evaluate-dense", "evaluate", "evaluate-routed", "report"}


def test_an_interrupted_run_resumes_from_its_finished_jobs(tmp_path, monkeypatch) -> None:
    import seap.run.stages as stages

    config = tiny_config(tmp_path, methods=["seap-expert", "wanda-sp"], bench=False)
    real = stages.STAGE_FUNCTIONS["evaluate"]

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setitem(stages.STAGE_FUNCTIONS, "evaluate", crash)
    with pytest.raises(KeyboardInterrupt):
        execute(make_plan(config))
    assert not list((tmp_path / "work").glob("evaluate/*")) and not list((tmp_path / "work").rglob(".*.tmp-*"))
    monkeypatch.setitem(stages.STAGE_FUNCTIONS, "evaluate", real)
    done = execute(make_plan(config))
    assert {"corpus", "statistics/tasks", "masks/seap-expert@0.3/geo", "evaluate-dense/dense"} <= done.cached
    assert "evaluate/seap-expert@0.3" not in done.cached


def test_routed_row_reuse_equals_evaluating_every_document(every_method) -> None:
    """Documents routed to their own expert are answered from the expert row: the routed row is
    the same as evaluating every document through the routed model."""
    from seap.data.catalogue import TaskCatalogue
    from seap.evaluation.router import Router
    from seap.evaluation.rows import evaluate_routed
    from seap.maths.masks import PruningMask
    from seap.model.loading import load_model

    root, config, done = every_method
    catalogue = TaskCatalogue(config.data.data_dir, root / "task-files")
    specs = catalogue.resolve(config.data.tasks)
    base = load_model(config.model.model)
    experts = {t: PruningMask.load(done.path(f"refits/seap-expert@0.3/{t}")) for t in ("geo", "life")}
    general = PruningMask.load(done.path("refits/seap-general@0.3/general"))  # (the refitted masks evaluated)
    router = Router.load(done.path("router"))
    items = json.loads((done.path("evaluate/seap-expert@0.3") / "items.json").read_text())
    reused, _ = evaluate_routed(base, catalogue, specs, 0.3, experts, general, router, limit=6, expert_items=items)
    full, _ = evaluate_routed(base, catalogue, specs, 0.3, experts, general, router, limit=6)
    assert reused["reused_documents"] > 0 and full["reused_documents"] == 0
    for task in ("geo", "life"):
        for metric in ("acc", "acc_norm"):
            assert reused["tasks"][task][metric] == pytest.approx(full["tasks"][task][metric], abs=1e-12)
    assert reused["routing"] == full["routing"]


@pytest.mark.parametrize("change, message", [
    ({"sparsities": [1.2]}, "parameter sparsities: must be at most"),
    ({"sparsities": [0.0]}, "dense model"),
    ({"methods": ["magic"]}, "parameter methods: unknown value 'magic'"),
    ({"metric": "f1"}, "parameter metric: unknown value"),
    ({"limit": 0}, "parameter limit: must be at least 1"),
    ({"tasks": ["nosuchtask"], "methods": ["seap-expert"]}, "parameter tasks:"),
    ({"tasks": ["hub:wikitext"], "methods": ["seap-expert"]}, "not multiple-choice"),
    ({"perplexity": True}, "parameter perplexity: WikiText-2"),
])
def test_invalid_configs_fail_before_any_work(tmp_path, change, message) -> None:
    with pytest.raises(SeapError, match=message):
        RunConfig(model="never-loaded/model", workdir=str(tmp_path / "w"), **change).validate()
    assert not (tmp_path / "w").exists()


def test_eval_cli_prints_the_table_and_names_the_log(tmp_path, capsys) -> None:
    base, data = tiny_project(tmp_path, "qwen2")
    code = main(["eval", "--model", str(base), "--tasks", "geo", "life", "--data-dir", str(data),
                 "--sparsities", "0.2", "--methods", "seap-expert", "wanda-sp", "--limit", "5", "--samples", "15",
                 "--schedule", "uniform", "--no-bench", "--no-mlflow", "--workdir", str(tmp_path / "work"),
                 "--out", str(tmp_path / "out"), "--registry-dir", str(tmp_path / "registry")])
    out = capsys.readouterr().out
    assert code == 0 and "| 20% | seap-expert |" in out and "results.md" in out
    log = next((tmp_path / "logs").glob("eval-*.log"))
    assert f"log: {log}" in out
    assert "Running loglikelihood requests" not in out and "Running loglikelihood requests" in log.read_text()
    assert (tmp_path / "out" / "accuracy_vs_sparsity.png").is_file()


def test_eval_cli_bad_option_is_one_clear_line(tmp_path, capsys) -> None:
    assert main(["eval", "--model", "x", "--sparsities", "1.5", "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "parameter --sparsities: must be at most 0.99" in err and "Traceback" not in err


def test_reconstruction_runs_through_the_plan_and_every_mask_is_refitted_on_its_own_text(tmp_path) -> None:
    from seap.maths.masks import PruningMask
    from seap.registry.records import read_local_registry

    config = tiny_config(tmp_path, methods=["seap-expert", "seap-general", "seap-routed", "flap"], reconstruct=True,
                         refit_bias=True, bench=False)
    plan = make_plan(config)
    done = execute(plan)
    assert [j.key for j in plan.of_stage("refits") if j.params.member is None] == ["refits/walk"]  # one walk
    refitted_on = {}
    for job in plan.of_stage("masks"):  # every mask built plain, then refitted under refits/
        assert not PruningMask.load(done.path(job.key)).is_reconstructed
        mask = PruningMask.load(done.path(f"refits/{job.name}"))
        assert mask.is_reconstructed and not mask.has_bias_compensation and mask.meta["method"] == job.params.method
        assert mask.meta["reconstruction"]["bias"] is True
        refitted_on[f"refits/{job.name}"] = mask.meta["reconstruction"]["statistics_task"]
    # an expert on its own task's text; the pooled masks on every task's text, streamed through the base
    assert refitted_on == {"refits/seap-expert@0.3/geo": "geo", "refits/seap-expert@0.3/life": "life",
                           "refits/seap-general@0.3/general": "geo+life", "refits/flap@0.3/general": "geo+life"}
    assert {k for group in plan.mask_groups().values() for k in group.values()} == set(refitted_on)
    assert "statistics/pooled" in [j.key for j in plan.jobs]  # (FLAP's scores, not the refit)
    results = json.loads((done.path("report") / "results.json").read_text())
    assert {r["method"] for r in results["rows"]} == {"dense", "seap-expert", "seap-general", "seap-routed", "flap"}
    assert results["config"]["reconstruct"] is True
    records = read_local_registry(config.registry)
    assert records and all(PruningMask.load(p).is_reconstructed for r in records for p in r.masks.values())


def test_the_per_task_control_evaluates_a_baseline_refitted_on_each_task(tmp_path) -> None:
    import torch

    from seap.maths.masks import PruningMask

    config = tiny_config(tmp_path, methods=["seap-expert", "wanda-sp+logistic"], reconstruct=True,
                         refit_corpus="per-task", bench=False)
    plan = make_plan(config)
    done = execute(plan)
    masks = {j.key: PruningMask.load(done.path(j.key)) for j in plan.of_stage("refits")
             if j.params.member is not None and j.params.member.startswith("wanda-sp+logistic@")}
    assert {m.meta["reconstruction"]["statistics_task"] for m in masks.values()} == {"geo", "life"}
    geo, life = (masks[f"refits/wanda-sp+logistic@0.3/{t}"] for t in ("geo", "life"))
    assert all(torch.equal(a.channels, b.channels) for a, b in zip(geo.layers, life.layers))  # one mask ...
    assert geo.digest() != life.digest()  # ... refitted twice, each on its own task's text, in the one walk
    assert [m.meta["reconstruction"]["statistics_task"] for m in (geo, life)] == ["geo", "life"]
    assert plan.get("refits/walk").params.tasks == {"seap-expert@0.3/geo": "geo", "seap-expert@0.3/life": "life",
                                                        "wanda-sp+logistic@0.3/geo": "geo",
                                                        "wanda-sp+logistic@0.3/life": "life"}
    results = json.loads((done.path("report") / "results.json").read_text())
    row = next(r for r in results["rows"] if r["method"] == "wanda-sp+logistic")
    assert set(row["tasks"]) == {"geo", "life"}


def test_generic_text_is_merged_into_every_refit_corpus(tmp_path) -> None:
    from seap.data.corpus import read_corpus
    from seap.maths.masks import PruningMask
    from seap.maths.statistics import ActivationStatistics
    from seap.run.stages import CORPUS_FILE

    config = tiny_config(tmp_path, tasks=["geo"], methods=["seap-expert", "wanda-sp"], reconstruct=True,
                         refit_generic=["life"], refit_generic_samples=10, bench=False)
    plan = make_plan(config)
    assert "statistics/generic" not in [j.key for j in plan.jobs]  # generic text is a corpus, never statistics
    done = execute(plan)
    generic, header = read_corpus(done.path("corpus/generic") / CORPUS_FILE)
    assert list(generic) == ["life"] and len(generic["life"].texts) == 10
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "base"))
    cap = header.get("max_tokens")
    generic_tokens = sum(min(len(tokenizer(t)["input_ids"]), cap or 10**9) for t in generic["life"].texts)
    own = ActivationStatistics.load(done.path("statistics/tasks") / "geo")
    expert = PruningMask.load(done.path("refits/seap-expert@0.3/geo"))
    refit = expert.meta["reconstruction"]
    assert refit["statistics_task"] == "geo+life" and refit["tokens"] == own.num_tokens + generic_tokens
    pooled = PruningMask.load(done.path("refits/wanda-sp@0.3/general")).meta["reconstruction"]
    assert pooled["statistics_task"] == "geo+life" and pooled["tokens"] == refit["tokens"]  # (one task: the same text)
    with pytest.raises(SeapError, match="refit_generic: geo is also a task of the run"):
        tiny_config(tmp_path, tasks=["geo"], methods=["seap-expert"], refit_generic=["geo"])


@pytest.mark.slow  # families end to end through `seap eval`
@pytest.mark.parametrize("arch", ["qwen3", "gemma2", "gemma3-text", "gemma3", "phi3", "olmo2", "olmo3", "smollm3",
                                  "granite"])
def test_the_pipeline_runs_on_every_newer_family(tmp_path, capsys, arch) -> None:
    """`seap eval` walks the one plan the flow and `dvc repro` walk (tests/run/test_dvc.py shows
    the three give the same rows): statistics with second moments, refitted experts, general mask
    and a baseline, routing, evaluation, the speed benchmark of the pruned shapes, registry."""
    from seap.model.checkpoint import load_pruned
    from seap.registry.records import read_local_registry

    base, data = tiny_project(tmp_path, arch)
    code = main(["--no-progress", "eval", "--model", str(base), "--tasks", "geo", "life", "--data-dir", str(data),
                 "--sparsities", "0.3", "--methods", "seap-expert", "seap-general", "seap-routed", "flap",
                 "--limit", "4", "--samples", "20", "--schedule", "uniform", "--gqa-mode", "query-heads",
                 "--bench-repeats", "1", "--no-mlflow",
                 "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
                 "--registry-dir", str(tmp_path / "registry")])
    out = capsys.readouterr().out
    assert code == 0 and "| 30% | seap-expert |" in out and "| 30% | seap-routed |" in out, out[-2000:]
    speed = json.loads((tmp_path / "out" / "results.json").read_text())["speed"]["models"]
    assert len(speed) > 1 and all(entry["params"] < speed["dense"]["params"] and entry["prefill_tokens_per_s"] > 0
                                  for name, entry in speed.items() if name != "dense")
    records = read_local_registry(str(tmp_path / "registry"))
    assert {r.kind for r in records} >= {"expert", "routed"}
    assert main(["--no-progress", "apply", "--model", str(base), "--mask", str(next(iter(records[0].masks.values()))),
                 "--out", str(tmp_path / "pruned")]) == 0
    pruned = load_pruned(tmp_path / "pruned", device="cpu")
    ids = pruned.tokenizer(["the city"], return_tensors="pt")
    assert pruned.model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=0).shape[1] >= 3


@pytest.mark.slow  # families end to end through `seap eval`
@pytest.mark.parametrize("arch,schedule", [("qwen2_moe", ["--schedule", "uniform"]),
                                           ("mixtral", ["--protect-first", "0", "--protect-last", "0"])])
def test_the_pipeline_prunes_experts_of_an_moe_model(tmp_path, capsys, arch, schedule) -> None:
    """`--unit` left at auto on an MoE model: router statistics, SEAP expert masks (TCESS), the
    general mask, the task-agnostic baseline, routed rows over expert masks, the memory of each
    pruned shape, the registry; and a neuron-only method is refused before any work."""
    from seap.model.checkpoint import load_pruned
    from seap.registry.records import read_local_registry

    base, data = tiny_project(tmp_path, arch)
    common = ["--no-progress", "eval", "--model", str(base), "--tasks", "geo", "life", "--data-dir", str(data),
              "--limit", "4", "--samples", "20", "--no-mlflow", "--workdir", str(tmp_path / "work"),
              "--out", str(tmp_path / "out"), "--registry-dir", str(tmp_path / "registry")]
    assert main([*common, "--methods", "seap-expert", "wanda-sp"]) == 2
    assert "wanda-sp cannot prune experts" in capsys.readouterr().err
    assert main([*common, "--sparsities", "0.25", "0.5", "--bench-repeats", "1", *schedule]) == 0
    out = capsys.readouterr().out
    for row in ("seap-expert", "seap-general", "seap-routed", "moe-frequency"):
        assert f"| 50% | {row} |" in out, out[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    speed = results["speed"]["models"]
    assert all(entry["params"] < speed["dense"]["params"] and entry["bytes"] < speed["dense"]["bytes"]
               for name, entry in speed.items() if name != "dense")
    records = read_local_registry(str(tmp_path / "registry"))
    assert {r.kind for r in records} >= {"expert", "routed"}
    expert = next(r for r in records if r.kind == "expert")
    assert main(["--no-progress", "apply", "--model", str(base), "--mask", str(next(iter(expert.masks.values()))),
                 "--out", str(tmp_path / "pruned")]) == 0
    pruned = load_pruned(tmp_path / "pruned", device="cpu")
    assert pruned.model.config.seap_pruning["unit"] == "experts"
    masks = [json.loads(p.read_text()) for p in (tmp_path / "work" / "masks").glob("*/experts.json")]
    assert masks and {m["schedule"] for m in masks} == {"uniform" if arch == "qwen2_moe" else "logistic"}


@pytest.mark.slow  # families end to end through `seap eval`
def test_unit_both_runs_through_the_plan_and_a_dense_model_is_refused(tmp_path, capsys) -> None:
    base, data = tiny_project(tmp_path, "qwen3_moe")  # one dense layer among the MoE ones
    common = ["--no-progress", "eval", "--tasks", "geo", "life", "--data-dir", str(data), "--limit", "4",
              "--samples", "20", "--no-mlflow", "--no-bench", "--schedule", "uniform", "--workdir", str(tmp_path / "work"),
              "--out", str(tmp_path / "out"), "--registry-dir", str(tmp_path / "registry")]
    assert main([*common, "--model", str(base), "--unit", "both", "--sparsities", "0.5",
                 "--methods", "seap-expert", "seap-routed", "moe-frequency", "--router-kind", "patterns",
                 "--router-threshold", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "| 50% | seap-expert |" in out and "| 50% | seap-routed |" in out
    routed = next(r for r in json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
                  if r["method"] == "seap-routed")
    assert routed["router"]["kind"] == "patterns" and routed["routing"]["docs"] > 0
    masks = [json.loads(p.read_text()) for p in (tmp_path / "work" / "masks").glob("*/experts.json")]
    assert masks and {m["unit"] for m in masks} == {"both"}
    dense, _ = tiny_project(tmp_path / "dense")
    assert main([*common, "--model", str(dense), "--unit", "experts"]) == 2
    assert "needs a mixture-of-experts model" in capsys.readouterr().err


@pytest.mark.slow  # families end to end through `seap eval`
def test_unit_neurons_on_an_moe_model_prunes_the_channels_inside_every_expert(tmp_path, capsys) -> None:
    """`--unit neurons` on an MoE model: router statistics with channel sums, SEAP masks that keep
    every expert and prune channels inside them (logistic schedule), rows with memory; the dense
    baselines and another channel score are refused before any work."""
    base, data = tiny_project(tmp_path, "mixtral")
    common = ["--no-progress", "eval", "--model", str(base), "--tasks", "geo", "life", "--data-dir", str(data),
              "--limit", "4", "--samples", "20", "--no-mlflow", "--no-bench", "--unit", "neurons",
              "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
              "--registry-dir", str(tmp_path / "registry")]
    assert main([*common, "--methods", "seap-expert", "wanda-sp"]) == 2
    assert "wanda-sp cannot prune the neurons of a mixture-of-experts model" in capsys.readouterr().err
    assert main([*common, "--score", "wanda-sp"]) == 2
    assert "scored with seap-sf only" in capsys.readouterr().err
    assert main([*common, "--channel-multiple", "4"]) == 2
    assert "multiple of 8" in capsys.readouterr().err
    assert main([*common, "--sparsities", "0.5", "--protect-first", "0", "--protect-last", "0"]) == 0
    out = capsys.readouterr().out
    for row in ("seap-expert", "seap-general", "seap-routed"):
        assert f"| 50% | {row} |" in out, out[-3000:]
    assert "moe-frequency" not in out
    masks = [json.loads(p.read_text()) for p in (tmp_path / "work" / "masks").glob("*/experts.json")]
    assert masks and {m["unit"] for m in masks} == {"neurons"} and {m["schedule"] for m in masks} == {"logistic"}
    assert all(layer["kept"] == layer["experts"] and layer["channels"] < layer["intermediate"]
               for m in masks for layer in m["layers"][1:])


def test_walks_spread_over_several_devices_give_what_one_device_gives(tmp_path, monkeypatch) -> None:
    """``--device cpu,cpu`` (two devices; on a GPU machine cuda:0,cuda:1): each task's statistics
    and each mask's refit run in walks of their own, on their own device, at once, and every
    statistic and refitted weight is bit for bit what one device computes."""
    import threading

    from safetensors.torch import load_file

    import seap.model.calibration as calibration
    import seap.model.refitting as refitting

    threads: dict[str, set[str]] = {"statistics": set(), "refits": set()}
    for module, name, stage in ((calibration, "collect_task_statistics", "statistics"),
                                (refitting, "reconstruct_masks", "refits")):
        original = getattr(module, name)

        def spy(*args, _original=original, _stage=stage, **kwargs):
            threads[_stage].add(threading.current_thread().name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)

    def tensors(done, stage: str) -> dict[str, object]:
        keys = [j for j in done.outputs if j.startswith(stage + "/")]
        return {f"{key}/{f.relative_to(done.path(key))}:{name}": t for key in keys
                for f in sorted(done.path(key).rglob("*.safetensors")) for name, t in load_file(f).items()}

    runs = {}
    for devices in ("cpu", "cpu,cpu"):
        config = tiny_config(tmp_path / devices.replace(",", "-"), device=devices, reconstruct=True, bench=False,
                             methods=["seap-expert", "seap-general"])
        runs[devices] = execute(make_plan(config))
        if devices == "cpu":
            assert len(threads["statistics"]) == len(threads["refits"]) == 1
            threads = {k: set() for k in threads}
    assert all(len(names) == 2 for names in threads.values()), threads  # two walks at once, in two threads
    for stage in ("statistics", "refits"):
        one, two = tensors(runs["cpu"], stage), tensors(runs["cpu,cpu"], stage)
        assert one and one.keys() == two.keys()
        assert all(torch.equal(one[k], two[k]) for k in one), stage


def test_an_accuracy_budget_sizes_each_tasks_expert_on_held_out_train_items(tmp_path) -> None:
    """``max_drop``: each train split cut in two (the selection items never calibrate), every
    candidate expert of the grid refitted in the one walk and scored on the selection items, each
    task's sparsity the largest candidate within the budget (with every smaller one), and the
    ``seap-budget`` row of the chosen experts on the reported items. Another budget re-runs only
    the choice and what follows it."""
    from seap.data.corpus import knowledge_sentence, read_corpus, read_records
    from seap.maths.budget import allowed_drop, chosen_sparsity, fallback_choice, general_sparsity
    from seap.maths.masks import PruningMask

    import shutil

    _, data = tiny_project(tmp_path)
    shutil.copytree(data / "geo", data / "held")  # a task no calibration sees: it chooses the routed fallback
    config = tiny_config(tmp_path, methods=["seap-expert", "seap-general", "seap-routed", "wanda-sp"], sparsities=[0.3],
                         max_drop=5.0, budget_grid=[0.15, 0.3, 0.6], fallback_tasks=["held"],
                         selection_items=6, bench=False, limit=None, samples=None)
    plan = make_plan(config)
    done = execute(plan)
    selection = done.path("selection")
    corpora, _ = read_corpus(done.path("corpus") / "corpus.jsonl")
    for task in ("geo", "life"):
        held = read_records(selection / task / "validation.jsonl")
        assert len(held) == 6
        assert not {knowledge_sentence(r) for r in held} & set(corpora[task].texts)  # never calibrates
        assert len(corpora[task].texts) == len(read_records(selection / task / "train.jsonl"))  # (samples: all)
    record = json.loads((done.path("budget/choice") / "budget.json").read_text())
    dense = json.loads((done.path("select/dense") / "row.json").read_text())
    for task in ("geo", "life"):
        curve = {s: json.loads((done.path(f"select/seap-expert@{s:g}") / "row.json").read_text())["tasks"][task]["acc"]
                 for s in (0.15, 0.3, 0.6)}
        entry = record["tasks"][task]
        assert entry["selection_items"] == 6 and entry["allowed_drop"] == pytest.approx(0.05)
        assert entry["chosen"] == chosen_sparsity(curve, dense["tasks"][task]["acc"], allowed_drop(entry["dense"], 5.0))
        chosen = PruningMask.load(done.path(f"budget/{task}"))
        sized_by = chosen.meta["accuracy_budget"]  # what the registry and the promotion gate read back
        assert sized_by["chosen_sparsity"] == entry["chosen"] and sized_by["max_drop"] == 5.0
        assert sized_by["selection_accuracy"] == curve.get(entry["chosen"], dense["tasks"][task]["acc"])
        if entry["chosen"]:
            assert chosen.digest() == PruningMask.load(done.path(f"refits/seap-expert@{entry['chosen']:g}/{task}")).digest()
        else:
            assert chosen.realised_sparsity() == 0
    assert (done.path("budget/choice") / "budget.png").stat().st_size > 1000
    # the general mask under the same budget: the largest sparsity that keeps every task within it
    general_curves = {t: {s: json.loads((done.path(f"select/seap-general@{s:g}") / "row.json").read_text())
                          ["tasks"][t]["acc"] for s in (0.15, 0.3, 0.6)} for t in ("geo", "life")}
    dense_acc = {t: dense["tasks"][t]["acc"] for t in ("geo", "life")}
    assert record["general"]["chosen"] == general_sparsity(general_curves, dense_acc, {t: 0.05 for t in dense_acc})
    general = PruningMask.load(done.path("budget/general"))
    assert general.meta["accuracy_budget"]["chosen_sparsity"] == record["general"]["chosen"]
    general_row = json.loads((done.path("evaluate/seap-budget-general") / "row.json").read_text())
    assert general_row["realised_sparsity"] == pytest.approx(general.realised_sparsity())
    uniform = json.loads((done.path("evaluate/seap-budget-uniform") / "row.json").read_text())
    mean = sum(e["chosen"] for e in record["tasks"].values()) / 2
    assert uniform["budget_mean_sparsity"] == pytest.approx(mean)
    assert uniform["sparsity"] == min((0.15, 0.3, 0.6), key=lambda s: (abs(s - mean), -s))
    assert uniform["masks"] == {t: PruningMask.load(done.path(f"refits/seap-expert@{uniform['sparsity']:g}/{t}")).digest()
                                for t in ("geo", "life")}
    routed = json.loads((done.path("evaluate-routed/seap-budget-routed") / "row.json").read_text())
    assert routed["method"] == "seap-budget-routed"  # the router serves the experts at their own sizes
    fallback = routed["fallback"]  # chosen on the held-out task among dense and the general masks
    assert fallback["held_out_tasks"] == ["held"] and set(fallback["candidates"]) == {
        "seap-budget-general", "seap-general@0.3", "wanda-sp@0.3"}
    measured = {n: (c["accuracy"], c["realised_sparsity"]) for n, c in fallback["candidates"].items()}
    assert fallback["chosen"] == fallback_choice(fallback["dense"], measured, {"held": 0.05})
    used = PruningMask.load(done.path("evaluate-routed/seap-budget-routed") / "fallback")
    assert used.digest() == (PruningMask.load(done.path(f"refits/{fallback['chosen']}/general")).digest()
                             if "@" in fallback["chosen"] else general.digest() if fallback["chosen"] != "dense"
                             else used.digest()) and (fallback["chosen"] != "dense" or used.realised_sparsity() == 0)
    assert routed["masks"] == {**{t: PruningMask.load(done.path(f"budget/{t}")).digest() for t in ("geo", "life")},
                               "general": used.digest()}
    row = json.loads((done.path("evaluate/seap-budget") / "row.json").read_text())
    assert row["method"] == "seap-budget" and set(row["task_sparsity"]) == {"geo", "life"}
    results = json.loads((done.path("report") / "results.json").read_text())
    assert "seap-budget" in {r["method"] for r in results["rows"]}
    report = (tmp_path / "out" / "results.md").read_text()
    assert "## Accuracy budget" in report and "| seap-budget |" in report
    versus = results["budget"]["versus_uniform"]  # the paired comparison on the same reported items
    assert versus["rows"] == ["seap-budget", "seap-budget-uniform"] and versus["items"] > 0
    assert versus["low"] <= versus["difference"] <= versus["high"] and "budget minus uniform" in report
    assert "Routed fallback, chosen on tasks no calibration saw (held" in report
    assert (tmp_path / "out" / "budget.png").is_file()
    registered = json.loads((done.path("register") / "registered.json").read_text())["registered"]
    sized = {r["tags"]["task"]: r["tags"] for r in registered if r["tags"]["method"] == "seap-budget"}
    assert [r["tags"]["kind"] for r in registered if r["tags"]["method"] == "seap-budget-general"] == ["general"]
    bundle = next(r for r in registered if r["tags"]["method"] == "seap-budget-routed")
    assert bundle["tags"]["kind"] == "routed" and float(bundle["tags"]["budget_drop"]) == 5.0
    kept = json.loads((Path(bundle["path"]) / "record.json").read_text())
    assert kept["extra"]["fallback"]["chosen"] == fallback["chosen"]  # recorded with the bundle
    assert PruningMask.load(Path(bundle["path"]) / "masks" / "general").digest() == used.digest()
    assert set(sized) == {"geo", "life"}
    for task, tags in sized.items():
        assert float(tags["sparsity"]) == record["tasks"][task]["chosen"] and float(tags["budget_drop"]) == 5.0
        test_drop = 100 * (results["rows"][0]["tasks"][task]["acc"] - row["tasks"][task]["acc"])
        assert float(tags[f"drop_{task}"]) == pytest.approx(test_drop, abs=1e-4) == float(tags["max_drop"])
    benched = next(j for j in make_plan(config.replace(bench=True)).jobs if j.stage == "bench")
    assert {"seap-budget:geo", "seap-budget:life"} <= set(benched.inputs["masks"])  # each chosen expert's speed
    # another budget: the candidates, their refits and their selection rows are reused
    again = execute(make_plan(config.replace(max_drop=0.0)))
    rerun = {k for k in again.outputs if k not in again.cached}
    assert "budget/choice" in rerun  # (the chosen experts re-run only where the choice changed them)
    assert rerun <= {"model", "budget/choice", "budget/geo", "budget/life", "budget/general", "evaluate/seap-budget",
                     "evaluate/seap-budget-general", "evaluate/seap-budget-uniform", "evaluate-routed/seap-budget-routed",
                     "evaluate/held-out/seap-budget-general", "report", "register"}


def test_a_bisected_budget_probes_what_the_bisection_asks_and_chooses_from_it(tmp_path) -> None:
    """``budget_search: bisect``: the run's own sparsity is the first point; each round builds,
    refits (one walk) and scores the grid point :func:`~seap.maths.budget.next_probe` asks for,
    per task and for the general mask, until each is known to within the step; the choice and
    the chosen experts come from those probes. A re-run is cached whole."""
    from seap.maths.budget import allowed_drop, chosen_sparsity, general_sparsity, next_probe
    from seap.maths.masks import PruningMask

    config = tiny_config(tmp_path, methods=["seap-expert", "seap-general"], sparsities=[0.3], max_drop=5.0,
                         budget_search="bisect", budget_step=0.1, budget_grid=[0.6], selection_items=6, bench=False,
                         limit=None, samples=None)
    plan = make_plan(config)
    assert not [j for j in plan.jobs if j.stage == "masks" and "@0.3" not in j.name]  # (no grid of candidates)
    done = execute(plan)
    searched = json.loads((done.path("search/bisect") / "search.json").read_text())
    record = json.loads((done.path("budget/choice") / "budget.json").read_text())
    dense = json.loads((done.path("select/dense") / "row.json").read_text())["tasks"]
    allowed = {t: allowed_drop(dense[t]["acc"], 5.0) for t in ("geo", "life")}
    seeded = json.loads((done.path("select/seap-expert@0.3") / "row.json").read_text())["tasks"]
    general_seed = json.loads((done.path("select/seap-general@0.3") / "row.json").read_text())["tasks"]
    curves = {t: {float(s): a for s, a in searched["curves"][t].items()} for t in ("geo", "life")}
    # the rounds replayed from the measured points: each probe is the one the bisection asks for
    known = {t: {0.3: seeded[t]["acc"]} for t in ("geo", "life")}
    for probes in searched["rounds"]:
        for task in ("geo", "life"):
            expected = next_probe(known[task], dense[task]["acc"], allowed[task], 0.6, 0.1)
            assert probes.get(task) == expected
            if expected is not None:
                known[task][expected] = curves[task][expected]
    assert all(next_probe(known[t], dense[t]["acc"], allowed[t], 0.6, 0.1) is None for t in known)
    assert known == curves and 1 <= len(searched["rounds"]) <= 3  # (6 grid points: at most 3 probes each)
    for task in ("geo", "life"):
        entry = record["tasks"][task]
        assert entry["chosen"] == chosen_sparsity(curves[task], dense[task]["acc"], allowed[task])
        chosen = PruningMask.load(done.path(f"budget/{task}"))
        source = (done.path(f"refits/seap-expert@0.3/{task}") if entry["chosen"] == 0.3 else
                  done.path("search/bisect") / "masks" / f"seap-expert@{entry['chosen']:g}" / task)
        if entry["chosen"]:
            assert chosen.digest() == PruningMask.load(source).digest()
    general_curves = {t: {0.3: general_seed[t]["acc"]} for t in ("geo", "life")}
    for row in json.loads((done.path("search/bisect") / "rows.json").read_text()).items():
        if row[0].startswith("seap-general@"):
            for t in ("geo", "life"):
                general_curves[t][row[1]["sparsity"]] = row[1]["tasks"][t]["acc"]
    assert record["general"]["chosen"] == general_sparsity(general_curves, {t: dense[t]["acc"] for t in dense}, allowed)
    # the comparison at equal mean sparsity: every expert at the step nearest the chosen sizes' mean
    uniform = json.loads((done.path("evaluate/seap-budget-uniform") / "row.json").read_text())
    mean = sum(record["tasks"][t]["chosen"] for t in ("geo", "life")) / 2
    assert uniform["budget_mean_sparsity"] == pytest.approx(mean)
    assert uniform["sparsity"] == min((0.1, 0.2, 0.3, 0.4, 0.5, 0.6), key=lambda s: (abs(s - mean), -s))
    assert uniform["masks"] == {t: PruningMask.load(done.path("search/bisect") / "uniform" / t).digest()
                                for t in ("geo", "life")}
    assert {PruningMask.load(done.path("search/bisect") / "uniform" / t).meta.get("sparsity", uniform["sparsity"])
            for t in ("geo", "life")} == {uniform["sparsity"]}
    again = execute(make_plan(config))
    assert set(again.outputs) - again.cached <= {"model", "register"}


@pytest.mark.parametrize("search", ["grid", "bisect"])
def test_a_budget_with_confidence_holds_the_bound_on_the_paired_drop_against_it(tmp_path, search) -> None:
    """``budget_confidence: z``: each candidate's selection accuracy is read as dense's less its
    paired drop plus z standard errors (:func:`~seap.maths.budget.drop_bound`), in the grid's
    choice and in the bisection's probes alike; the measured curve is kept beside it."""
    from seap.maths.budget import allowed_drop, chosen_sparsity, drop_bound
    from seap.run.stages import _correct

    config = tiny_config(tmp_path, methods=["seap-expert"], sparsities=[0.3], max_drop=5.0, budget_confidence=1.5,
                         budget_grid=[0.15, 0.3, 0.6], selection_items=6, bench=False, limit=None, samples=None,
                         **({"budget_search": "bisect", "budget_step": 0.15} if search == "bisect" else {}))
    done = execute(make_plan(config))
    record = json.loads((done.path("budget/choice") / "budget.json").read_text())
    dense = _correct(json.loads((done.path("select/dense") / "items.json").read_text()), "acc")
    searched = json.loads((done.path("search/bisect") / "rows.json").read_text()) if search == "bisect" else {}
    for task in ("geo", "life"):
        entry = record["tasks"][task]
        expected = {}
        for s in map(float, entry["curve"]):
            row = f"seap-expert@{s:g}"
            correct = searched[row]["correct"] if row in searched else \
                _correct(json.loads((done.path(f"select/{row}") / "items.json").read_text()), "acc")
            expected[s] = entry["dense"] - drop_bound(dense[task], correct[task], 1.5)
        assert {float(k): v for k, v in entry["curve_bound"].items()} == pytest.approx(expected)
        assert entry["confidence"] == 1.5
        assert entry["chosen"] == chosen_sparsity(expected, entry["dense"], allowed_drop(entry["dense"], 5.0))
    if search == "bisect":
        return
    # the tiny model answers alike at every size (no doubt about any drop): the choice re-run against a dense
    # row right on every item, where each candidate's drop has a standard error, reads the bound
    from seap.run.execute import resolve_inputs
    from seap.run.plan import map_inputs
    from seap.run.stages import StageContext, budget

    choice = next(j for j in make_plan(config).jobs if j.key == "budget/choice")
    inputs = {role: map_inputs(v, lambda ref: Path(ref["path"])) for role, v in
              resolve_inputs(choice, done.outputs).items()}
    right = tmp_path / "all-right"
    right.mkdir()
    items = json.loads((inputs["dense"] / "items.json").read_text())
    row = json.loads((inputs["dense"] / "row.json").read_text())
    for task in items:
        items[task] = [{**item, "acc": 1.0} for item in items[task]]
        row["tasks"][task]["acc"] = 1.0
    (right / "items.json").write_text(json.dumps(items))
    (right / "row.json").write_text(json.dumps(row))
    budget(choice, {**inputs, "dense": right}, tmp_path / "choice", StageContext(tmp_path / "task-files"))
    again = json.loads((tmp_path / "choice" / "budget.json").read_text())
    for task in ("geo", "life"):
        for s, bound in again["tasks"][task]["curve_bound"].items():
            correct = _correct(json.loads((done.path(f"select/seap-expert@{s}") / "items.json").read_text()), "acc")
            drops = [1.0 - v for v in correct[task].values()]
            mean = sum(drops) / len(drops)
            se = (sum((d - mean) ** 2 for d in drops) / (len(drops) - 1) / len(drops)) ** 0.5
            assert se > 0 and bound == pytest.approx(1.0 - mean - 1.5 * se)


def test_a_killed_bisection_resumes_at_the_probe_it_was_on(tmp_path, monkeypatch) -> None:
    """The search keeps every scored probe in its job's work folder: after a failure in its
    second round, the re-run scores only what was not scored yet, and ends where an
    uninterrupted search ends."""
    import seap.run.stages as stages

    config = tiny_config(tmp_path, methods=["seap-expert"], sparsities=[0.3], max_drop=5.0, budget_search="bisect",
                         budget_step=0.1, budget_grid=[0.6], selection_items=6, bench=False, limit=None, samples=None)
    real, calls, armed = stages.evaluate, [], [True]

    def failing(job, inputs, out, ctx):
        if job.key == "select/probe":
            calls.append(job)
            if len(calls) == 2 and armed:
                armed.pop()
                raise RuntimeError("killed")
        return real(job, inputs, out, ctx)

    monkeypatch.setattr(stages, "evaluate", failing)
    with pytest.raises(RuntimeError, match="killed"):
        execute(make_plan(config))
    assert len(calls) == 2
    calls.clear()
    done = execute(make_plan(config))
    searched = json.loads((done.path("search/bisect") / "search.json").read_text())
    assert len(calls) == len(searched["rounds"]) - 1  # (the first round's probes were kept)
    fresh = execute(make_plan(config.replace(workdir=str(tmp_path / "fresh"))))
    assert json.loads((fresh.path("search/bisect") / "search.json").read_text()) == searched


def test_a_budget_candidate_past_the_schedules_reach_is_built_at_its_limit_and_never_chosen(tmp_path) -> None:
    """A grid sparsity the logistic schedule cannot reach on this model is not a failure of the
    run: its candidate is built at the limit, marked, scored, and left out of the choice."""
    from seap.maths.schedules import BEYOND_REACH
    from seap.maths.masks import PruningMask

    config = tiny_config(tmp_path, methods=["seap-expert"], sparsities=[0.2], schedule="logistic", protect_first=1,
                         protect_last=1, max_drop=100.0, budget_grid=[0.2, 0.97], selection_items=6, bench=False,
                         limit=None, samples=None)
    done = execute(make_plan(config))
    record = json.loads((done.path("budget/choice") / "budget.json").read_text())
    assert record["beyond_reach"] == [0.97]
    assert {e["chosen"] for e in record["tasks"].values()} == {0.2}  # (every candidate passes a budget of 100)
    past = PruningMask.load(done.path("refits/seap-expert@0.97/geo"))
    assert past.meta[BEYOND_REACH] == 0.97 and past.realised_sparsity() < 0.97


def test_a_speed_target_alone_takes_the_smallest_candidate_that_reaches_it(tmp_path) -> None:
    """``min_speedup``: every candidate shape timed against dense (one pruned model at a time);
    alone, each task's expert is the smallest candidate that reaches the target (with a budget:
    ``tests/maths/test_budget.py``)."""
    from seap.maths.budget import speed_sparsity

    config = tiny_config(tmp_path, methods=["seap-expert"], sparsities=[0.3], min_speedup=1.05,
                         budget_grid=[0.15, 0.3, 0.6], selection_items=6, bench=False, limit=None, samples=None)
    done = execute(make_plan(config))
    timed = json.loads((done.path("candidate-speed/grid") / "bench.json").read_text())["models"]
    assert {k.split(":")[0] for k in timed} == {"seap-expert@0.15", "seap-expert@0.3", "seap-expert@0.6"}
    record = json.loads((done.path("budget/choice") / "budget.json").read_text())
    for task in ("geo", "life"):
        curve = {s: timed[f"seap-expert@{s:g}:{task}"]["prefill_speedup"] for s in (0.15, 0.3, 0.6)}
        entry = record["tasks"][task]
        assert entry["speed"]["reached_at"] == speed_sparsity(curve, 1.05)
        assert entry["chosen"] == (entry["speed"]["reached_at"] or 0.0) and "allowed_drop" not in entry

import json

import pytest

from seap.cli import main
from seap.errors import SeapError
from seap.run.experiment import ALL_METHODS, Experiment, ExperimentConfig, save_results
from tests.helpers import make_tiny_model
from tests.helpers_tasks import make_task_dir


def test_full_comparison_on_a_tiny_model(tmp_path) -> None:
    data = make_task_dir(tmp_path / "data")
    config = ExperimentConfig(model="tiny", tasks=["geo", "life"], data_dir=str(data), sparsities=[0.3],
                              methods=list(ALL_METHODS), limit=6, samples=20, bench=True, bench_repeats=1)
    results = Experiment(config, tmp_path / "out", progress=False, loaded=make_tiny_model("llama-gqa")).run()
    methods = {(r["method"], r["sparsity"]) for r in results["rows"]}
    assert ("dense", 0.0) in methods and all((m, 0.3) in methods for m in ALL_METHODS)
    for row in results["rows"]:
        assert set(row["tasks"]) == {"geo", "life"} and 0 <= row["average"]["table"] <= 1
    routed = next(r for r in results["rows"] if r["method"] == "seap-routed")
    assert routed["routing"]["docs"] == 12 and 0 <= routed["router_overhead"] < 1
    assert results["router"]["heldout_accuracy"] >= 0.8
    assert set(results["speed"]["models"]) >= {"dense", "seap-general@0.3", "flap@0.3"}
    paths = save_results(results, tmp_path / "out")
    table = paths["markdown"].read_text()
    assert "| Ratio | Method | geo | life | Avg | Realised |" in table and "seap-expert" in table
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"
    assert json.loads(paths["json"].read_text())["lm_eval_version"] == "0.4.13"
    # experts were calibrated per task, baselines on the pooled corpus
    assert (tmp_path / "out" / "artifacts" / "masks" / "seap-expert-0.3" / "geo" / "mask.json").is_file()
    assert (tmp_path / "out" / "artifacts" / "masks" / "flap-0.3" / "general" / "mask.json").is_file()


@pytest.mark.parametrize("change, message", [
    ({"sparsities": [1.2]}, "outside"),
    ({"sparsities": [0.0]}, "dense model"),
    ({"methods": ["magic"]}, "unknown method"),
    ({"metric": "f1"}, "unknown metric"),
    ({"limit": 0}, "limit must be"),
    ({"tasks": ["nosuchtask"]}, "unknown task"),
    ({"tasks": ["hub:wikitext"]}, "not multiple-choice"),
])
def test_invalid_configs_fail_before_loading(tmp_path, change, message) -> None:
    config = ExperimentConfig(model="never-loaded/model", **change)
    with pytest.raises(SeapError, match=message):
        Experiment(config, tmp_path / "out", progress=False)


def test_eval_cli(tmp_path, capsys) -> None:
    data = make_task_dir(tmp_path / "data")
    tiny = make_tiny_model("qwen2")
    tiny.model.save_pretrained(tmp_path / "base")
    tiny.tokenizer.save_pretrained(tmp_path / "base")
    code = main(["--no-progress", "eval", "--model", str(tmp_path / "base"), "--tasks", "geo", "life", "--data-dir",
                 str(data), "--sparsities", "0.2", "--methods", "seap-expert", "wanda-sp", "--limit", "5",
                 "--samples", "15", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0 and "| 20% | seap-expert |" in out and "results.md" in out
    assert (tmp_path / "out" / "accuracy_vs_sparsity.png").is_file()

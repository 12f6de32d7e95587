"""seap.run.dvc: params.yaml validation (before any model is loaded), the stage runner and the
starter-suite export that the DVC pipeline uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from seap.cli import main
from seap.errors import SeapError
from seap.run.dvc import DEFAULT_PARAMS, export_starter, load_params, run_stage, validate_params
from tests.helpers_dvc import ROOT, tiny_params, write_params
from tests.helpers_flows import tiny_project


@pytest.fixture
def no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to resolve or load a model fails the test."""
    import seap.model.loading

    def forbidden(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the parameters were validated")

    monkeypatch.setattr(seap.model.loading, "load_model", forbidden)
    monkeypatch.setattr(seap.model.loading, "resolve_model_path", forbidden)


def _params_file(tmp_path: Path, **sections) -> Path:
    params = tiny_params(tmp_path / "no-model", ["geo", "life"], [0.2])
    for name, values in sections.items():
        params[name] = {**params.get(name, {}), **values}
    return write_params(tmp_path, params)


def test_repository_params_are_valid_and_complete() -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(raw) == set(DEFAULT_PARAMS)
    for section, keys in DEFAULT_PARAMS.items():
        assert set(raw[section]) == set(keys), section
    params = load_params(ROOT / "params.yaml")
    assert params["masks"]["sparsities"] == [0.2, 0.5] and params["model"]["name"] == "smollm2-135m"


@pytest.mark.parametrize(("sections", "named"), [
    ({"masks": {"sparsities": [1.5]}}, "masks.sparsities"),
    ({"masks": {"sparsities": [0.0]}}, "masks.sparsities"),
    ({"masks": {"sparsities": "0.5"}}, "masks.sparsities"),
    ({"masks": {"sparsity": 0.5}}, "masks.sparsity"),
    ({"scores": {"score": "magnitude-of-dreams"}}, "scores.score"),
    ({"masks": {"schedule": "cosine"}}, "masks.schedule"),
    ({"masks": {"baselines": ["sparsegpt"]}}, "masks.baselines"),
    ({"evaluate": {"limit": 0}}, "evaluate.limit"),
    ({"evaluate": {"metric": "f1"}}, "evaluate.metric"),
    ({"router": {"threshold": 2}}, "router.threshold"),
    ({"router": {"enabled": "yes"}}, "router.enabled"),
    ({"bench": {"repeats": True}}, "bench.repeats"),
    ({"data": {"tasks": []}}, "data.tasks"),
    ({"data": {"tasks": ["geo", "jsonl:geo"]}}, "data.tasks"),
    ({"model": {"dtype": "int3"}}, "model.dtype"),
])
def test_bad_parameters_are_named_before_any_model_loads(tmp_path, no_model_loading, sections, named) -> None:
    params_file = _params_file(tmp_path, **sections)
    with pytest.raises(SeapError) as info:
        run_stage("statistics", params_file, tmp_path)
    assert f"parameter {named}:" in info.value.problem
    assert str(params_file) in info.value.problem and info.value.fix


def test_unknown_section_is_named(tmp_path, no_model_loading) -> None:
    params_file = _params_file(tmp_path)
    text = params_file.read_text() + "pruning:\n  sparsity: 0.5\n"
    params_file.write_text(text)
    with pytest.raises(SeapError, match="parameter pruning: unknown section"):
        run_stage("model", params_file, tmp_path)


def test_router_needs_two_tasks_unless_disabled() -> None:
    with pytest.raises(SeapError, match="router.enabled"):
        validate_params({"data": {"tasks": ["capitals"]}})
    assert validate_params({"data": {"tasks": ["capitals"]}, "router": {"enabled": False}})["router"]["enabled"] is False


def test_defaults_fill_missing_keys() -> None:
    params = validate_params({"masks": {"sparsities": [0.3]}})
    assert params["masks"]["sparsities"] == [0.3] and params["masks"]["schedule"] == "logistic"
    assert params["evaluate"]["limit"] is None


def test_unknown_stage_and_missing_params_file(tmp_path) -> None:
    with pytest.raises(SeapError, match="unknown stage 'prune'"):
        run_stage("prune", tmp_path / "params.yaml", tmp_path)
    with pytest.raises(SeapError, match="not found"):
        run_stage("model", tmp_path / "params.yaml", tmp_path)


def test_missing_data_folder_is_reported_before_the_model_loads(tmp_path, no_model_loading) -> None:
    params_file = _params_file(tmp_path)
    with pytest.raises(SeapError, match="parameter data.dir") as info:
        run_stage("corpus", params_file, tmp_path)
    assert "dvc pull" in info.value.fix


def test_stage_cli_reports_errors_with_a_fix(tmp_path, capsys, no_model_loading) -> None:
    params_file = _params_file(tmp_path, masks={"sparsities": [1.5]})
    assert main(["stage", "masks", "--params", str(params_file), "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "parameter masks.sparsities" in err and "fix:" in err


def test_model_and_corpus_stages_and_the_fingerprint_check(tmp_path) -> None:
    model, data = tiny_project(tmp_path)
    write_params(tmp_path, tiny_params(model, ["geo", "life"], [0.2]))
    run_stage("model", tmp_path / "params.yaml", tmp_path)
    info = json.loads((tmp_path / "work" / "model.json").read_text())
    assert info["name"] == str(model) and info["fingerprint"].startswith("sha256:")
    assert str(tmp_path) not in json.dumps({k: v for k, v in info.items() if k not in ("name", "source")})
    run_stage("corpus", tmp_path / "params.yaml", tmp_path)
    header = json.loads((tmp_path / "work" / "corpus.jsonl").read_text().splitlines()[0])
    assert set(header["tasks"]) == {"geo", "life"} and header["max_tokens"] == 512
    info["fingerprint"] = "sha256:" + "0" * 64  # as if the model folder changed after the model stage
    (tmp_path / "work" / "model.json").write_text(json.dumps(info))
    with pytest.raises(SeapError, match="not the one the `model` stage recorded"):
        run_stage("statistics", tmp_path / "params.yaml", tmp_path)
    assert not (tmp_path / "work" / "statistics").exists()


def test_disabled_router_and_bench_write_explicit_outputs(tmp_path) -> None:
    params_file = _params_file(tmp_path, router={"enabled": False}, bench={"enabled": False})
    run_stage("router", params_file, tmp_path)
    run_stage("bench", params_file, tmp_path)
    assert json.loads((tmp_path / "work" / "router" / "disabled.json").read_text())["enabled"] is False
    assert json.loads((tmp_path / "work" / "bench.json").read_text())["enabled"] is False


def test_export_starter_is_deterministic_and_matches_the_starter_tasks(tmp_path) -> None:
    from seap.data.starter import STARTER_TASKS, starter_records
    from seap.data.catalogue import TaskCatalogue

    assert main(["export-starter", "--out", str(tmp_path / "a")]) == 0
    export_starter(tmp_path / "b")
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jsonl"))
    assert files_a == sorted(Path(t) / f for t in STARTER_TASKS for f in ("train.jsonl", "validation.jsonl"))
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    first = json.loads((tmp_path / "a" / "capitals" / "train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"question", "choices", "answer"}
    assert first == starter_records("capitals", "calibration")[0]
    registry = TaskCatalogue(tmp_path / "a", tmp_path / "task-files")
    jsonl, starter = registry.resolve(["jsonl:sentiment", "starter:arithmetic"])
    assert jsonl.eval_file.read_bytes() == (tmp_path / "a" / "sentiment" / "validation.jsonl").read_bytes()
    assert starter.train_file.read_bytes() == (tmp_path / "a" / "arithmetic" / "train.jsonl").read_bytes()
    with pytest.raises(SeapError, match="already exists"):
        export_starter(tmp_path / "a")


def test_repository_data_is_the_exported_starter_suite(tmp_path) -> None:
    """data.dvc and the in-repository remote hold exactly what `seap export-starter` writes
    (checked on the committed remote, so it needs no `dvc pull`)."""
    import hashlib

    import yaml

    export_starter(tmp_path / "starter")
    files = sorted((tmp_path / "starter").rglob("*.jsonl"))
    tracked = yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]
    assert tracked["nfiles"] == len(files)
    assert tracked["size"] == sum(f.stat().st_size for f in files)
    for f in files:
        digest = hashlib.md5(f.read_bytes()).hexdigest()
        assert (ROOT / "dvc-remote" / "files" / "md5" / digest[:2] / digest[2:]).is_file(), f

"""The run configuration (seap.run.config) through its front doors: params.yaml (validated before
any model is loaded, as the DVC stages read it), the CLI and flow names; the DVC stage runner and
the starter-suite export that the DVC pipeline uses."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from seap.cli import main
from seap.errors import SeapError
from seap.data.starter import export_starter
from seap.run.config import (RunConfig, declared_defaults, default_params, load_params, option_name, options,
                              param_sections)
from seap.run.dvc import run_stage
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
    assert {s: set(k) for s, k in raw.items()} == {s: set(k) for s, k in param_sections().items()}
    config = load_params(ROOT / "params.yaml")
    assert config.masks.sparsities == [0.2, 0.5] and config.model.model == "smollm2-135m"
    defaults = default_params()
    for section, keys in raw.items():  # the repository's params.yaml differs from the defaults only in locations
        for key, value in keys.items():
            if (section, key) not in {("data", "dir"), ("register", "dir"), ("register", "mlflow_dir")}:
                assert value == defaults[section][key], (section, key)


@pytest.mark.parametrize(("sections", "named"), [
    ({"masks": {"sparsities": [1.5]}}, "masks.sparsities"),
    ({"masks": {"sparsities": [0.0]}}, "masks.sparsities"),
    ({"masks": {"sparsities": "0.5"}}, "masks.sparsities"),
    ({"masks": {"sparsity": 0.5}}, "masks.sparsity"),
    ({"masks": {"score": "magnitude-of-dreams"}}, "masks.score"),
    ({"masks": {"schedule": "cosine"}}, "masks.schedule"),
    ({"masks": {"methods": ["sparsegpt"]}}, "masks.methods"),
    ({"masks": {"methods": []}}, "masks.methods"),
    ({"evaluate": {"limit": 0}}, "evaluate.limit"),
    ({"evaluate": {"metric": "f1"}}, "evaluate.metric"),
    ({"router": {"threshold": 2}}, "router.threshold"),
    ({"router": {"enabled": True}}, "router.enabled"),
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


def test_routing_needs_two_tasks() -> None:
    with pytest.raises(SeapError, match="parameter masks.methods: seap-routed needs at least two tasks"):
        RunConfig.from_params({"data": {"tasks": ["capitals"]}}).validate(check_data=False)
    config = RunConfig.from_params({"data": {"tasks": ["capitals"]}, "masks": {"methods": ["seap-expert"]}})
    assert config.validate(check_data=False).routed is False


def test_defaults_fill_missing_keys() -> None:
    config = RunConfig.from_params({"masks": {"sparsities": [0.3]}}).validate(check_data=False)
    assert config.masks.sparsities == [0.3] and config.masks.schedule == "logistic" and config.evaluate.limit is None


def test_each_front_door_names_the_option_its_own_way() -> None:
    """One mapping: the field name is the flow parameter, --field-name the CLI flag, section.key
    the params.yaml key; an error names the option as the user wrote it."""
    assert option_name("stats_batch_size", "cli") == "--stats-batch-size"
    assert option_name("stats_batch_size", "params") == "statistics.batch_size"
    assert option_name("stats_batch_size", "flow") == "stats_batch_size"
    for front, spelled in (("cli", "--sparsities"), ("params", "masks.sparsities"), ("flow", "sparsities")):
        with pytest.raises(SeapError, match=f"parameter {spelled}: must be at most"):
            RunConfig.from_mapping({"sparsities": [1.5]}, front=front).validate(check_data=False)
    with pytest.raises(SeapError, match=r"unknown parameter\(s\) \['sparsity'\]"):
        RunConfig.from_mapping({"sparsity": 0.5})
    keys = [(o.section, o.key) for o in options().values() if o.section]
    assert len(keys) == len(set(keys))  # no two fields share a params.yaml key


def test_sections_hold_the_flat_fields() -> None:
    """One section per params.yaml section (and ``outputs``): every field in exactly one, under
    the section params.yaml puts it in; built and recorded by flat field name."""
    import dataclasses

    sections = {s.name: [f.name for f in dataclasses.fields(s.default_factory)] for s in dataclasses.fields(RunConfig)}
    flat = [name for names in sections.values() for name in names]
    assert flat == list(options()) and len(flat) == len(set(flat))
    for section, names in sections.items():
        assert {options()[n].section for n in names} <= {section, None}, section
    assert set(param_sections()) == set(sections) - {"outputs"}
    config = RunConfig(sparsities=[0.3], refit_alpha=0.1, workdir="w", bench=False)
    assert (config.masks.sparsities, config.reconstruction.refit_alpha, config.outputs.workdir) == ([0.3], 0.1, "w")
    assert config.bench.bench is False and list(config.to_dict()) == flat  # results.json: flat, as ever
    assert RunConfig(**config.to_dict()) == config == config.replace() != config.replace(refit_alpha=0.2)
    with pytest.raises(TypeError, match="'sparsity'"):
        RunConfig(sparsity=0.3)


def test_flow_parameters_are_the_configuration_fields() -> None:
    import inspect

    from flows.pipeline import seap_pipeline

    params = inspect.signature(seap_pipeline.fn).parameters
    assert list(params) == list(options())
    defaults = SimpleNamespace(**declared_defaults())
    for name, param in params.items():
        assert param.default == getattr(defaults, name), name  # read from RunConfig, not repeated


def test_partial_flows_take_configuration_fields_with_its_defaults() -> None:
    import argparse
    import inspect

    from flows.evaluate import EVALUATE_OPTIONS, evaluate_flow
    from flows.evaluate import main as evaluate_main  # noqa: F401  (importable)
    from flows.router import ROUTER_OPTIONS, router_flow
    from seap.run.config import add_arguments, given_arguments

    defaults = SimpleNamespace(**declared_defaults())
    for flow_fn, fields, extra in ((evaluate_flow, EVALUATE_OPTIONS, {"masks", "out"}), (router_flow, ROUTER_OPTIONS, set())):
        params = inspect.signature(flow_fn.fn).parameters
        assert set(params) == set(fields) | extra
        for name in fields:
            assert params[name].default == getattr(defaults, name), name
        parser = argparse.ArgumentParser()
        add_arguments(parser, only=fields)
        assert given_arguments(parser.parse_args(["--model", "m"])) == {"model": "m"}  # others: the flow's defaults


def test_cli_flags_are_the_configuration_fields() -> None:
    import argparse

    from seap.run.config import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--sparsities", "0.3", "0.4", "--no-bench", "--limit", "null", "--methods", "flap"])
    config = RunConfig.from_cli(args)
    assert config.masks.sparsities == [0.3, 0.4] and config.bench.bench is False and config.evaluate.limit is None
    assert config.masks.methods == ["flap"] and config.data.tasks == RunConfig().data.tasks


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


def test_model_and_corpus_stages_and_the_model_check(tmp_path) -> None:
    model, data = tiny_project(tmp_path)
    write_params(tmp_path, tiny_params(model, ["geo", "life"], [0.2]))
    run_stage("model", tmp_path / "params.yaml", tmp_path)
    record_file = tmp_path / "work" / "model" / "output" / "model.json"
    info = json.loads(record_file.read_text())
    assert info["name"] == str(model) and len(info["digest"]) == 64
    run_stage("corpus", tmp_path / "params.yaml", tmp_path)
    header = json.loads((tmp_path / "work" / "corpus" / "output" / "corpus.jsonl").read_text().splitlines()[0])
    assert set(header["tasks"]) == {"geo", "life"} and header["max_tokens"] == 512
    info["digest"] = "0" * 64  # as if the model folder changed after the model stage
    record_file.write_text(json.dumps(info))
    with pytest.raises(SeapError, match="not the one the `model` stage recorded"):
        run_stage("statistics", tmp_path / "params.yaml", tmp_path)
    assert not (tmp_path / "work" / "statistics").exists()


def test_stages_without_jobs_write_explicit_outputs(tmp_path) -> None:
    params_file = _params_file(tmp_path, masks={"methods": ["seap-expert", "wanda-sp"]}, bench={"enabled": False})
    run_stage("router", params_file, tmp_path)
    run_stage("bench", params_file, tmp_path)
    assert json.loads((tmp_path / "work" / "router" / "disabled.json").read_text())["enabled"] is False
    assert json.loads((tmp_path / "work" / "bench" / "disabled.json").read_text())["enabled"] is False


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
    assert set(first) == {"question", "choices", "answer", "group"}  # (group: the fact, held out whole)
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


def test_a_budget_needs_train_records_to_hold_selection_items_out_of(tmp_path) -> None:
    from tests.helpers_tasks import make_task_dir

    data = make_task_dir(tmp_path / "data", n_train=3)
    config = RunConfig(tasks=["geo", "life"], data_dir=str(data), max_drop=2.0, workdir=str(tmp_path / "w"))
    with pytest.raises(SeapError, match="'geo' has 3 train records, too few"):
        config.validate()
    config.replace(max_drop=None).validate()  # (without a budget nothing is held out)


def _bad_values() -> dict[str, str]:
    """For every option of the table with a range or a list of choices: one value outside it,
    as the command line spells it."""
    bad: dict[str, str] = {}
    for name, option in options().items():
        if option.choices:
            bad[name] = "not-a-choice"
        elif option.minimum is not None:
            bad[name] = f"{option.minimum - 1:g}"
        elif option.maximum is not None:
            bad[name] = f"{option.maximum + 1:g}"
    return bad


def test_every_ranged_option_is_refused_before_any_model_loads(tmp_path, no_model_loading, capsys) -> None:
    """The option table walked: each option with a range or choices, given a value outside it on
    `seap eval`, is refused with its own name and nothing is written (the model loader would fail
    the test if it were reached)."""
    bad = _bad_values()
    assert len(bad) >= 20, sorted(bad)
    for name, value in bad.items():
        flag = option_name(name, "cli")
        try:
            code = main(["--no-progress", "eval", flag, value, "--workdir", str(tmp_path / "w"),
                         "--out", str(tmp_path / "o")])
        except SystemExit as exc:  # (argparse: a value of the wrong type, named by its flag)
            code = int(exc.code or 0)
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        assert flag in err or "invalid" in err, (name, err)  # (named by our check, or argparse's for a typed flag)
        assert "Traceback" not in err
        assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists(), name


def test_a_dvc_stage_refuses_to_start_below_the_disk_floor(tmp_path, no_model_loading, monkeypatch) -> None:
    monkeypatch.setenv("SEAP_MIN_FREE_DISK", "1000T")
    params_file = _params_file(tmp_path)
    with pytest.raises(SeapError, match="below the floor of 1000.0T"):
        run_stage("model", params_file, tmp_path)
    assert not (tmp_path / "work" / "model").exists()

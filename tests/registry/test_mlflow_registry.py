"""The MLflow registry on real servers: `mlflow server` (started by mlflow/server/serve.sh)
with its artifacts in moto's S3 server on loopback, the real Prefect engine for the
pipeline runs, and `mlflow models serve` answering over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.helpers_flows import pipeline_kwargs
from tests.helpers_mlflow import S3_KEYS, free_port, mlflow_server, model_server, moto_s3, s3_objects

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.services, pytest.mark.slow]  # mlflow and moto servers, pipeline flows
NAMES = ["seap-base-general", "seap-base-geo", "seap-base-life", "seap-base-routed"]


SPARSITIES = (0.2, 0.25, 0.4)  # not 0.3: tests/flows/test_pipeline.py needs the shared work folder without it


def flow_kwargs(tmp: Path, sparsity: float, **overrides) -> dict:
    """The session pipeline's parameters (tests/conftest.py: the same model, data and work folder, so
    its jobs are reused) at ``sparsity``, with this module's results and local registry."""
    return pipeline_kwargs(tmp, **{"sparsities": [sparsity], "out": str(tmp / f"out-{sparsity:g}"),
                                   "registry_dir": str(tmp / f"registry-{sparsity:g}"), **overrides})


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """moto S3 + mlflow server; yields (tracking URI, S3 endpoint, state folder)."""
    state = tmp_path_factory.mktemp("mlflow-server")
    with moto_s3() as endpoint, mlflow_server(state, endpoint) as url:
        yield url, endpoint, state


@pytest.fixture(scope="module")
def registered(stack, llama_pipeline):
    """The session's pipeline run at 20% run again, tracked and registered on the server (every
    job but the registration is reused), plus the local records of a 25% and a 40% run of the
    SEAP methods (not yet in MLflow)."""
    from flows.pipeline import seap_pipeline

    url, _, _ = stack
    tmp, _, _ = llama_pipeline
    first = seap_pipeline(**flow_kwargs(tmp, 0.2, tracking_uri=url))
    for sparsity in SPARSITIES[1:]:
        seap_pipeline(**flow_kwargs(tmp, sparsity, mlflow=False, methods=["seap-expert", "seap-general", "seap-routed"]))
    return tmp, first


@pytest.fixture()
def reg(stack):
    from seap.registry.mlflow_code import mlflow_registry

    module = mlflow_registry()
    module.connect(stack[0])
    return module


def policy_file(tmp: Path, stages: dict) -> Path:
    path = tmp / f"policy-{time.time_ns()}.yaml"
    path.write_text(yaml.safe_dump({"stages": stages}))
    return path


def passing_policy(tmp: Path, tags: dict) -> Path:
    """Gates set just below the version's own numbers (so they pass), require_stage as shipped."""
    tasks = [t for t in tags["tasks"].split(",") if t]
    floor = min(float(tags[f"retention_{t}"]) for t in tasks) - 0.01
    speed = float(tags["prefill_speedup"]) - 0.01
    return policy_file(tmp, {"staging": {"require_stage": "candidate", "min_retention_per_task": floor,
                                         "min_prefill_speedup": speed},
                             "production": {"require_stage": "staging", "min_retention_per_task": floor}})


def test_pipeline_run_is_tracked_with_params_metrics_report_and_fingerprints(registered, reg) -> None:
    from mlflow.tracking import MlflowClient

    _, first = registered
    tracked = first["mlflow"]
    assert len(tracked["versions"]) == 4 and all(v["created"] for v in tracked["versions"])
    run = MlflowClient().get_run(tracked["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["sparsities"] == "0.2" and run.data.params["tasks"] == "geo,life"
    metrics = run.data.metrics
    for key in ("dense/geo/acc", "dense/geo/acc_norm", "seap-expert_0.2/geo/acc", "seap-expert_0.2/retention_geo",
                "seap-general_0.2/prefill_speedup", "seap-general_0.2/realised_sparsity", "seap-routed_0.2/average"):
        assert key in metrics, key
    tags = run.data.tags
    assert tags["model_fingerprint"].startswith("sha256:") and tags["lm_eval_version"] and tags["data_fingerprint"]
    assert tags["prefect_flow_run_id"]
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "report")}
    assert {"report/results.md", "report/accuracy_vs_sparsity.png", "report/results.json"} <= artifacts


def test_versions_hold_small_bundles_in_s3_with_searchable_tags(registered, reg, stack) -> None:
    _, endpoint, _ = stack
    tmp, _ = registered
    rows = reg.search("tags.task = 'geo'")
    assert [(r["name"], r["version"]) for r in rows] == [("seap-base-geo", 1)]
    tags = rows[0]["tags"]
    for key in ("task", "kind", "sparsity", "score", "schedule", "base_fingerprint", "accuracy", "retention",
                "retention_geo", "prefill_speedup", "realised_sparsity", "lm_eval_version"):
        assert key in tags, key
    assert tags["sparsity"] == "0.2" and tags["kind"] == "expert" and tags["stage"] == "registered"
    assert {r["name"] for r in reg.search("tags.sparsity = '0.2'")} == set(NAMES)
    objects = s3_objects(endpoint)
    bundles = [k for k in objects if k.endswith("artifacts/bundle/bundle.json")]
    assert len(bundles) == 4  # the artifacts went to S3 through the server
    from safetensors import safe_open

    base_bytes, refittable = 0, 0  # a refitted mask carries at most the o_proj/down_proj weights
    for f in (tmp / "base").glob("*.safetensors"):
        with safe_open(str(f), "pt") as weights:
            for name in weights.keys():
                size = weights.get_slice(name).get_shape()
                n = 4 * (size[0] * (size[1] if len(size) > 1 else 1))
                base_bytes += n
                refittable += n if name.endswith(("o_proj.weight", "down_proj.weight")) else 0
    for key in bundles:
        prefix = key.rsplit("bundle.json", 1)[0]
        size = sum(s for k, s in objects.items() if k.startswith(prefix))
        masks = sum(1 for k in objects if k.startswith(prefix) and k.endswith("mask.safetensors"))
        assert size < masks * refittable + base_bytes / 10, "a bundle must not copy the base weights"
    assert not any("model.safetensors" in k for k in objects)


def test_registering_the_same_records_again_creates_no_version(registered, reg) -> None:
    from seap.registry.records import read_local_registry

    tmp, _ = registered
    out = reg.register_results(tmp / "out-0.2", read_local_registry(tmp / "registry-0.2"), progress=False)
    assert [v["created"] for v in out["versions"]] == [False] * 4
    assert all(len(reg.search(name=n)) == 1 for n in NAMES)


def test_two_concurrent_registrations_give_two_consistent_versions(registered, reg, stack) -> None:
    url = stack[0]
    tmp, _ = registered
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "CI": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "seap", "register", "--results", str(tmp / f"out-{s:g}"),
                               "--registry", str(tmp / f"registry-{s:g}")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for s in SPARSITIES[1:]]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    for name in NAMES:
        versions = reg.search(name=name)
        assert sorted(v["version"] for v in versions) == [1, 2, 3]
        assert sorted(v["tags"]["sparsity"] for v in versions) == ["0.2", "0.25", "0.4"]
    from seap.registry.bundle import read_bundle

    for v in reg.search(name="seap-base-life"):  # each version's bundle is its own, complete
        mv = reg.get_version("seap-base-life", v["version"])
        with reg._downloaded_bundle(mv) as path:
            bundle = read_bundle(path)
            assert f"{bundle.data['sparsity']:g}" == v["tags"]["sparsity"]
            assert bundle.data["version_key"] == v["tags"]["version_key"]


def test_promotion_through_the_gate_archive_and_rollback(registered, reg, tmp_path) -> None:
    from seap.errors import SeapError

    tags = reg.get_version("seap-base-geo", 1).tags
    policy = passing_policy(tmp_path, tags)
    name = "seap-base-geo"
    with pytest.raises(SeapError, match="require_stage"):
        reg.promote(name, 1, "staging", policy)
    assert reg.promote(name, 1, "candidate", policy)["stage"] == "candidate"
    assert reg.promote(name, 1, "staging", policy)["from"] == "candidate"
    assert reg.promote(name, 1, "production", policy)["archived"] is None
    mv = reg.get_version(name, 1)
    assert mv.aliases == ["production"] and mv.current_stage == "Production" and mv.tags["stage"] == "production"
    # a second version replaces it: the first is archived
    policy2 = passing_policy(tmp_path, reg.get_version(name, 2).tags)
    for stage in ("candidate", "staging"):
        reg.promote(name, 2, stage, policy2)
    assert reg.promote(name, 2, "production", policy2)["archived"] == 1
    old = reg.get_version(name, 1)
    assert old.aliases == [] and old.current_stage == "Archived" and old.tags["stage"] == "archived"
    # the deprecated stage API sees the same thing
    from mlflow.tracking import MlflowClient

    with pytest.warns(FutureWarning):
        latest = MlflowClient().get_latest_versions(name, stages=["Production"])
    assert [v.version for v in latest] == ["2"]
    # rollback: one call (and one command, see test_cli_promote_models_and_rollback)
    out = reg.rollback(name)
    assert out == {"name": name, "production": 1, "archived": 2}
    assert reg.get_version(name, 1).aliases == ["production"]
    assert reg.get_version(name, 2).current_stage == "Archived"
    with pytest.raises(SeapError, match="no earlier production version"):
        reg.rollback(name)


def test_a_failing_gate_is_refused_naming_the_rule(registered, reg, tmp_path) -> None:
    from seap.errors import SeapError

    name = "seap-base-general"
    tags = reg.get_version(name, 1).tags
    reg.promote(name, 1, "candidate")
    too_high = float(tags["retention_geo"]) + 0.01
    policy = policy_file(tmp_path, {"staging": {"min_retention_per_task": too_high, "min_prefill_speedup": 100.0}})
    with pytest.raises(SeapError) as info:
        reg.promote(name, 1, "staging", policy)
    message = info.value.problem
    assert "refused" in message and "min_retention_per_task: retention on geo" in message
    assert "min_prefill_speedup" in message and "< 100" in message
    mv = reg.get_version(name, 1)
    assert mv.aliases == ["candidate"] and mv.tags["last_refusal"].startswith("staging:")


def test_missing_versions_and_fingerprint_mismatches_fail_clearly(registered, reg, tmp_path) -> None:
    import shutil

    from mlflow.tracking import MlflowClient

    from seap.errors import ModelMismatchError, SeapError
    from seap.registry.records import read_local_registry
    from tests.helpers import make_tiny_model

    tmp, _ = registered
    with pytest.raises(SeapError, match="has no version 99"):
        reg.promote("seap-base-geo", 99, "candidate")
    with pytest.raises(SeapError, match="does not exist"):
        reg.promote("seap-no-such-model", 1, "candidate")
    # a bundle whose base model changed after registration
    moved = tmp_path / "base-copy"
    shutil.copytree(tmp / "base", moved)
    record = next(r for r in read_local_registry(tmp / "registry-0.2") if r.task == "life")
    record.base_model = str(moved)
    made = reg.register_record(record)
    other = make_tiny_model("llama-gqa", seed=123)
    other.model.save_pretrained(moved)
    version = made["version"]
    policy = policy_file(tmp_path, {"staging": {"require_stage": "candidate"}})
    reg.promote(record.name, version, "candidate", policy)
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        reg.promote(record.name, version, "staging", policy)
    # a version whose tag disagrees with its bundle
    MlflowClient().set_model_version_tag(record.name, str(version), "base_fingerprint", "sha256:" + "0" * 64)
    with pytest.raises(ModelMismatchError, match="does not match the bundle"):
        reg.promote(record.name, version, "staging", policy, verify_base=False)


def test_load_by_alias_rebuilds_the_pruned_expert(registered, reg) -> None:
    import mlflow
    from seap.registry.bundle import load_bundle
    from seap.registry.records import read_local_registry

    tmp, _ = registered
    name = "seap-base-routed"
    reg.promote(name, 1, "candidate")
    model = mlflow.pyfunc.load_model(f"models:/{name}@candidate")
    prompts = ["the capital of france", "a cat is an animal"]
    out = model.predict(prompts, params={"max_new_tokens": 4})
    assert list(out.columns) == ["text", "expert", "confidence"] and len(out) == 2
    assert set(out["expert"]) <= {"geo", "life", "general"}
    # the same as the bundle loaded locally from the pipeline's own record
    from seap.registry.bundle import write_bundle

    record = next(r for r in read_local_registry(tmp / "registry-0.2") if r.kind == "routed")
    local = load_bundle(write_bundle(record, tmp / "local-bundle"), device="cpu")
    assert out["text"].tolist() == [r["text"] for r in local.generate(prompts, max_new_tokens=4)]


def test_an_expert_bundle_answers_with_its_own_expert(registered, reg) -> None:
    import mlflow

    out = mlflow.pyfunc.load_model("models:/seap-base-geo/1").predict(["the capital of france"],
                                                                      params={"max_new_tokens": 3})
    assert out["expert"].tolist() == ["geo"] and isinstance(out["text"][0], str) and out["text"][0]


def test_a_served_bundle_answers_over_http_as_it_does_in_process(registered, reg, stack, tmp_path) -> None:
    """`mlflow models serve` of a registered version answers what the same version answers loaded
    in this process. The routed bundle (router and experts); an expert's bundle is the same pyfunc
    model (mlflow/seap_model.py) with one expert, see the test above."""
    import mlflow

    uri, prompt = "models:/seap-base-routed/1", "the capital of france"
    want = mlflow.pyfunc.load_model(uri).predict([prompt], params={"max_new_tokens": 3})
    with model_server(uri, stack[0], tmp_path / "serve.log") as served:
        response = requests.post(served + "/invocations", timeout=120,
                                 json={"inputs": [prompt], "params": {"max_new_tokens": 3}})
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["predictions"]
    assert (prediction["text"], prediction["expert"]) == (want["text"][0], want["expert"][0])
    assert prediction["expert"] in {"geo", "life", "general"}


def test_cli_promote_models_and_rollback(registered, stack, monkeypatch, capsys) -> None:
    """The registry commands as a user types them (in this process: the commands are what is
    tested here, a new process would only add its imports)."""
    from seap.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack[0])
    monkeypatch.setenv("CI", "1")

    def seap(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    code, listed, _ = seap("models", "--filter", "tags.kind = 'routed'")
    assert code == 0 and "seap-base-routed | 1 |" in listed
    code, _, missing = seap("promote", "seap-base-geo", "42", "--to", "staging")
    assert code == 2 and "has no version 42" in missing and "fix:" in missing
    code, _, back = seap("rollback", "seap-base-life")
    assert code == 2 and "no earlier production version" in back
    assert S3_KEYS["AWS_SECRET_ACCESS_KEY"] not in listed + missing + back


def test_unreachable_server_retries_then_fails_keeping_local_results(registered, prefect_env) -> None:
    from flows.pipeline import seap_pipeline
    from seap.registry.records import read_local_registry

    tmp, _ = registered
    dead = f"http://127.0.0.1:{free_port()}"
    kwargs = flow_kwargs(tmp, 0.2, tracking_uri=dead, out=str(tmp / "out-dead"), registry_dir=str(tmp / "reg-dead"))
    state = seap_pipeline(return_state=True, **kwargs)
    assert state.is_failed()
    message = str(state.message) + repr(state.result(raise_on_failure=False))
    assert "unreachable after 3 attempts" in message and "seap register" in message
    assert json.loads((tmp / "out-dead" / "results.json").read_text())["rows"]
    assert len(read_local_registry(tmp / "reg-dead")) == 4

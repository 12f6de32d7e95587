"""The prune flow on the real Prefect engine (a temporary local server, results in tmp)."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import SENTENCES, make_tiny_model


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefect")
    env = {"PREFECT_HOME": str(root / "home"), "PREFECT_LOCAL_STORAGE_PATH": str(root / "results"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield root
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def task_states(flow_state) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r.state.name for r in runs}


def test_prune_flow_caches_across_runs_and_reruns_only_downstream(prefect_env, tmp_path) -> None:
    from flows.prune import prune_flow
    from seap.pruned import load_pruned

    tiny = make_tiny_model("llama-gqa")
    tiny.model.save_pretrained(tmp_path / "base")
    tiny.tokenizer.save_pretrained(tmp_path / "base")
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"task": "ab"[i % 2], "text": s}) + "\n" for i, s in enumerate(SENTENCES)))
    kwargs = dict(model=str(tmp_path / "base"), calib=str(calib), samples=None, workdir=str(tmp_path / "work"))

    first = prune_flow(sparsity=0.2, return_state=True, **kwargs)
    result = first.result()
    assert load_pruned(result["pruned"]["path"]).model.config.seap_pruning["task"] == "general"
    states = task_states(first)
    assert not any(s == "Cached" for s in states.values())

    second = task_states(prune_flow(sparsity=0.2, return_state=True, **kwargs))
    stages = {name.split("-")[0] for name in second}
    assert {"corpus", "statistics", "scores", "masks", "prune"} <= stages
    assert all(state == "Cached" for name, state in second.items() if not name.startswith("model")), second

    third = task_states(prune_flow(sparsity=0.25, return_state=True, **kwargs))
    for name, state in third.items():
        stage = name.split("-")[0]
        if stage in ("corpus", "statistics", "scores"):
            assert state == "Cached", (name, state)
        if stage in ("masks", "prune"):
            assert state == "Completed", (name, state)


def test_invalid_parameters_fail_before_work(prefect_env, tmp_path) -> None:
    from flows.prune import prune_flow
    from seap.errors import SeapError

    with pytest.raises(SeapError, match="sparsity"):
        prune_flow(sparsity=1.5, workdir=str(tmp_path / "work"))
    assert not (tmp_path / "work").exists()


def test_pipeline_flow_end_to_end_and_cached(prefect_env, tmp_path) -> None:
    from flows.pipeline import seap_pipeline

    tiny = make_tiny_model("llama-gqa")
    tiny.model.save_pretrained(tmp_path / "base")
    tiny.tokenizer.save_pretrained(tmp_path / "base")
    from tests.helpers_tasks import make_task_dir

    data = make_task_dir(tmp_path / "data")
    kwargs = dict(model=str(tmp_path / "base"), tasks=["geo", "life"], sparsities=[0.2], baselines=["wanda-sp", "flap"],
                  eval_limit=4, data_dir=str(data), samples=20, schedule="uniform", workdir=str(tmp_path / "work"),
                  out=str(tmp_path / "out"))
    first = seap_pipeline(return_state=True, **kwargs)
    assert (tmp_path / "out" / "results.md").is_file()
    table = (tmp_path / "out" / "results.md").read_text()
    for method in ("dense", "seap-expert", "seap-general", "wanda-sp", "flap"):
        assert f"| {method} |" in table
    assert first.is_completed()
    second = task_states(seap_pipeline(return_state=True, **kwargs))
    assert all(state == "Cached" for name, state in second.items() if not name.startswith("model")), second

"""The prune flow on the real Prefect engine (a temporary local server, results in tmp)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import SENTENCES, make_tiny_model
from tests.helpers_flows import task_states


def test_prune_flow_caches_across_runs_and_reruns_only_downstream(prefect_env, tmp_path) -> None:
    from flows.prune import prune_flow
    from seap.model.checkpoint import load_pruned

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

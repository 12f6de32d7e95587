"""The single-artifact commands (seap corpus, stats, scores, masks) and the one-shot prune's
reading of the method table."""

from __future__ import annotations

import pytest

from seap.errors import SeapError
from seap.run.commands import make_corpus, make_mask, make_scores, make_statistics, resolve_method
from tests.helpers import make_tiny_model
from tests.helpers_tasks import make_task_dir


def test_artifact_commands_chain(tmp_path) -> None:
    from seap.data.catalogue import TaskCatalogue
    from seap.maths.masks import PruningMask

    data = make_task_dir(tmp_path / "data")
    specs = TaskCatalogue(data, tmp_path / "w").resolve(["geo", "life"])
    records = tmp_path / "records.jsonl"
    records.write_text("".join(
        __import__("json").dumps({**r, "task": s.name}) + "\n" for s in specs for r in s.calibration_records()))
    corpora = make_corpus(str(records), tmp_path / "corpus.jsonl", samples=20)
    assert {t: len(c) for t, c in corpora.items()} == {"geo": 20, "life": 20}
    loaded = make_tiny_model("llama-gqa")
    stats = make_statistics(loaded, tmp_path / "corpus.jsonl", tmp_path / "stats", progress=False)
    for task, path in stats.items():
        make_scores(path, tmp_path / "scores" / task)
    mask = make_mask([tmp_path / "scores" / "geo"], tmp_path / "masks" / "geo", 0.2, "uniform",
                     bias_stats_dir=stats["geo"], method="flap")
    assert mask.meta["method"] == "flap" and PruningMask.load(tmp_path / "masks" / "geo").has_bias_compensation
    general = make_mask([tmp_path / "scores" / t for t in ("geo", "life")], tmp_path / "masks" / "general", 0.2,
                        "uniform", general=True)
    assert general.meta["kind"] == "general" and not general.has_bias_compensation
    with pytest.raises(SeapError, match="several scores folders"):
        make_mask([tmp_path / "scores" / t for t in ("geo", "life")], tmp_path / "masks" / "x", 0.2, "uniform")


@pytest.mark.parametrize("method, tasks, expected", [
    ("seap", 1, ("seap-expert", "seap-sf", "logistic", False)),
    ("seap", 3, ("seap-general", "seap-sf", "logistic", False)),
    ("flap", 3, ("flap", "flap", "flap-adaptive", True)),
    ("wanda-sp", 1, ("wanda-sp", "wanda-sp", "uniform", False)),
    ("flap+logistic", 2, ("flap+logistic", "flap", "logistic", True)),
])
def test_prune_methods_come_from_the_method_table(method, tasks, expected) -> None:
    entry, score, schedule, bias = resolve_method(method, tasks)
    assert (entry.name, score, schedule, bias) == expected


def test_prune_overrides_and_bad_methods() -> None:
    _, score, schedule, bias = resolve_method("flap", 2, schedule="uniform", bias_compensation=False)
    assert (score, schedule, bias) == ("flap", "uniform", False)
    with pytest.raises(SeapError, match="unknown method 'sparsegpt'"):
        resolve_method("sparsegpt", 1)
    with pytest.raises(SeapError, match="builds no mask"):
        resolve_method("seap-routed", 2)

"""The single-artifact commands (seap corpus, stats, scores, masks) and the one-shot prune's
reading of the method table."""

from __future__ import annotations

import pytest

from seap.errors import SeapError
from seap.run.commands import make_corpus, make_mask, make_scores, make_statistics
from seap.run.job_params import MaskParams
from seap.run.oneshot import prune_config
from seap.run.plan import make_prune_plan
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
    expert = MaskParams(method="flap", row="flap@0.2", mask="geo", kind="expert", sparsity=0.2, score="flap",
                        schedule="uniform")
    mask = make_mask([tmp_path / "scores" / "geo"], tmp_path / "masks" / "geo", expert, bias_stats_dir=stats["geo"])
    assert mask.meta["method"] == "flap" and PruningMask.load(tmp_path / "masks" / "geo").has_bias_compensation
    general = MaskParams(method="seap-general", row="seap-general@0.2", mask="general", kind="general", sparsity=0.2,
                         score="seap-sf", schedule="uniform")
    mask = make_mask([tmp_path / "scores" / t for t in ("geo", "life")], tmp_path / "masks" / "general", general)
    assert mask.meta["kind"] == "general" and not mask.has_bias_compensation
    with pytest.raises(SeapError, match="several scores folders"):
        make_mask([tmp_path / "scores" / t for t in ("geo", "life")], tmp_path / "masks" / "x", expert)


@pytest.mark.parametrize("method, tasks, expected", [
    ("seap", ["capitals"], ("seap-expert", "seap-sf", "logistic", False)),
    ("seap", ["capitals", "antonyms", "sentiment"], ("seap-general", "seap-sf", "logistic", False)),
    ("flap", ["capitals", "antonyms"], ("flap", "flap", "flap-adaptive", True)),
    ("wanda-sp", ["capitals"], ("wanda-sp", "wanda-sp", "uniform", False)),
    ("flap+logistic", ["capitals", "antonyms"], ("flap+logistic", "flap", "logistic", True)),
])
def test_prune_methods_come_from_the_method_table(method, tasks, expected) -> None:
    """A one-shot prune plans one mask job whose method, score, schedule and bias compensation
    are the method table's (without reconstruction, which replaces the compensation)."""
    config, names = prune_config("smollm2-135m", "builtin", 0.3, method, tasks, samples=10, reconstruct=False)
    assert names == tasks
    plan = make_prune_plan(config, "builtin")
    (mask,) = plan.of_stage("masks")
    p = mask.params
    assert (p.method, p.score, p.schedule, p.bias_compensation) == expected
    assert [j.stage for j in plan.jobs][-2:] == ["masks", "checkpoint"]


def test_prune_overrides_and_bad_methods() -> None:
    config, _ = prune_config("smollm2-135m", "builtin", 0.3, "seap", ["capitals"], samples=10, score="wanda-sp",
                             schedule="uniform", bias_compensation=True)
    (mask,) = make_prune_plan(config, "builtin").of_stage("masks")
    assert (mask.params.score, mask.params.schedule, mask.params.bias_compensation, mask.params.refit) == \
        ("wanda-sp", "uniform", True, None)  # asking for bias compensation turns the refit off
    with pytest.raises(SeapError, match="flap has its own schedule"):
        prune_config("smollm2-135m", "builtin", 0.3, "flap", ["capitals"], schedule="uniform")
    with pytest.raises(SeapError, match="unknown method 'sparsegpt'"):
        prune_config("smollm2-135m", "builtin", 0.3, "sparsegpt", ["capitals"])
    with pytest.raises(SeapError, match="builds no mask"):
        prune_config("smollm2-135m", "builtin", 0.3, "seap-routed", ["capitals", "antonyms"])
    with pytest.raises(SeapError, match="an expert is built from one task"):
        prune_config("smollm2-135m", "builtin", 0.3, "seap-expert", ["capitals", "antonyms"])

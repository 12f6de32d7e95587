import json

from seap.run.stages import evaluate_stage, mask_stage, scores_stage, stats_stage, task_corpus_stage
from tests.helpers import make_tiny_model
from tests.helpers_tasks import make_task_dir


def test_registry_stages_write_corpus_and_rows(tmp_path) -> None:
    data = make_task_dir(tmp_path / "data")
    loaded = make_tiny_model("llama-gqa")
    corpora = task_corpus_stage(["geo", "life"], tmp_path / "corpus.jsonl", data, samples=20, work_dir=tmp_path / "w")
    assert {t: len(c) for t, c in corpora.items()} == {"geo": 20, "life": 20}
    stats = stats_stage(loaded, tmp_path / "corpus.jsonl", tmp_path / "stats", progress=False)
    for task, path in stats.items():
        scores_stage(path, tmp_path / "scores" / task)
    mask_stage([tmp_path / "scores" / "geo"], tmp_path / "masks" / "geo", 0.2, "uniform")
    mask_stage([tmp_path / "scores" / "life"], tmp_path / "masks" / "life", 0.2, "uniform")
    dense = evaluate_stage(loaded, ["geo", "life"], tmp_path / "dense.json", data_dir=data, limit=4,
                           work_dir=tmp_path / "w")
    experts = evaluate_stage(loaded, ["geo", "life"], tmp_path / "experts.json", "seap-expert", 0.2,
                             {"geo": tmp_path / "masks" / "geo", "life": tmp_path / "masks" / "life"}, data_dir=data,
                             limit=4, work_dir=tmp_path / "w")
    assert dense["realised_sparsity"] == 0 and 0.15 < experts["realised_sparsity"] < 0.25
    written = json.loads((tmp_path / "experts.json").read_text())
    assert set(written["tasks"]) == {"geo", "life"} and set(written["masks"]) == {"geo", "life"}

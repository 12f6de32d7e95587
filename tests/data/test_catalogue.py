import json

import pytest

from seap.errors import SeapError
from seap.data.catalogue import TaskCatalogue
from tests.helpers_tasks import make_piqa_dir, make_task_dir, write_jsonl


def test_resolution_of_each_source(tmp_path) -> None:
    data = make_piqa_dir(make_task_dir(tmp_path / "data"))
    reg = TaskCatalogue(data, tmp_path / "work")
    specs = {s.name: s for s in reg.resolve(["capitals", "geo", "piqa", "hub:boolq", "jsonl:life"])}
    assert specs["capitals"].source == "starter" and specs["geo"].source == "jsonl"
    assert specs["piqa"].source == "local" and specs["piqa"].eval_split == "validation"
    assert specs["boolq"].source == "hub" and specs["life"].source == "jsonl"
    yaml = (reg.yaml_dir / "piqa_seap_local.yaml").read_text()
    assert "lm_eval/tasks/piqa/piqa.yaml" in yaml and str(data / "piqa" / "validation.jsonl") in yaml
    # calibration comes from train, evaluation from validation: disjoint records
    calib = {json.dumps(r, sort_keys=True) for r in specs["geo"].calibration_records()}
    evaluation = {line for line in (data / "geo" / "validation.jsonl").read_text().splitlines()}
    assert calib and not calib & {json.dumps(json.loads(x), sort_keys=True) for x in evaluation}
    assert len(specs["capitals"].calibration_records()) >= 200


def test_local_task_uses_lm_eval_prompts(tmp_path) -> None:
    from lm_eval.tasks import get_task_dict

    reg = TaskCatalogue(make_piqa_dir(tmp_path / "data"), tmp_path / "work")
    spec = reg.resolve_one("local:piqa")
    task = get_task_dict([spec.lm_eval_task], reg.task_manager())[spec.lm_eval_task]
    doc = next(iter(task.validation_docs()))
    assert task.doc_to_text(doc) == f"Question: {doc['goal']}\nAnswer:"  # the standard PIQA prompt


@pytest.mark.parametrize("setup, name, message", [
    (lambda d: None, "nosuchtask", "unknown task 'nosuchtask'"),
    (lambda d: None, "ftp:piqa", "unknown task source 'ftp'"),
    (lambda d: (d / "geo" / "validation.jsonl").unlink(), "geo", "no validation or test split"),
    (lambda d: (d / "geo" / "train.jsonl").unlink(), "geo", "no train split"),
    (lambda d: write_jsonl(d / "geo" / "validation.jsonl", [{"prompt": "x", "label": 1}]), "geo", "not a multiple-choice record"),
    (lambda d: write_jsonl(d / "geo" / "validation.jsonl", [{"question": "x", "choices": ["a"], "answer": 0}]), "geo",
     r"needs 2\+ choices"),
    (lambda d: (d / "geo" / "validation.jsonl").write_text(""), "geo", "holds no records"),
    (lambda d: write_jsonl(d / "piqa" / "validation.jsonl", [{"question": "x", "choices": ["a", "b"], "answer": 0}]),
     "piqa", "do not match task 'piqa'"),
    (lambda d: (d / "piqa" / "train.jsonl").unlink(), "local:piqa", "no train split"),
])
def test_bad_task_input(tmp_path, setup, name, message) -> None:
    data = make_piqa_dir(make_task_dir(tmp_path / "data"))
    setup(data)
    with pytest.raises(SeapError, match=message):
        TaskCatalogue(data, tmp_path / "work").resolve([name])


def test_duplicate_and_missing_data_dir(tmp_path) -> None:
    with pytest.raises(SeapError, match="named twice"):
        TaskCatalogue(None, tmp_path).resolve(["capitals", "starter:capitals"])
    with pytest.raises(SeapError, match="does not exist"):
        TaskCatalogue(tmp_path / "nope", tmp_path)
    with pytest.raises(SeapError, match="needs a data folder"):
        TaskCatalogue(None, tmp_path).resolve(["local:piqa"])

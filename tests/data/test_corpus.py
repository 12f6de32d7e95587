import json

import pytest

from seap.data.corpus import build_corpus, knowledge_sentence, read_corpus, read_records, write_corpus
from seap.errors import SeapError
from seap.data.corpus import build_corpora
from seap.data.starter import STARTER_TASKS, starter_records


@pytest.mark.parametrize("record, expected", [
    ({"question": "The capital of France is", "choices": ["Rome", "Paris"], "answer": 1}, "The capital of France is Paris"),
    ({"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat it", "label": 0}, "Open a jar twist the lid"),
    ({"passage": "Water boils at 100 C.", "question": "does water boil at 100 c", "label": 1},
     "Water boils at 100 C. Does water boil at 100 c? Yes"),
    ({"question": "Sky color?", "choices": {"text": ["green", "blue"], "label": ["A", "B"]}, "answerKey": "B"}, "Sky color? blue"),
    ({"question_stem": "Plants need", "choices": {"text": ["light", "rock"], "label": ["A", "B"]}, "answerKey": "A",
      "fact1": "plants use sunlight"}, "Plants use sunlight. Plants need light"),
    ({"sentence": "Anna gave _ a book.", "option1": "Bob", "option2": "it", "answer": "1"}, "Anna gave Bob a book."),
    ({"question": "2+2?", "answer": "2+2=<<2+2=4>>4 #### 4"}, "2+2? 2+2=<<2+2=4>>4 #### 4"),
    ({"text": "plain text"}, "plain text"),
])
def test_knowledge_sentences(record, expected) -> None:
    assert knowledge_sentence(record) == expected


def test_sampling_is_seeded_and_capped() -> None:
    records = [{"text": f"sentence {i}"} for i in range(50)]
    a = build_corpus(records, "t", n_samples=10, seed=1)
    b = build_corpus(records, "t", n_samples=10, seed=1)
    c = build_corpus(records, "t", n_samples=10, seed=2)
    assert a.texts == b.texts != c.texts and len(a) == 10
    assert a.digest() == b.digest() != c.digest()
    assert len(build_corpus(records, "t", n_samples=500)) == 50


def test_corpus_file_roundtrip(tmp_path) -> None:
    corpora = build_corpora("builtin", ["capitals", "arithmetic"], samples=20, seed=0)
    write_corpus(tmp_path / "c.jsonl", corpora, max_tokens=64)
    again, header = read_corpus(tmp_path / "c.jsonl")
    assert header["max_tokens"] == 64
    assert {t: c.digest() for t, c in again.items()} == {t: c.digest() for t, c in corpora.items()}


def test_starter_suite_is_deterministic_and_disjoint() -> None:
    for task in STARTER_TASKS:
        calib = starter_records(task, "calibration")
        evaluation = starter_records(task, "evaluation")
        assert len(calib) >= 200 and len(evaluation) >= 200
        assert calib == starter_records(task, "calibration")
        assert not {r["question"] for r in calib} & {r["question"] for r in evaluation}


@pytest.mark.parametrize("content, message", [
    ("", "holds no records"),
    ("\n\n", "holds no records"),
    ('{"question": "x"\n', "line 1: not valid JSON"),
    ('[1, 2]\n', "expected a JSON object"),
    ('{"foo": 1}\n', "matches no known schema"),
    ('{"question": "q", "choices": ["a"], "answer": 3}\n', "line 1: field 'answer' is 3, outside the 1 choices"),
    ('{"text": null}\n', "line 1: field 'text' must be a string, got null"),
    ('{"text": "ok"}\n{"question": "q", "choices": "ab", "answer": 0}\n', "line 2: field 'choices' must be a non-empty list"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 1.7}\n', "field 'answer' must be a whole-number index"),
    ('{"question": "q", "choices": ["a", "b"], "answer": "b"}\n', "field 'answer' must be a whole-number index"),
    ('{"text": "   "}\n', "no non-empty calibration text"),
])
def test_malformed_calibration_files(tmp_path, content, message) -> None:
    path = tmp_path / "calib.jsonl"
    path.write_text(content)
    with pytest.raises(SeapError, match=message):
        build_corpora(str(path))


def test_unknown_task_and_bad_names(tmp_path) -> None:
    path = tmp_path / "calib.jsonl"
    path.write_text(json.dumps({"task": "a", "text": "x"}) + "\n")
    with pytest.raises(SeapError, match=r"task\(s\) \['b'\] not found"):
        build_corpora(str(path), ["b"])
    with pytest.raises(SeapError, match="invalid task name"):
        build_corpus([{"text": "x"}], "../evil")
    with pytest.raises(SeapError, match="not found"):
        read_records(tmp_path / "missing.jsonl")

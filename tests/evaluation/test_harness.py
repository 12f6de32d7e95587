import math

import pytest
import torch

from seap.errors import SeapError
from seap.evaluation.harness import evaluate, perplexity, training_prompts
from seap.model.masking import apply_mask
from seap.data.catalogue import TaskCatalogue
from tests.helpers import SENTENCES, make_tiny_model
from tests.helpers_tasks import direct_mc_accuracy, make_task_dir
from tests.model.test_surgery import mask_for


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return TaskCatalogue(make_task_dir(root / "data"), root / "work")


def test_in_memory_evaluation_dense_soft_hard(registry) -> None:
    loaded = make_tiny_model("llama-gqa")
    specs = registry.resolve(["geo", "life"])
    dense = evaluate(loaded, registry, specs, limit=8, batch_size=4)
    assert set(dense["tasks"]) == {"geo", "life"}
    for spec in specs:  # the numbers of a direct computation on the same 8 items
        task = dense["tasks"][spec.name]
        assert task["n"] == 8 and task["num_fewshot"] == 0
        direct = direct_mc_accuracy(loaded, spec.eval_file, limit=8)
        assert (task["acc"], task["acc_norm"]) == pytest.approx((direct["acc"], direct["acc_norm"]), abs=1e-12)
    assert dense["lm_eval_version"] == "0.4.13" and dense["data_fingerprint"].startswith("sha256:")
    mask = mask_for(loaded, 0.4)
    soft = evaluate(apply_mask(loaded, mask, "soft"), registry, specs, limit=8, batch_size=4)
    hard = evaluate(apply_mask(loaded, mask, "hard"), registry, specs, limit=8, batch_size=4)
    pruned = apply_mask(loaded, mask, "hard")
    for spec in specs:  # same logits, same answers, and those of a direct computation on the pruned model
        assert soft["tasks"][spec.name]["acc"] == hard["tasks"][spec.name]["acc"]
        assert hard["tasks"][spec.name]["acc"] == pytest.approx(direct_mc_accuracy(pruned, spec.eval_file, 8)["acc"])
    assert hard["model_fingerprint"] != dense["model_fingerprint"]


def test_evaluation_on_a_starter_task() -> None:
    reg = TaskCatalogue()
    loaded = make_tiny_model("qwen2")
    result = evaluate(loaded, reg, reg.resolve(["sentiment"]), limit=6)
    assert result["tasks"]["sentiment"]["n"] == 6 and result["tasks"]["sentiment"]["source"] == "starter"


def test_bad_evaluation_arguments(registry) -> None:
    loaded = make_tiny_model("llama-gqa")
    with pytest.raises(SeapError, match="limit must be at least 1"):
        evaluate(loaded, registry, registry.resolve(["geo"]), limit=0)
    with pytest.raises(SeapError, match="not multiple-choice"):
        evaluate(loaded, registry, registry.resolve(["hub:wikitext"]))


def test_perplexity_matches_direct_computation() -> None:
    loaded = make_tiny_model("llama-mha")
    text = " ".join(SENTENCES * 3)
    result = perplexity(loaded, text, context_length=16, stride=16, progress=False)
    ids = torch.tensor(loaded.tokenizer(text)["input_ids"])
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 16):
            window = ids[start : start + 16]
            if len(window) < 2:
                continue
            logits = loaded.model(input_ids=window[None]).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
            count += len(window) - 1
    assert result["tokens_scored"] == count
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    strided = perplexity(loaded, text, context_length=16, stride=8, progress=False)
    assert strided["tokens_scored"] == len(ids) - 1  # overlapping windows score every token once


def test_training_prompts_come_from_train_split(registry) -> None:
    specs = registry.resolve(["geo", "life"])
    prompts = training_prompts(registry, specs, per_task=10, seed=0)
    train_questions = {r["question"] for r in specs[0].calibration_records()}
    assert len(prompts["geo"]) == 10 and set(prompts["geo"]) <= train_questions


def test_unreachable_hub_task_gives_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    reg = TaskCatalogue()
    with pytest.raises(SeapError, match="could not load hub task"):
        evaluate(make_tiny_model("llama-gqa"), reg, reg.resolve(["hub:piqa"]), limit=2)

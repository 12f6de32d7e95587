import random

import pytest
import torch

from seap.errors import ArtifactError, ModelMismatchError, SeapError
from seap.evaluation.router import Router, featurize, train_router
from tests.helpers import make_tiny_model
from tests.helpers_tasks import GEO, LIFE


def toy_prompts(n=40, seed=0):
    rng = random.Random(seed)
    make = lambda words: [" ".join(rng.choice(words) for _ in range(rng.randint(3, 8))) for _ in range(n)]  # noqa: E731
    return {"geo": make(GEO), "life": make(LIFE)}


def test_features_are_mean_pooled_embeddings() -> None:
    loaded = make_tiny_model("llama-gqa")
    texts = ["paris france", "water hot low little"]
    feats = featurize(loaded, texts, 0)
    for text, row in zip(texts, feats):
        ids = torch.tensor(loaded.tokenizer(text)["input_ids"])
        expected = loaded.model.get_input_embeddings()(ids).mean(0)
        torch.testing.assert_close(row, expected.detach())
    deep = featurize(loaded, texts, 2)
    assert deep.shape == feats.shape and not torch.allclose(deep, feats)


@pytest.mark.parametrize("layer", [0, 3])
def test_router_learns_separable_tasks(tmp_path, layer) -> None:
    loaded = make_tiny_model("llama-gqa")
    router = train_router(loaded, toy_prompts(), feature_layer=layer)
    assert router.meta["heldout_accuracy"] >= 0.9
    assert set(router.meta["heldout_accuracy_per_task"]) == {"geo", "life"}
    decisions = router.route(loaded, ["rome italy capital city", "people work every day"])
    assert [d.task for d in decisions] == ["geo", "life"]
    router.save(tmp_path / "r")
    again = Router.load(tmp_path / "r")
    feats = featurize(loaded, ["paris rome"], layer)
    torch.testing.assert_close(again.probabilities(feats), router.probabilities(feats))
    assert again.tasks == ["geo", "life"] and again.feature_layer == layer


def test_threshold_returns_none() -> None:
    loaded = make_tiny_model("llama-gqa")
    router = train_router(loaded, toy_prompts())
    assert all(d.task is None for d in router.route(loaded, ["paris france"], threshold=1.01))


def test_router_for_other_model_or_tasks(tmp_path) -> None:
    loaded = make_tiny_model("llama-gqa")
    router = train_router(loaded, toy_prompts())
    with pytest.raises(ModelMismatchError, match="router was trained on base model"):
        router.check_model(make_tiny_model("llama-gqa", seed=5).fingerprint)
    with pytest.raises(SeapError, match="trained for tasks"):
        router.check_tasks(["geo", "sports"])
    router.save(tmp_path / "r")
    (tmp_path / "r" / "router.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="corrupt"):
        Router.load(tmp_path / "r")


def test_router_needs_two_tasks_and_enough_prompts() -> None:
    loaded = make_tiny_model("llama-gqa")
    with pytest.raises(SeapError, match="at least two tasks"):
        train_router(loaded, {"geo": ["paris"] * 10})
    with pytest.raises(SeapError, match="only 2 router prompts"):
        train_router(loaded, {"geo": ["paris"] * 10, "life": ["water", "hot"]})

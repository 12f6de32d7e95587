import pytest

from seap.errors import ModelMismatchError, SeapError
from seap.evaluation.harness import evaluate_lm
from seap.maths.masks import build_mask
from seap.evaluation.router import train_router
from seap.evaluation.routed import GENERAL, ExpertBank, RoutedModel, make_routed_lm, routing_summary
from seap.maths.scores import combine_scores, compute_scores
from seap.data.catalogue import TaskCatalogue
from tests.helpers import make_tiny_model
from tests.helpers_tasks import make_task_dir
from tests.evaluation.test_router import toy_prompts


@pytest.fixture(scope="module")
def setup():
    from seap.model.calibration import collect_statistics
    from seap.data.corpus import build_corpus

    loaded = make_tiny_model("llama-gqa")
    prompts = toy_prompts()
    scores = {t: compute_scores(collect_statistics(loaded, build_corpus([{"text": x} for x in p], t, None), progress=False))
              for t, p in prompts.items()}
    experts = {t: build_mask(s, 0.4, "uniform") for t, s in scores.items()}
    general = build_mask(combine_scores(list(scores.values())), 0.4, "uniform")
    router = train_router(loaded, prompts)
    return loaded, experts, general, router


def test_bank_derives_and_caches_experts(setup) -> None:
    loaded, experts, general, _ = setup
    bank = ExpertBank(loaded, experts, general, cache_size=2)
    a = bank.get("geo")
    assert bank.get("geo") is a and bank.materialisations["geo"] == 1
    bank.get("life")
    bank.get(GENERAL)  # evicts geo (least recently used)
    assert bank.get("geo") is not a and bank.materialisations["geo"] == 2
    assert a.model.model.embed_tokens.weight is loaded.model.model.embed_tokens.weight  # base weights kept once
    with pytest.raises(SeapError, match="no expert 'sports'"):
        bank.get("sports")


def test_routed_generation_uses_the_chosen_expert(setup) -> None:
    loaded, experts, general, router = setup
    routed = RoutedModel(ExpertBank(loaded, experts, general), router)
    out = routed.generate(["rome italy capital city", "people work every day"], max_new_tokens=3)
    assert [o["expert"] for o in out] == ["geo", "life"]
    assert routed.routing_seconds > 0


def test_a_mixed_batch_is_grouped_by_expert_and_answered_in_order(setup) -> None:
    loaded, experts, general, router = setup
    prompts = ["rome italy capital city", "people work every day", "paris france capital", "the man came back home",
               "berlin germany city", "people live in the city and work"]
    bank = ExpertBank(loaded, experts, general, cache_size=1)
    routed = RoutedModel(bank, router)
    batched = routed.generate(prompts, max_new_tokens=4, batch_size=2)
    assert [o["prompt"] for o in batched] == prompts
    one_by_one = [routed.generate([p], max_new_tokens=4)[0] for p in prompts]
    assert [(o["expert"], o["text"]) for o in batched] == [(o["expert"], o["text"]) for o in one_by_one]
    experts_used = {o["expert"] for o in batched}
    assert len(experts_used) == 2
    # one materialisation per expert for the whole batch (cache of 1: grouping is what avoids thrashing)
    bank.materialisations = {name: 0 for name in bank.materialisations}
    routed.generate(prompts, max_new_tokens=2)
    assert all(bank.materialisations[name] <= 1 for name in experts_used)


def test_fallback_below_threshold(setup) -> None:
    loaded, experts, general, router = setup
    routed = RoutedModel(ExpertBank(loaded, experts, general), router, threshold=1.01)
    assert [o["expert"] for o in routed.generate(["paris france"], max_new_tokens=2)] == [GENERAL]
    with pytest.raises(SeapError, match="needs a general mask"):
        RoutedModel(ExpertBank(loaded, experts), router, threshold=0.9)


def test_router_for_other_model_or_tasks_is_refused(setup) -> None:
    loaded, experts, general, router = setup
    with pytest.raises(SeapError, match="trained for tasks"):
        RoutedModel(ExpertBank(loaded, {"geo": experts["geo"]}, general), router)
    other = make_tiny_model("llama-gqa", seed=11)
    with pytest.raises(ModelMismatchError):
        ExpertBank(other, experts, general)


def test_routed_lm_eval_includes_routing(setup, tmp_path) -> None:
    loaded, experts, general, router = setup
    registry = TaskCatalogue(make_task_dir(tmp_path / "data"), tmp_path / "work")
    specs = registry.resolve(["geo", "life"])
    routed = RoutedModel(ExpertBank(loaded, experts, general), router)
    lm = make_routed_lm(routed, {s.lm_eval_task: s.name for s in specs}, batch_size=4)
    result = evaluate_lm(lm, registry, specs, limit=6)
    assert {t["n"] for t in result["tasks"].values()} == {6}
    summary = routing_summary(lm.log, ["geo", "life"])
    assert summary["docs"] == 12 and summary["own_expert_rate"] >= 0.8
    assert set(summary["per_task"]["geo"]["experts"]) <= {"geo", "life", GENERAL}

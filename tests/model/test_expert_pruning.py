"""Mixture-of-experts models (PreMoe's expert pruning in SEAP's engine), on a tiny random model
of every MoE family: router statistics equal a direct computation and merge across shards;
removing experts a given input never selects leaves its logits unchanged; soft equals hard;
retrieval finds each task's pattern; bad input is refused."""

from __future__ import annotations

import pytest
import torch

from seap.data.corpus import CalibrationCorpus
from seap.errors import ModelMismatchError, SeapError, UnsupportedArchitectureError
from seap.maths.expert_selection import (ExpertMask, RouterStatistics, build_expert_mask, nearest_pattern,
                                         pattern_vector)
from seap.model.expert_pruning import (apply_expert_mask, collect_router_statistics, expert_parameters,
                                       model_bytes, routed_experts)
from seap.model.hooks import HookManager, count_hooks
from tests.helpers import MOE_ARCHS, make_tiny_model, make_tiny_moe

CASES = [(arch, norm) for arch in MOE_ARCHS for norm in ((False, True) if arch in ("qwen3_moe", "olmoe") else (False,))]
GEO = ["the capital of france is paris", "what is the capital of germany ? berlin", "rome is the capital city of italy",
       "the city of paris is in france", "capital city berlin germany", "paris france rome italy"]
LIFE = ["is water hot ? no", "the little water was low", "every good man can help",
        "we can find the new work each day", "people like to write and think", "water was hot each day"]


def logits(loaded, text: str = "the capital of france is paris and the man came back") -> torch.Tensor:
    ids = loaded.tokenizer([text], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return loaded.model(input_ids=ids).logits


@pytest.fixture(params=CASES, ids=[f"{a}{'-norm' if n else ''}" for a, n in CASES])
def moe(request):
    arch, normalise = request.param
    return make_tiny_moe(arch, normalise=normalise)


def test_router_statistics_equal_a_direct_computation_on_real_tokens(moe) -> None:
    corpus = CalibrationCorpus("geo", GEO)
    stats = collect_router_statistics(moe, corpus, batch_size=4, progress=False)  # padded batches
    layers = moe.adapter.moe_layers(moe.model)
    assert set(stats.layers) == set(layers) and count_hooks(moe.model) == 0
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    with HookManager() as hooks, torch.no_grad():  # each text alone: no padding at all
        for i, mods in layers.items():
            hooks.add_input_hook(mods.block, lambda _m, x, i=i: seen[i].append(x.reshape(-1, x.shape[-1])))
        for text in GEO:
            moe.model(**moe.tokenizer([text], return_tensors="pt"))
    normalise = moe.adapter.normalises_top_k(moe.model.config)
    for i, mods in layers.items():
        x = torch.cat(seen[i]).to(torch.float64)
        logits_ = x @ mods.router.weight.detach().to(torch.float64).T
        probs = torch.softmax(logits_, dim=-1)
        top, index = torch.topk(probs, mods.router.top_k, dim=-1)
        weights = top / top.sum(-1, keepdim=True) if normalise else top
        s = stats.layers[i]
        assert s.tokens == x.shape[0]
        chosen = torch.zeros_like(probs).scatter_(1, index, 1.0)
        torch.testing.assert_close(s.selected, chosen.sum(0))
        torch.testing.assert_close(s.prob_sum, probs.sum(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s.weight_sum, torch.zeros_like(probs).scatter_(1, index, weights).sum(0),
                                   rtol=1e-5, atol=1e-5)
        top1 = torch.zeros(probs.shape[1], dtype=torch.float64).index_add_(0, logits_.argmax(-1),
                                                                           logits_.max(-1).values)
        torch.testing.assert_close(s.top1_logit_sum, top1, rtol=1e-4, atol=1e-4)
        reap = torch.zeros(probs.shape[1], dtype=torch.float64)
        for t in range(x.shape[0]):
            for slot in range(index.shape[1]):
                e = int(index[t, slot])
                gate, up = (x[t] @ mods.experts.gate_up_proj[e].detach().to(torch.float64).T).chunk(2)
                out = (torch.nn.functional.silu(gate) * up) @ mods.experts.down_proj[e].detach().to(torch.float64).T
                reap[e] += weights[t, slot] * out.norm()
        torch.testing.assert_close(s.reap_sum, reap, rtol=1e-4, atol=1e-4)


def test_shards_merge_to_one_pass(moe) -> None:
    corpus = CalibrationCorpus("geo", GEO)
    whole = collect_router_statistics(moe, corpus, batch_size=2, progress=False)
    parts = [collect_router_statistics(moe, corpus, batch_size=2, shard=(i, 3), progress=False) for i in range(3)]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    for i, layer in whole.layers.items():
        assert merged.layers[i].tokens == layer.tokens
        assert torch.equal(merged.layers[i].selected, layer.selected)  # the routing decisions are the same
        for name in ("prob_sum", "top1_logit_sum", "weight_sum", "reap_sum"):  # float32 passes over other batches
            torch.testing.assert_close(getattr(merged.layers[i], name), getattr(layer, name), rtol=1e-6, atol=1e-6)


def _mask_keeping(moe, keep: dict[int, set[int]]) -> ExpertMask:
    layers = moe.adapter.moe_layers(moe.model)
    flags = {i: torch.tensor([e in keep[i] for e in range(m.num_experts)]) for i, m in layers.items()}
    return ExpertMask(flags, {i: m.router.top_k for i, m in layers.items()},
                      {"base_fingerprint": moe.fingerprint, "task": "test"})


def test_removing_experts_an_input_never_selects_leaves_its_logits_unchanged(moe) -> None:
    text = "the capital of france is paris"
    ids = moe.tokenizer([text], return_tensors="pt")["input_ids"]
    used = routed_experts(moe, ids)
    layers = moe.adapter.moe_layers(moe.model)
    keep = {i: used[i] | set(range(layers[i].router.top_k)) for i in layers}  # at least top-k kept
    assert any(len(k) < layers[i].num_experts for i, k in keep.items())  # something is removed
    hard = apply_expert_mask(moe, _mask_keeping(moe, keep), "hard")
    torch.testing.assert_close(logits(hard, text), logits(moe, text), atol=1e-5, rtol=1e-5)
    pruned = hard.adapter.moe_layers(hard.model)
    assert all(pruned[i].num_experts == len(keep[i]) for i in keep)
    assert model_bytes(hard.model)["parameters"] < model_bytes(moe.model)["parameters"]
    assert all(m.num_experts == 8 for m in moe.adapter.moe_layers(moe.model).values())  # the base is untouched


def test_soft_equals_hard_on_any_input(moe) -> None:
    stats = collect_router_statistics(moe, CalibrationCorpus("geo", GEO), progress=False)
    mask = build_expert_mask(stats, 0.5, "frequency", expert_params=expert_parameters(moe))
    soft, hard = apply_expert_mask(moe, mask, "soft"), apply_expert_mask(moe, mask, "hard")
    text = "she said the sentence was long and the water was low"
    torch.testing.assert_close(logits(soft, text), logits(hard, text), atol=1e-5, rtol=1e-5)
    assert mask.realised_sparsity() == pytest.approx(0.5)
    assert hard.model.config.seap_pruning["unit"] == "experts"


def route_to_first_half(moe, texts: list[str]) -> None:
    """Every MoE layer's router sends each token of ``texts`` to experts 0-3 only: their rows get
    a large push along a direction every one of those tokens projects positively on (a
    least-squares fit of ``x d = 1``), the rows of 4-7 the opposite push. Layer by layer, so each
    router is fitted to the inputs the routers before it produce."""
    layers = moe.adapter.moe_layers(moe.model)
    for i in sorted(layers):
        mods = layers[i]
        seen: list[torch.Tensor] = []
        with HookManager() as hooks, torch.no_grad():
            hooks.add_input_hook(mods.block, lambda _m, x: seen.append(x.reshape(-1, x.shape[-1])))
            for text in texts:
                moe.model(**moe.tokenizer([text], return_tensors="pt"))
        x = torch.cat(seen).to(torch.float64)
        d = torch.linalg.lstsq(x, torch.ones(x.shape[0], 1, dtype=torch.float64)).solution[:, 0]
        assert (x @ d > 0.5).all()  # the premise: one direction separates all of the task's tokens
        push = (20.0 * d).to(mods.router.weight.dtype)
        with torch.no_grad():
            mods.router.weight[:4] += push
            mods.router.weight[4:] -= push


@pytest.mark.parametrize("score", ["tcess", "frequency", "reap"])
def test_each_score_keeps_the_experts_the_task_routes_to(score) -> None:
    """The task's tokens route to experts 0-3 of every layer and never to 4-7: at 50% each score
    keeps exactly the four the task routes to (TCESS too: the routed experts' logits are positive
    here, so its raw-logit quirk, see its docstring, does not arise)."""
    moe = make_tiny_moe("mixtral")
    route_to_first_half(moe, GEO)
    stats = collect_router_statistics(moe, CalibrationCorpus("geo", GEO), progress=False)
    routed = torch.tensor([True] * 4 + [False] * 4)
    for layer in stats.layers.values():  # the premise: 0-3 each selected (and top-1) at least once, 4-7 never
        assert torch.equal(layer.selected > 0, routed) and bool((layer.top1_logit_sum[:4] > 0).all())
    mask = build_expert_mask(stats, 0.5, score)
    assert set(mask.experts) == set(stats.layers)
    for i in stats.layers:
        assert torch.equal(mask.experts[i], routed), (score, i, mask.experts[i])


def test_the_expert_mask_round_trips_and_refuses_another_model(tmp_path) -> None:
    moe = make_tiny_moe("qwen2_moe")
    stats = collect_router_statistics(moe, CalibrationCorpus("geo", GEO), progress=False)
    mask = build_expert_mask(stats, 0.5, "reap")
    mask.save(tmp_path / "experts")
    again = ExpertMask.load(tmp_path / "experts")
    assert again.digest() == mask.digest() and again.top_k == mask.top_k
    other = make_tiny_moe("qwen2_moe", seed=1)
    with pytest.raises(ModelMismatchError, match="was built for base model"):
        apply_expert_mask(other, again)
    with pytest.raises(UnsupportedArchitectureError, match="not a mixture-of-experts model"):
        collect_router_statistics(make_tiny_model("llama-gqa"), CalibrationCorpus("geo", GEO), progress=False)


def test_keeping_fewer_experts_than_top_k_needs_an_explicit_option() -> None:
    moe = make_tiny_moe("olmoe", experts=4, top_k=2)
    stats = collect_router_statistics(moe, CalibrationCorpus("geo", GEO), progress=False)
    with pytest.raises(SeapError, match="(?s)fewer than the router.s top-2.*--allow-k-reduction"):
        build_expert_mask(stats, 0.75)
    with pytest.warns(UserWarning, match="routed to 1 instead of 2"):
        mask = build_expert_mask(stats, 0.75, allow_k_reduction=True)
    with pytest.warns(UserWarning, match="top-k clamped"):
        hard = apply_expert_mask(moe, mask, "hard")
    assert all(m.router.top_k == 1 for m in hard.adapter.moe_layers(hard.model).values())
    torch.testing.assert_close(logits(apply_expert_mask(moe, mask, "soft")), logits(hard), atol=1e-5, rtol=1e-5)


def specialise_first_router(moe) -> None:
    """The synthetic two-task set-up: the first MoE layer's router sends what GEO's tokens look
    like to experts 0-3 and LIFE's to experts 4-7 (as trained MoE routers specialise)."""
    layers = moe.adapter.moe_layers(moe.model)
    first = layers[min(layers)]
    inputs: dict[str, list[torch.Tensor]] = {"geo": [], "life": []}
    with HookManager() as hooks, torch.no_grad():
        for task, texts in (("geo", GEO), ("life", LIFE)):
            hooks.remove_all()
            hooks.add_input_hook(first.block, lambda _m, x, task=task: inputs[task].append(x.reshape(-1, x.shape[-1])))
            for text in texts:
                moe.model(**moe.tokenizer([text], return_tensors="pt"))
    direction = torch.cat(inputs["geo"]).mean(0) - torch.cat(inputs["life"]).mean(0)
    direction = direction / direction.norm()
    with torch.no_grad():
        first.router.weight[:4] += 4 * direction
        first.router.weight[4:] -= 4 * direction


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_retrieval_finds_each_tasks_pattern(arch) -> None:
    """TAER on a synthetic two-task set-up: the stored pattern nearest to a query's is its task's."""
    moe = make_tiny_moe(arch)
    specialise_first_router(moe)
    stored = {task: pattern_vector(collect_router_statistics(moe, CalibrationCorpus(task, texts[:4]), progress=False))
              for task, texts in (("geo", GEO), ("life", LIFE))}
    for task, texts in (("geo", GEO), ("life", LIFE)):
        for text in texts[4:]:  # each held-out input alone
            query = pattern_vector(collect_router_statistics(moe, CalibrationCorpus("query", [text]), progress=False))
            found, confidence, _ = nearest_pattern(query, stored)
            assert found == task and 0.0 < confidence <= 1.0, text


def test_router_statistics_refuse_different_models() -> None:
    a = collect_router_statistics(make_tiny_moe("mixtral"), CalibrationCorpus("geo", GEO), progress=False)
    b = collect_router_statistics(make_tiny_moe("mixtral", seed=1), CalibrationCorpus("life", LIFE), progress=False)
    with pytest.raises(ModelMismatchError):
        a.merge(b)
    assert isinstance(a.merge(a), RouterStatistics) and a.merge(a).layers[0].tokens == 2 * a.layers[0].tokens


def test_the_dense_engine_refuses_an_moe_model_with_what_to_do() -> None:
    from seap.model.calibration import collect_statistics

    with pytest.raises(UnsupportedArchitectureError, match="prune whole experts instead"):
        collect_statistics(make_tiny_moe("qwen3_moe"), CalibrationCorpus("geo", GEO), progress=False)


def test_a_pruned_moe_checkpoint_saves_and_loads_with_identical_logits(moe, tmp_path) -> None:
    """Saved from the model pruned in memory, or written one layer at a time from the base
    checkpoint (read layer by layer, never loaded whole): the same pruned model."""
    from seap.model.checkpoint import load_pruned, save_pruned, write_pruned
    from seap.model.layer_stream import CheckpointLayers

    stats = collect_router_statistics(moe, CalibrationCorpus("geo", GEO), progress=False, channels=True)
    mask = build_expert_mask(stats, 0.5, "reap", expert_params=expert_parameters(moe))
    hard = apply_expert_mask(moe, mask, "hard")
    save_pruned(hard, tmp_path / "pruned")
    again = load_pruned(tmp_path / "pruned", device="cpu")
    assert again.fingerprint == hard.fingerprint
    torch.testing.assert_close(logits(again), logits(hard), atol=0, rtol=0)
    moe.model.save_pretrained(tmp_path / "base")
    moe.tokenizer.save_pretrained(tmp_path / "base")
    source = CheckpointLayers(tmp_path / "base", "cpu", "float32")
    for name, built in (("experts", mask), ("both", build_expert_mask(stats, 0.5, unit="both"))):
        write_pruned(source, built, tmp_path / f"{name}-written", progress=False)
        written = load_pruned(tmp_path / f"{name}-written", device="cpu")
        in_memory = apply_expert_mask(moe, built, "hard")
        assert written.fingerprint == in_memory.fingerprint
        assert written.model.config.seap_pruning["moe_layers"] == in_memory.model.config.seap_pruning["moe_layers"]
        torch.testing.assert_close(logits(written), logits(in_memory), atol=0, rtol=0)
        streamed = CheckpointLayers(tmp_path / f"{name}-written", "cpu", "float32")  # (read layer by layer too)
        assert streamed.fingerprint == written.fingerprint
    ids = again.tokenizer(["the city"], return_tensors="pt")
    out = again.model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out, hard.model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=0))
    assert model_bytes(again.model)["bytes"] < model_bytes(moe.model)["bytes"]


def test_expert_masks_go_wherever_masks_go(tmp_path) -> None:
    """`seap apply`, the shared-base expert bank of routed inference, and the statistics artifact."""
    from seap.cli import main
    from seap.evaluation.routed import ExpertBank
    from seap.maths.mask_formats import load_mask
    from seap.model.checkpoint import load_pruned

    moe = make_tiny_moe("qwen2_moe")
    moe.model.save_pretrained(tmp_path / "base")
    moe.tokenizer.save_pretrained(tmp_path / "base")
    stats = collect_router_statistics(moe, CalibrationCorpus("geo", GEO), progress=False)
    stats.save(tmp_path / "router-geo")
    again = RouterStatistics.load(tmp_path / "router-geo")
    assert again.top_k == stats.top_k and all(
        torch.equal(again.layers[i].reap_sum, stats.layers[i].reap_sum) for i in stats.layers)
    geo = build_expert_mask(again, 0.5, expert_params=expert_parameters(moe))
    geo.save(tmp_path / "mask-geo")
    assert isinstance(load_mask(tmp_path / "mask-geo"), ExpertMask)
    assert main(["--no-progress", "apply", "--model", str(tmp_path / "base"), "--mask", str(tmp_path / "mask-geo"),
                 "--out", str(tmp_path / "pruned")]) == 0
    pruned = load_pruned(tmp_path / "pruned", device="cpu")
    assert main(["--no-progress", "apply", "--model", str(tmp_path / "base"), "--mask", str(tmp_path / "mask-geo"),
                 "--mode", "soft", "--out", str(tmp_path / "soft")]) == 2  # routing-only: not a checkpoint
    assert not (tmp_path / "soft").exists()
    from seap.model.loading import load_model

    base = load_model(str(tmp_path / "base"), device="cpu", dtype="float32")
    torch.testing.assert_close(logits(pruned), logits(apply_expert_mask(base, geo, "hard")), atol=0, rtol=0)
    life = build_expert_mask(collect_router_statistics(base, CalibrationCorpus("life", LIFE), progress=False), 0.5)
    bank = ExpertBank(base, {"geo": load_mask(tmp_path / "mask-geo"), "life": life})
    assert bank.get("life").adapter.moe_layers(bank.get("life").model)[0].num_experts == 4
    assert all(m.num_experts == 8 for m in base.adapter.moe_layers(base.model).values())  # one base, never changed


def test_an_unrecognised_expert_layout_is_refused_by_name() -> None:
    moe = make_tiny_moe("mixtral")
    block = moe.model.model.layers[0].mlp
    block.experts = torch.nn.ModuleList([torch.nn.Linear(64, 64) for _ in range(8)])  # an older layout
    with pytest.raises(UnsupportedArchitectureError, match="unrecognised expert layout.*ModuleList"):
        collect_router_statistics(moe, CalibrationCorpus("geo", GEO), progress=False)


@pytest.mark.parametrize("unit", ["both", "neurons"])
def test_units_both_and_neurons_prune_channels_inside_the_kept_experts(moe, tmp_path, unit) -> None:
    """Channel sums equal a direct computation; ``both`` removes experts and channels, ``neurons``
    channels only (every expert kept); soft equals hard; the pruned checkpoint round-trips."""
    from seap.model.checkpoint import load_pruned, save_pruned

    stats = collect_router_statistics(moe, CalibrationCorpus("geo", GEO), progress=False, channels=True)
    layers = moe.adapter.moe_layers(moe.model)
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    with HookManager() as hooks, torch.no_grad():
        for i, mods in layers.items():
            hooks.add_input_hook(mods.block, lambda _m, x, i=i: seen[i].append(x.reshape(-1, x.shape[-1])))
        for text in GEO:
            moe.model(**moe.tokenizer([text], return_tensors="pt"))
    for i, mods in layers.items():
        x = torch.cat(seen[i]).to(torch.float64)
        _, index = torch.topk(torch.softmax(x @ mods.router.weight.detach().to(torch.float64).T, -1),
                              mods.router.top_k, dim=-1)
        e = int(index[0, 0])
        tokens = (index == e).any(-1)
        gate, up = (x[tokens] @ mods.experts.gate_up_proj[e].detach().to(torch.float64).T).chunk(2, dim=-1)
        h = torch.nn.functional.silu(gate) * up
        torch.testing.assert_close(stats.layers[i].channel_sum[e], h.sum(0), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(stats.layers[i].channel_sq_sum[e], (h * h).sum(0), rtol=1e-4, atol=1e-4)
    stats.save(tmp_path / "stats")
    mask = build_expert_mask(RouterStatistics.load(tmp_path / "stats"), 0.5, unit=unit)
    assert mask.realised_sparsity() == pytest.approx(0.5, abs=0.08)
    assert all(bool(flags.all()) == (unit == "neurons") for flags in mask.experts.values())
    soft, hard = apply_expert_mask(moe, mask, "soft"), apply_expert_mask(moe, mask, "hard")
    torch.testing.assert_close(logits(soft), logits(hard), atol=1e-5, rtol=1e-5)
    kept = {i: int(m.channels[i][m.experts[i]].sum(1)[0]) for m in (mask,) for i in m.experts}
    assert all(hard.adapter.moe_layers(hard.model)[i].expert_intermediate == kept[i] < 32 for i in kept)
    mask.save(tmp_path / "mask")
    assert ExpertMask.load(tmp_path / "mask").digest() == mask.digest()
    save_pruned(hard, tmp_path / "pruned")
    reloaded = load_pruned(tmp_path / "pruned", device="cpu")
    torch.testing.assert_close(logits(reloaded), logits(hard), atol=0, rtol=0)
    assert reloaded.model.config.seap_pruning["unit"] == unit
    assert model_bytes(reloaded.model)["parameters"] < model_bytes(moe.model)["parameters"]

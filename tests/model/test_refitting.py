"""Reconstructed masks on tiny models: better fit, soft equals hard, round trips, refusals, and
the streamed one-shot refit (second moments built one layer at a time while the model is walked)
equal to the refit of second moments computed directly from a full forward."""

from __future__ import annotations

import logging

import pytest
import torch

from seap.data.corpus import CalibrationCorpus, build_corpus, merge_corpora
from seap.errors import ArtifactError, ModelMismatchError, SeapError
from seap.maths.masks import PruningMask, build_mask, full_mask
from seap.maths.moments import SecondMoments
from seap.maths.reconstruction import RefitOptions, refit_layer
from seap.maths.scores import compute_scores
from seap.model.calibration import collect_statistics
from seap.model.checkpoint import load_pruned, save_pruned
from seap.model.hooks import HookManager, count_hooks
from seap.model.refitting import reconstruct_mask, reconstruct_mask_sequential, reconstruct_masks, refit_mask
from seap.model.masking import apply_mask
from seap.tensor_files import LazyTensors
from tests.helpers import ARCHS, SENTENCES, make_tiny_model
from tests.model.test_surgery import logits


@pytest.fixture(scope="module")
def setup():
    loaded = make_tiny_model("llama-gqa")
    corpus = build_corpus([{"text": t} for t in SENTENCES * 6], "toy", None)
    stats = collect_statistics(loaded, corpus, progress=False)
    mask = build_mask(compute_scores(stats, "seap-sf"), 0.4, "uniform", bias_compensation_stats=stats)
    return loaded, corpus, mask


def _dense_error(loaded, pruned) -> float:
    return float(((logits(pruned) - logits(loaded)) ** 2).mean())


@pytest.mark.parametrize("options", [RefitOptions(alpha=1e-2), RefitOptions(alpha=1e-2, bias=True)])
def test_refit_fits_better_and_soft_equals_hard(setup, options: RefitOptions) -> None:
    loaded, corpus, mask = setup
    rebuilt = reconstruct_mask(loaded, mask, [corpus], options, progress=False)
    assert rebuilt.is_reconstructed and not rebuilt.has_bias_compensation
    assert rebuilt.digest() != mask.digest()  # a refitted expert is another model
    for entry in rebuilt.meta["reconstruction"]["layers"]:  # never worse than slicing on the calibration tokens
        for name in ("o", "down"):
            assert entry[f"{name}_error_refit"] <= entry[f"{name}_error_sliced"] + 1e-9
    hard = apply_mask(loaded, rebuilt, "hard")
    soft = apply_mask(loaded, rebuilt, "soft")
    torch.testing.assert_close(logits(soft), logits(hard), rtol=1e-4, atol=1e-4)
    assert hard.model.config.seap_pruning["reconstruction"]["alpha"] == options.alpha
    plain = apply_mask(loaded, mask, "hard", bias_compensation=False)
    assert _dense_error(loaded, hard) < _dense_error(loaded, plain)


def test_nothing_pruned_refits_to_the_dense_model(setup) -> None:
    loaded, corpus, mask = setup
    dense = full_mask(mask.geometry, loaded.fingerprint)
    rebuilt = reconstruct_mask(loaded, dense, [corpus], RefitOptions(alpha=1e-3), progress=False)
    torch.testing.assert_close(logits(apply_mask(loaded, rebuilt, "hard")), logits(loaded), rtol=1e-4, atol=1e-4)


def test_saved_loaded_and_checkpointed(setup, tmp_path) -> None:
    loaded, corpus, mask = setup
    rebuilt = reconstruct_mask(loaded, mask, [corpus], progress=False)
    rebuilt.save(tmp_path / "mask")
    again = PruningMask.load(tmp_path / "mask")
    assert again.is_reconstructed and again.digest() == rebuilt.digest()
    # the refitted weights stay in the file until used, and are copied unread when saved again
    assert all(isinstance(layer.refit, LazyTensors) for layer in again.layers)
    again.save(tmp_path / "copy")
    assert (tmp_path / "copy" / "mask.safetensors").read_bytes() == (tmp_path / "mask" / "mask.safetensors").read_bytes()
    # refitted in a work folder, a walk hands back masks whose refits are read from there
    walked = reconstruct_mask(loaded, mask, [corpus], progress=False, work=tmp_path / "walk")
    assert all(isinstance(layer.refit, LazyTensors) for layer in walked.layers)
    assert walked.digest() == rebuilt.digest()
    hard = apply_mask(loaded, again, "hard")
    torch.testing.assert_close(logits(hard), logits(apply_mask(loaded, rebuilt, "hard")))
    save_pruned(hard, tmp_path / "pruned")
    back = load_pruned(tmp_path / "pruned")
    torch.testing.assert_close(logits(back), logits(hard), rtol=1e-5, atol=1e-5)


def test_refusals(setup, tmp_path, caplog) -> None:
    loaded, corpus, mask = setup
    with pytest.raises(SeapError, match="no calibration text to refit on"):
        reconstruct_mask(loaded, mask, [], progress=False)
    with pytest.raises(SeapError, match="none was given"):
        refit_mask(loaded, mask, RefitOptions(), [], progress=False)
    with pytest.raises(SeapError, match="task 'blank': no calibration text"):
        reconstruct_mask(loaded, mask, [corpus, CalibrationCorpus("blank", [""])], progress=False)
    with pytest.raises(SeapError, match="batch size"):
        reconstruct_mask(loaded, mask, [corpus], batch_size=0, progress=False)
    other = make_tiny_model("llama-gqa", seed=3)
    with pytest.raises(ModelMismatchError):
        reconstruct_mask(other, mask, [corpus], progress=False)
    rebuilt = reconstruct_mask(loaded, mask, [corpus], progress=False)
    assert count_hooks(loaded.model) == 0
    with pytest.raises(ModelMismatchError):
        apply_mask(other, rebuilt)
    with pytest.raises(SeapError, match="already replaces bias compensation"):
        apply_mask(loaded, rebuilt, bias_compensation=True)
    few = build_corpus([{"text": SENTENCES[0]}], "toy", None)
    with pytest.raises(SeapError, match="calibration tokens for"):
        reconstruct_mask(loaded, mask, [few], progress=False)
    with caplog.at_level(logging.WARNING, logger="seap.model.refitting"):
        reconstruct_mask(loaded, mask, [build_corpus([{"text": t} for t in SENTENCES[:4]], "toy", None)],
                         progress=False)
    assert "kept input columns" in caplog.text
    rebuilt.layers[0].refit["down_weight"] = rebuilt.layers[0].refit["down_weight"][:, :3]  # does not match the mask
    with pytest.raises(ArtifactError, match="refitted down_weight has shape"):
        rebuilt.save(tmp_path / "bad") and PruningMask.load(tmp_path / "bad")


def direct_second_moments(loaded, texts) -> list[dict[str, SecondMoments]]:
    """Every layer's second moments of the o_proj / down_proj inputs, computed independently of
    the layer stream: one full forward of the whole model per text (no padding at all), the
    inputs caught by forward-pre-hooks and summed in float64."""
    mods = loaded.adapter.all_layer_modules(loaded.model)
    out = [{"o": SecondMoments.empty(m.o_proj.in_features), "down": SecondMoments.empty(m.down_proj.in_features)}
           for m in mods]

    def add(i: int, name: str, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        out[i][name].update_(SecondMoments(flat.shape[0], flat.T @ flat, flat.sum(dim=0)))

    with HookManager() as hooks, torch.no_grad():
        for i, m in enumerate(mods):
            hooks.add_input_hook(m.o_proj, lambda _m, x, i=i: add(i, "o", x))
            hooks.add_input_hook(m.down_proj, lambda _m, x, i=i: add(i, "down", x))
        for text in texts:
            loaded.model(**loaded.tokenizer(text, return_tensors="pt"))
    return out


def assert_refits_equal(a: PruningMask, b: PruningMask, rtol: float) -> None:
    """The refitted tensors of two masks equal to ``rtol`` (relative to each tensor's largest entry)."""
    for i, (x, y) in enumerate(zip(a.layers, b.layers, strict=True)):
        assert set(x.refit) == set(y.refit)
        for key in x.refit:
            scale = float(y.refit[key].abs().max())
            torch.testing.assert_close(x.refit[key], y.refit[key], rtol=rtol, atol=rtol * scale,
                                       msg=f"layer {i} {key}")


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen3"])
@pytest.mark.parametrize("options", [RefitOptions(alpha=1e-2, bias=True), RefitOptions(alpha=1e-3, bias=False)],
                         ids=["bias", "no-bias"])
def test_the_streamed_refit_equals_refit_layer_on_directly_computed_second_moments(arch, options) -> None:
    """The one-shot refit builds each layer's second moments while it walks the model, uses them
    and frees them: its weights equal, to float64 rounding, `refit_layer` on second moments
    computed directly from full forwards; and the calibration text given in two parts (a task's
    and generic text, each accumulated alone and merged) equals one corpus of both."""
    loaded = make_tiny_model(arch, layers=3, dtype=torch.float64)
    first = build_corpus([{"text": t} for t in SENTENCES[:7] * 2], "toy", None)
    second = build_corpus([{"text": t} for t in SENTENCES[7:]], "generic", None)  # other text: other moments
    mask = build_mask(compute_scores(collect_statistics(loaded, first, progress=False), "seap-sf"), 0.4, "uniform")
    head_dim = loaded.adapter.head_dim(loaded.model.config)
    mods = loaded.adapter.all_layer_modules(loaded.model)
    for parts in ([first], [first, second]):
        streamed = reconstruct_mask(loaded, mask, parts, options, batch_size=5, progress=False)
        direct = direct_second_moments(loaded, [t for c in parts for t in c.texts])
        assert streamed.meta["reconstruction"]["tokens"] == direct[0]["o"].count
        assert streamed.meta["reconstruction"]["statistics_task"] == "+".join(c.task for c in parts)
        for i, (layer, layer_mask) in enumerate(zip(streamed.layers, mask.layers, strict=True)):
            for name, linear, flags in (("o", mods[i].o_proj, layer_mask.heads.repeat_interleave(head_dim)),
                                        ("down", mods[i].down_proj, layer_mask.channels)):
                expected = refit_layer(linear.weight, direct[i][name], torch.nonzero(flags).flatten(), options)
                scale = float(expected.weight.abs().max())
                torch.testing.assert_close(layer.refit[f"{name}_weight"], expected.weight, rtol=1e-10,
                                           atol=1e-10 * scale, msg=f"{arch} layer {i} {name}_weight")
                if options.bias:
                    torch.testing.assert_close(layer.refit[f"{name}_bias"], expected.bias, rtol=1e-10,
                                               atol=1e-10 * float(expected.bias.abs().max()))
                else:
                    assert f"{name}_bias" not in layer.refit
                entry = streamed.meta["reconstruction"]["layers"][i]
                assert entry[f"{name}_error_refit"] == pytest.approx(expected.error_refit, rel=1e-8, abs=1e-12)
    # two parts merged in order equal one corpus of both (other batches: float64 rounding only)
    merged = reconstruct_mask(loaded, mask, [merge_corpora([first, second])], options, batch_size=5, progress=False)
    assert_refits_equal(streamed, merged, 1e-10)
    assert merged.meta["reconstruction"]["tokens"] == streamed.meta["reconstruction"]["tokens"]
    assert count_hooks(loaded.model) == 0


def test_one_walk_refits_every_mask_exactly_as_refitting_it_alone() -> None:
    """`reconstruct_masks` refits several masks (different masks, each on its own parts, some
    sharing parts or a mask, one merging its parts in another order) in one walk: each gets
    exactly (bit for bit) what `reconstruct_mask` gives it alone on its parts in that order."""
    loaded = make_tiny_model("llama-gqa", layers=3)
    geo = build_corpus([{"text": t} for t in SENTENCES[:7] * 2], "geo", None)
    life = build_corpus([{"text": t} for t in SENTENCES[7:] * 2], "life", None)
    generic = build_corpus([{"text": t} for t in SENTENCES[::2]], "generic", None)
    parts = [geo, life, generic]
    stats = {c.task: collect_statistics(loaded, c, progress=False) for c in (geo, life)}
    expert_geo = build_mask(compute_scores(stats["geo"], "seap-sf"), 0.4, "uniform")
    expert_life = build_mask(compute_scores(stats["life"], "seap-sf"), 0.3, "uniform")
    general = build_mask(compute_scores(stats["geo"], "wanda-sp"), 0.5, "uniform")
    assert len({expert_geo.digest(), expert_life.digest(), general.digest()}) == 3  # three different masks
    masks = {"expert/geo": (expert_geo, [0, 2]), "expert/life": (expert_life, [1, 2]),
             "general": (general, [0, 1, 2]), "general/reversed": (general, [1, 0]),
             "expert/geo-on-everything": (expert_geo, [0, 1, 2])}  # (shares the general mask's merge)
    options = RefitOptions(alpha=1e-2, bias=True)
    together = reconstruct_masks(loaded, masks, parts, options, batch_size=5, progress=False)
    assert list(together) == list(masks)
    for name, (mask, used) in masks.items():
        alone = reconstruct_mask(loaded, mask, [parts[k] for k in used], options, batch_size=5, progress=False)
        got = together[name]
        assert got.meta == alone.meta and got.task == alone.task, name
        assert got.meta["reconstruction"]["statistics_task"] == "+".join(parts[k].task for k in used)
        for i, (x, y) in enumerate(zip(got.layers, alone.layers, strict=True)):
            assert torch.equal(x.heads, y.heads) and torch.equal(x.channels, y.channels)
            assert set(x.refit) == set(y.refit) == {"o_weight", "o_bias", "down_weight", "down_bias"}
            for key in x.refit:
                assert torch.equal(x.refit[key], y.refit[key]), f"{name} layer {i} {key}"
        assert got.digest() == alone.digest()
    # the same mask on other text is another refit: each mask really was refitted on its own parts
    assert not torch.equal(together["expert/geo"].layers[0].refit["down_weight"],
                           together["expert/geo-on-everything"].layers[0].refit["down_weight"])
    assert reconstruct_masks(loaded, {}, parts, options, progress=False) == {}
    with pytest.raises(SeapError, match="no calibration text to refit on"):
        reconstruct_masks(loaded, {"bad": (general, [3])}, parts, options, progress=False)
    assert count_hooks(loaded.model) == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_sequential_refit_starts_like_the_one_shot_one_and_fits_the_pruned_stream(arch: str) -> None:
    loaded = make_tiny_model(arch)
    corpus = build_corpus([{"text": t} for t in SENTENCES * 6], "toy", None)
    stats = collect_statistics(loaded, corpus, progress=False)
    mask = build_mask(compute_scores(stats, "seap-sf"), 0.4, "uniform")
    options = RefitOptions(alpha=1e-2, bias=True, sequential=True)
    sequential = reconstruct_mask_sequential(loaded, mask, corpus, options, batch_size=5, progress=False)
    one_shot = reconstruct_mask(loaded, mask, [corpus], RefitOptions(alpha=1e-2, bias=True), batch_size=5,
                                progress=False)
    # layer 0's o_proj sees the same inputs in both streams: the same fit as one-shot (not under OLMo's norm
    # over the whole query projection, where removing heads changes the kept heads' inputs to o_proj)
    if arch not in ("olmo2", "olmo3"):
        torch.testing.assert_close(sequential.layers[0].refit["o_weight"], one_shot.layers[0].refit["o_weight"],
                                   rtol=1e-3, atol=1e-4)
    assert sequential.meta["reconstruction"]["sequential"] is True
    for entry in sequential.meta["reconstruction"]["layers"]:
        for name in ("o", "down"):
            assert entry[f"{name}_error_refit"] <= entry[f"{name}_error_sliced"] + 1e-9
    hard = apply_mask(loaded, sequential, "hard")
    torch.testing.assert_close(logits(apply_mask(loaded, sequential, "soft")), logits(hard), rtol=1e-4, atol=1e-4)
    plain = apply_mask(loaded, mask, "hard", bias_compensation=False)
    assert _dense_error(loaded, hard) < _dense_error(loaded, plain)
    everything = full_mask(stats.geometry, loaded.fingerprint)
    rebuilt = reconstruct_mask_sequential(loaded, everything, corpus, RefitOptions(alpha=1e-4, sequential=True),
                                          progress=False)
    torch.testing.assert_close(logits(apply_mask(loaded, rebuilt, "hard")), logits(loaded), rtol=1e-3, atol=3e-3)
    with pytest.raises(ModelMismatchError):
        reconstruct_mask_sequential(make_tiny_model(arch, seed=3), mask, corpus, options, progress=False)

import numpy as np
import pytest
import torch

from seap.maths.statistics import ActivationStatistics, merge_statistics
from seap.model.calibration import collect_statistics
from seap.data.corpus import build_corpus
from seap.errors import ArtifactError, ModelMismatchError, SeapError
from seap.model.hooks import HookManager, count_hooks
from tests.helpers import SENTENCES, make_tiny_model


def corpus(n: int = len(SENTENCES)):
    return build_corpus([{"text": s} for s in SENTENCES[:n]], "toy", n_samples=None)


def direct_inputs(loaded, texts, max_tokens=None):
    """Inputs of o_proj/down_proj captured one text at a time (no padding at all)."""
    captured = {}
    mods = loaded.adapter.all_layer_modules(loaded.model)
    with HookManager() as hooks, torch.no_grad():
        for i, m in enumerate(mods):
            hooks.add_input_hook(m.o_proj, lambda mod, x, i=i: captured.setdefault((i, "attn"), []).append(x[0]))
            hooks.add_input_hook(m.down_proj, lambda mod, x, i=i: captured.setdefault((i, "mlp"), []).append(x[0]))
        for text in texts:
            ids = loaded.tokenizer(text, return_tensors="pt", truncation=max_tokens is not None, max_length=max_tokens)
            loaded.model(**ids)
    return {k: torch.cat(v).double().numpy() for k, v in captured.items()}


def test_statistics_equal_direct_computation(tiny) -> None:
    c = corpus()
    stats = collect_statistics(tiny, c, batch_size=5, progress=False)  # batches mix lengths -> padding
    ref = direct_inputs(tiny, c.texts)
    n_tokens = sum(len(tiny.tokenizer(t)["input_ids"]) for t in c.texts)
    assert stats.num_tokens == n_tokens
    for i, layer in enumerate(stats.layers):
        for module in ("attn", "mlp"):
            x = ref[(i, module)]
            m = getattr(layer, module)
            assert m.count == x.shape[0]
            np.testing.assert_allclose(m.mean.numpy(), x.mean(0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(m.variance.numpy(), x.var(0), rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(m.mean_sq.numpy(), (x ** 2).mean(0), rtol=1e-4, atol=1e-7)
    assert count_hooks(tiny.model) == 0


def test_token_cap_truncates() -> None:
    loaded = make_tiny_model("llama-gqa")
    capped = collect_statistics(loaded, corpus(), max_tokens=3, progress=False)
    assert capped.num_tokens == sum(min(3, len(loaded.tokenizer(t)["input_ids"])) for t in corpus().texts)


def test_shards_merge_to_single_pass(tmp_path) -> None:
    loaded = make_tiny_model("llama-gqa")
    c = corpus()
    single = collect_statistics(loaded, c, batch_size=4, progress=False)
    shards = [collect_statistics(loaded, c, batch_size=3, shard=(i, 3), progress=False) for i in range(3)]
    for i, s in enumerate(shards):  # through disk, as a sharded pipeline would
        s.save(tmp_path / f"s{i}")
    merged = merge_statistics([ActivationStatistics.load(tmp_path / f"s{i}") for i in range(3)])
    assert merged.num_tokens == single.num_tokens
    for a, b in zip(single.layers, merged.layers):
        for module in ("attn", "mlp"):
            ma, mb = getattr(a, module), getattr(b, module)
            # batch moments are float32 (merged in float64), so shards agree to float32 rounding
            torch.testing.assert_close(ma.mean, mb.mean, rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(ma.m2, mb.m2, rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(ma.mean_sq, mb.mean_sq, rtol=1e-5, atol=1e-8)


def test_hooks_removed_when_forward_fails() -> None:
    loaded = make_tiny_model("llama-mha")
    layer = loaded.adapter.decoder_layers(loaded.model)[2]
    original = layer.forward

    def broken(*args, **kwargs):
        raise RuntimeError("layer exploded")

    layer.forward = broken
    with pytest.raises(RuntimeError, match="layer exploded"):
        collect_statistics(loaded, corpus(), progress=False)
    layer.forward = original
    assert count_hooks(loaded.model) == 0


def test_save_load_roundtrip_and_corruption(tmp_path) -> None:
    loaded = make_tiny_model("qwen2")
    stats = collect_statistics(loaded, corpus(4), progress=False)
    stats.save(tmp_path / "st")
    again = ActivationStatistics.load(tmp_path / "st")
    assert again.fingerprint == loaded.fingerprint and again.task == "toy" and again.num_tokens == stats.num_tokens
    assert again.meta["corpus_digest"] == corpus(4).digest()
    torch.testing.assert_close(again.layers[1].mlp.m2, stats.layers[1].mlp.m2)
    with pytest.raises(SeapError, match="already exists"):
        stats.save(tmp_path / "st")
    blob = tmp_path / "st" / "stats.safetensors"
    blob.write_bytes(blob.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="corrupt"):
        ActivationStatistics.load(tmp_path / "st")


def test_merge_refuses_other_models() -> None:
    a = collect_statistics(make_tiny_model("llama-gqa", seed=1), corpus(3), progress=False)
    b = collect_statistics(make_tiny_model("llama-gqa", seed=2), corpus(3), progress=False)
    with pytest.raises(ModelMismatchError):
        merge_statistics([a, b])


def test_bad_arguments() -> None:
    loaded = make_tiny_model("llama-gqa")
    with pytest.raises(SeapError, match="batch size"):
        collect_statistics(loaded, corpus(), batch_size=0, progress=False)
    with pytest.raises(SeapError, match="shard"):
        collect_statistics(loaded, corpus(), shard=(3, 3), progress=False)


def test_second_moments_equal_direct_computation_in_one_pass_or_several(tmp_path) -> None:
    loaded = make_tiny_model("llama-gqa")
    c = corpus()
    ref = direct_inputs(loaded, c.texts)
    plain = collect_statistics(loaded, c, batch_size=5, progress=False)
    assert not plain.has_second_moments and "second_moments" not in plain.meta
    one = collect_statistics(loaded, c, batch_size=5, progress=False, second_moments=True)
    per_layer = (64 * 64 + 96 * 96) * 12  # this model's accumulators of one layer (float64 totals + float32 block)
    several = collect_statistics(loaded, c, batch_size=5, progress=False, second_moments=True,
                                 second_moment_budget=2 * per_layer)  # two layers per pass: 3 passes
    assert one.meta["second_moments"]["passes"] == 1 and several.meta["second_moments"]["passes"] == 3
    assert one.has_second_moments and several.has_second_moments
    for i, (a, b) in enumerate(zip(one.layers, several.layers, strict=True)):
        for module in ("attn", "mlp"):
            x = torch.from_numpy(ref[(i, module)])
            sa, sb = a.second(module), b.second(module)
            assert sa.count == sb.count == x.shape[0] == getattr(a, module).count
            torch.testing.assert_close(sa.gram, x.T @ x, rtol=1e-4, atol=1e-5)  # padding excluded
            torch.testing.assert_close(sb.gram, sa.gram)
            torch.testing.assert_close(sa.total, x.sum(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.attn.mean, b.attn.mean)  # the moments are unchanged by passes
    assert count_hooks(loaded.model) == 0
    shards = [collect_statistics(loaded, c, batch_size=3, shard=(i, 2), progress=False, second_moments=True)
              for i in range(2)]
    for i, s in enumerate(shards):
        s.save(tmp_path / f"s{i}")
    merged = merge_statistics([ActivationStatistics.load(tmp_path / f"s{i}") for i in range(2)])
    for a, b in zip(one.layers, merged.layers, strict=True):
        torch.testing.assert_close(b.second("mlp").gram, a.second("mlp").gram, rtol=1e-5, atol=1e-6)
        assert b.second("mlp").count == a.second("mlp").count
    mixed = merge_statistics([shards[0], plain])  # a shard without them: the merge has none
    assert not mixed.has_second_moments


def test_second_moments_spill_to_disk_layer_by_layer_when_they_would_not_fit(tmp_path) -> None:
    from seap.errors import ArtifactError

    loaded = make_tiny_model("llama-gqa")
    c = corpus()
    held = collect_statistics(loaded, c, batch_size=5, progress=False, second_moments=True)
    per_layer = (64 * 64 + 96 * 96) * 12
    spilled = collect_statistics(loaded, c, batch_size=5, progress=False, second_moments=True,
                                 second_moment_budget=2 * per_layer, spill_dir=tmp_path / "spill")
    assert spilled.meta["second_moments"]["spilled"] and not held.meta["second_moments"]["spilled"]
    assert all(layer.stored is not None and layer.attn_second is None for layer in spilled.layers)
    assert len(list((tmp_path / "spill").glob("layer-*.safetensors"))) == len(spilled.layers)
    spilled.save(tmp_path / "saved")
    loaded_back = ActivationStatistics.load(tmp_path / "saved")
    assert loaded_back.has_second_moments
    for a, b in zip(held.layers, loaded_back.layers, strict=True):
        for module in ("attn", "mlp"):
            torch.testing.assert_close(b.second(module).gram, a.second(module).gram)
            assert b.second(module).count == a.second(module).count
    # the pooled merge spills too, one layer at a time, and equals the merge in memory
    merged = merge_statistics([loaded_back, held], "pooled", spill_dir=tmp_path / "merge-spill", budget=per_layer)
    in_memory = merge_statistics([held, held], "pooled")
    assert all(layer.stored is not None for layer in merged.layers)
    torch.testing.assert_close(merged.layers[2].second("mlp").gram, in_memory.layers[2].second("mlp").gram)
    # a corrupt sidecar is refused when it is read, naming the file
    part = next((tmp_path / "saved" / "parts").glob("layer-0001.safetensors"))
    part.write_bytes(part.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ArtifactError, match="layer-0001.safetensors is missing or corrupt"):
        ActivationStatistics.load(tmp_path / "saved").layers[1].seconds()

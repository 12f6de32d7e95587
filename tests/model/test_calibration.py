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


def test_every_task_in_one_walk_equals_each_task_alone(tmp_path) -> None:
    """collect_task_statistics walks the layers once for all tasks; each task's statistics are
    those of a walk over that task alone, bit for bit (a batch never mixes tasks), and hold
    moments only: no second moments are collected or written any more."""
    from dataclasses import fields

    from seap.maths.statistics import LayerStatistics
    from seap.model.calibration import collect_task_statistics

    loaded = make_tiny_model("qwen2", layers=3)
    corpora = {"a": build_corpus([{"text": s} for s in SENTENCES[:5]], "a", None),
               "b": build_corpus([{"text": s} for s in SENTENCES[5:]], "b", None)}
    both = collect_task_statistics(loaded, corpora, batch_size=3, progress=False)
    assert list(both) == ["a", "b"] and count_hooks(loaded.model) == 0
    for task, corpus_ in corpora.items():
        alone = collect_statistics(loaded, corpus_, batch_size=3, progress=False)
        assert both[task].task == task and both[task].meta["corpus_digest"] == corpus_.digest()
        assert both[task].num_tokens == alone.num_tokens == sum(len(loaded.tokenizer(t)["input_ids"])
                                                                 for t in corpus_.texts)
        for x, y in zip(both[task].layers, alone.layers, strict=True):
            for module in ("attn", "mlp"):
                mx, my = getattr(x, module), getattr(y, module)
                assert mx.count == my.count
                for name in ("mean", "m2", "mean_sq"):
                    assert torch.equal(getattr(mx, name), getattr(my, name)), (task, module, name)
    assert {f.name for f in fields(LayerStatistics)} == {"attn", "mlp", "o_proj", "down_proj"}
    both["a"].save(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["stats.json", "stats.safetensors"]
    with pytest.raises(SeapError, match="task 'b' has no calibration texts in this shard"):
        collect_task_statistics(loaded, {"a": corpora["a"], "b": build_corpus([{"text": "the"}], "b", None)},
                                shard=(1, 2), progress=False)

"""GGUF export: what the file declares, and what llama.cpp would compute from it.

The numbers are checked against :func:`llama_cpp_reference`, a small numpy forward pass that
follows llama.cpp's own conventions (its tensor names, its rotary pairs of adjacent values, its
per-layer head counts and feed-forward lengths, a layer with no heads skipping attention as
``deci`` does) and reads nothing but the GGUF file. The same check in a real llama.cpp build is
``tests/evaluation/test_llama_cpp_runtime.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seap.errors import SeapError, UnsupportedArchitectureError
from seap.export.to_gguf import export_gguf, gguf_layout
from seap.model.masking import apply_mask
from tests.helpers import SENTENCES, make_tiny_bpe_llama, make_tiny_model, make_tiny_moe
from tests.model.test_surgery import mask_for


def _fields(path):
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def value(key):
        f = reader.fields[key]
        if f.types and f.types[0].name == "STRING":
            return bytes(f.parts[f.data[0]]).decode()
        vals = [f.parts[i].tolist() for i in f.data]
        return [v[0] if isinstance(v, list) else v for v in vals] if len(vals) > 1 else (vals[0][0] if isinstance(vals[0], list) else vals[0])

    tensors = {t.name: np.array(t.data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)]) for t in reader.tensors}
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    return value, tensors, types, reader


def llama_cpp_reference(path, token_ids: list[int]) -> np.ndarray:
    """Logits of every position, computed from the GGUF file alone as llama.cpp's llama/deci graph does."""
    value, w, _, reader = _fields(path)
    arch = value("general.architecture")
    n_layer = value(f"{arch}.block_count")

    def per_layer(key):
        v = value(f"{arch}.{key}")
        return list(v) if isinstance(v, list) else [v] * n_layer

    heads, kv_heads, ffn = per_layer("attention.head_count"), per_layer("attention.head_count_kv"), per_layer("feed_forward_length")
    d = value(f"{arch}.attention.key_length")
    eps = value(f"{arch}.attention.layer_norm_rms_epsilon")
    base = value(f"{arch}.rope.freq_base")
    x = w["token_embd.weight"][token_ids].astype(np.float64)
    T = len(token_ids)
    pos = np.arange(T)[:, None]
    theta = pos * base ** (-np.arange(0, d, 2) / d)  # [T, d/2]
    cos, sin = np.cos(theta), np.sin(theta)

    def norm(v, g):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * g

    def rope(v):  # v: [T, H, d]; llama.cpp NORM rope rotates adjacent pairs (2i, 2i+1)
        a, b = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2] = a * cos[:, None] - b * sin[:, None]
        out[..., 1::2] = a * sin[:, None] + b * cos[:, None]
        return out

    def linear(v, name):
        y = v @ w[f"{name}.weight"].T.astype(np.float64)
        return y + w[f"{name}.bias"] if f"{name}.bias" in w else y

    for i in range(n_layer):
        h = x
        if heads[i] > 0:
            a = norm(x, w[f"blk.{i}.attn_norm.weight"])
            q = rope(linear(a, f"blk.{i}.attn_q").reshape(T, heads[i], d))
            k = rope(linear(a, f"blk.{i}.attn_k").reshape(T, kv_heads[i], d))
            v = linear(a, f"blk.{i}.attn_v").reshape(T, kv_heads[i], d)
            group = heads[i] // kv_heads[i]
            k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
            s = np.einsum("thd,shd->hts", q, k) / np.sqrt(d)
            s = s + np.triu(np.full((T, T), -np.inf), 1)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            att = np.einsum("hts,shd->thd", p, v).reshape(T, heads[i] * d)
            h = x + linear(att, f"blk.{i}.attn_output")
        if ffn[i] > 0:
            f = norm(h, w[f"blk.{i}.ffn_norm.weight"])
            g = linear(f, f"blk.{i}.ffn_gate")
            h = h + linear(g / (1 + np.exp(-g)) * linear(f, f"blk.{i}.ffn_up"), f"blk.{i}.ffn_down")
        x = h
    out = w["output.weight"] if "output.weight" in w else w["token_embd.weight"]
    return norm(x, w["output_norm.weight"]) @ out.T.astype(np.float64)


# float16 matrices: the logits (largest ~0.6) of the tiny model move by 2.7e-4 (measured 2026-12-07);
# dropping one MLP block moves them by 0.026 to 0.053, attention blocks by 0.33 to 0.54
F16_LOGIT_ATOL = 1e-3


def _hf_logits(loaded, ids):
    with torch.no_grad():
        return loaded.model(input_ids=torch.tensor([ids])).logits[0].double().numpy()


def _ids(loaded):
    return loaded.tokenizer(" ".join(SENTENCES[:2]))["input_ids"][:24]


@pytest.mark.parametrize("tied", [False, True])
def test_dense_export_matches_llama_cpp_reference(tmp_path, tied) -> None:
    loaded = make_tiny_bpe_llama(tied=tied)
    path = export_gguf(loaded, tmp_path / "dense.gguf", dtype="f32", tokenizer_pre="gpt-2")
    value, tensors, types, _ = _fields(path)
    assert value("general.architecture") == "llama"  # one width for all layers: the plain architecture
    assert value("llama.attention.head_count") == 8 and value("llama.attention.head_count_kv") == 4
    assert ("output.weight" in tensors) is not tied
    ids = _ids(loaded)
    np.testing.assert_allclose(llama_cpp_reference(path, ids), _hf_logits(loaded, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("gqa_mode", ["kv-groups", "query-heads"])
def test_pruned_export_declares_per_layer_widths_and_matches(tmp_path, gqa_mode) -> None:
    loaded = make_tiny_bpe_llama(layers=6)
    mask = mask_for(loaded, 0.4, gqa_mode=gqa_mode)
    pruned = apply_mask(loaded, mask, "hard", bias_compensation=True)  # biases on o_proj and down_proj too
    path = export_gguf(pruned, tmp_path / "pruned.gguf", dtype="f32", tokenizer_pre="gpt-2")
    value, tensors, _, _ = _fields(path)
    geo = pruned.adapter.geometry(pruned.model).layers
    assert value("general.architecture") == "deci"
    assert value("deci.attention.head_count") == [g.num_heads for g in geo]
    assert value("deci.attention.head_count_kv") == [g.num_kv_heads for g in geo]
    assert value("deci.feed_forward_length") == [g.intermediate_size for g in geo]
    assert len({g.intermediate_size for g in geo}) > 1
    assert "blk.2.attn_output.bias" in tensors and "blk.2.ffn_down.bias" in tensors
    assert value("seap.pruning.base_fingerprint") == loaded.fingerprint
    ids = _ids(loaded)
    np.testing.assert_allclose(llama_cpp_reference(path, ids), _hf_logits(pruned, ids), atol=1e-4, rtol=0)


def test_float16_default_keeps_norms_in_float32(tmp_path) -> None:
    loaded = make_tiny_bpe_llama()
    path = export_gguf(loaded, tmp_path / "m.gguf", tokenizer_pre="gpt-2")
    value, _, types, _ = _fields(path)
    assert types["blk.0.attn_q.weight"] == "F16" and types["token_embd.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == "F32"
    ids = _ids(loaded)
    want = _hf_logits(loaded, ids)
    np.testing.assert_allclose(llama_cpp_reference(path, ids), want, atol=F16_LOGIT_ATOL, rtol=0)
    # the tolerance sees a missing block: the same export without its last MLP block is outside it
    last = loaded.model.model.layers[-1].mlp.down_proj
    with torch.no_grad():
        kept = last.weight.clone()
        last.weight.zero_()
        dropped = export_gguf(loaded, tmp_path / "no-mlp.gguf", tokenizer_pre="gpt-2")
        last.weight.copy_(kept)
    assert np.abs(llama_cpp_reference(dropped, ids) - want).max() > 10 * F16_LOGIT_ATOL


def test_tokenizer_and_chat_template_travel_with_the_file(tmp_path) -> None:
    loaded = make_tiny_bpe_llama()
    loaded.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    path = export_gguf(loaded, tmp_path / "m.gguf", tokenizer_pre="gpt-2")
    value, _, _, reader = _fields(path)
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == len(loaded.tokenizer)
    assert len(reader.fields["tokenizer.ggml.merges"].data) > 0
    assert value("tokenizer.chat_template") == loaded.tokenizer.chat_template
    assert value("tokenizer.ggml.add_bos_token") is False or value("tokenizer.ggml.add_bos_token") == 0


def test_llama3_rope_scaling_writes_frequency_factors(tmp_path) -> None:
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    loaded = make_tiny_bpe_llama(rope_parameters=rope)
    path = export_gguf(loaded, tmp_path / "m.gguf", dtype="f32", tokenizer_pre="gpt-2")
    _, tensors, _, _ = _fields(path)
    factors = tensors["rope_freqs.weight"]
    assert factors.shape == (4,) and factors.min() == pytest.approx(1.0) and factors.max() == pytest.approx(8.0)


def test_unknown_pre_tokenizer_is_refused_with_the_override(tmp_path) -> None:
    loaded = make_tiny_bpe_llama()
    with pytest.raises(SeapError, match="--tokenizer-pre"):
        export_gguf(loaded, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_bad_inputs_are_refused_and_leave_nothing(tmp_path) -> None:
    loaded = make_tiny_bpe_llama()
    soft = apply_mask(loaded, mask_for(loaded, 0.3), "soft")
    with pytest.raises(SeapError, match="soft-masked"):
        export_gguf(soft, tmp_path / "soft.gguf", tokenizer_pre="gpt-2")
    with pytest.raises(UnsupportedArchitectureError, match="GGUF export is not available for the qwen2"):
        gguf_layout(make_tiny_model("qwen2"))
    moe = make_tiny_moe("mixtral")
    with pytest.raises(UnsupportedArchitectureError):
        gguf_layout(moe)
    with pytest.raises(UnsupportedArchitectureError, match="byte-level BPE"):  # a WordLevel vocabulary
        export_gguf(make_tiny_model("llama-gqa"), tmp_path / "w.gguf", tokenizer_pre="gpt-2")
    with pytest.raises(SeapError, match="unknown GGUF dtype"):
        export_gguf(loaded, tmp_path / "d.gguf", dtype="q4")
    assert not list(tmp_path.iterdir())
    export_gguf(loaded, tmp_path / "m.gguf", tokenizer_pre="gpt-2")
    with pytest.raises(SeapError, match="already exists"):
        export_gguf(loaded, tmp_path / "m.gguf", tokenizer_pre="gpt-2")
    export_gguf(loaded, tmp_path / "m.gguf", tokenizer_pre="gpt-2", overwrite=True)  # ours: replaced
    (tmp_path / "foreign.gguf").write_bytes(b"not ours")
    with pytest.raises(SeapError, match="only replaces outputs SEAP wrote"):
        export_gguf(loaded, tmp_path / "foreign.gguf", tokenizer_pre="gpt-2", overwrite=True)
    assert (tmp_path / "foreign.gguf").read_bytes() == b"not ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.gguf", "m.gguf"]


def test_seap_export_cli(tmp_path, capsys) -> None:
    from seap.cli import main
    from seap.model.checkpoint import save_pruned

    loaded = make_tiny_bpe_llama(layers=6)
    mask = mask_for(loaded, 0.4)
    save_pruned(apply_mask(loaded, mask, "hard"), tmp_path / "pruned", mask)
    loaded.model.save_pretrained(tmp_path / "base")
    loaded.tokenizer.save_pretrained(tmp_path / "base")
    mask.save(tmp_path / "mask")
    args = ["export", "--model", str(tmp_path / "pruned"), "--device", "cpu", "--format", "gguf", "--tokenizer-pre",
            "gpt-2", "--out", str(tmp_path / "e.gguf")]
    assert main(args) == 0
    assert "deci, per-layer widths, f16" in capsys.readouterr().out
    value, _, _, _ = _fields(tmp_path / "e.gguf")
    assert value("seap.pruning.base_fingerprint") == loaded.fingerprint
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--gguf-dtype", "f32"]) == 0
    assert main(["apply", "--model", str(tmp_path / "base"), "--mask", str(tmp_path / "mask"), "--mode", "soft", "--out",
                 str(tmp_path / "soft")]) == 0
    capsys.readouterr()
    assert main(["export", "--model", str(tmp_path / "soft"), "--format", "gguf", "--tokenizer-pre", "gpt-2", "--out",
                 str(tmp_path / "soft.gguf")]) == 2
    assert "soft-masked" in capsys.readouterr().err and not (tmp_path / "soft.gguf").exists()
    hf = ["export", "--model", str(tmp_path / "pruned"), "--device", "cpu", "--format", "hf", "--out", str(tmp_path / "hf")]
    assert main(hf) == 2
    err = capsys.readouterr().err
    assert "different widths" in err and "--same-width" in err and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("tied", [False, True])
def test_a_checkpoint_is_exported_layer_by_layer_to_the_same_bytes(tmp_path, tied) -> None:
    """A model folder (dense, or pruned and saved whole or layer by layer) is exported from its
    checkpoint one decoder layer at a time, to the file the loaded model exports, byte for byte."""
    from seap.model.checkpoint import load_pruned, save_pruned, write_pruned
    from seap.model.layer_stream import CheckpointLayers, open_layers

    loaded = make_tiny_bpe_llama(layers=4, tied=tied)
    loaded.model.save_pretrained(tmp_path / "dense")
    loaded.tokenizer.save_pretrained(tmp_path / "dense")
    mask = mask_for(loaded, 0.4)
    save_pruned(apply_mask(loaded, mask, "hard", bias_compensation=True), tmp_path / "whole", mask)
    write_pruned(open_layers(tmp_path / "dense"), mask, tmp_path / "sharded", bias_compensation=True, progress=False)
    for folder, in_memory in (("dense", loaded), ("whole", load_pruned(tmp_path / "whole")),
                              ("sharded", load_pruned(tmp_path / "sharded"))):
        source = open_layers(tmp_path / folder)
        assert isinstance(source, CheckpointLayers), folder
        streamed = export_gguf(source, tmp_path / f"{folder}-streamed.gguf", tokenizer_pre="gpt-2",
                               name="m", progress=False)
        whole = export_gguf(in_memory, tmp_path / f"{folder}.gguf", tokenizer_pre="gpt-2", name="m")
        assert streamed.read_bytes() == whole.read_bytes(), folder
        assert all(p.device.type == "meta" for p in source.model.parameters())  # (every layer released)

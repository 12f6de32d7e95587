"""Exporting a model (dense, or hard-pruned with any per-layer widths) as a GGUF file that an
unmodified llama.cpp loads and runs.

llama.cpp reads the head counts, key/value head counts and feed-forward lengths either as one
number or as one number per layer (``llama_model_loader::get_key_or_arr``), but only some of
its architectures build each layer from the per-layer values: its ``llama`` builder takes the
first layer's widths for all layers, while ``deci`` (added for Llama-3.x-Nemotron, whose layers
differ in width) builds every layer from its own ``n_head(il)``, ``n_head_kv(il)`` and
``n_ff(il)``, with optional biases on every projection. So:

* a model whose layers all have the same widths is written as ``llama`` (scalar keys);
* any other is written as ``deci`` with the three per-layer arrays.

The weights follow llama.cpp's converter: its tensor names (:mod:`seap.export.gguf_names`), q and
k rows permuted to its rotary order, norms in float32, matrices in float16 (default) or float32.
The tokenizer (byte-level BPE with llama.cpp's pre-tokenizer name, merges, special tokens and the chat
template) travels with the file, as do the pruning record (``seap.*`` keys) so that an
exported expert says which base and mask it came from. Quantise afterwards with llama.cpp's
own ``llama-quantize`` (see docs/registry.md).
"""

from __future__ import annotations

import hashlib
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from seap.errors import SeapError, UnsupportedArchitectureError
from seap.export import pruning_record
from seap.export.bpe_pretokenizers import CHECK_TEXT, PRE_TOKENIZERS
from seap.export.gguf_names import llama_cpp_family
from seap.io import atomic_file
from seap.model.checkpoint import is_expert_record
from seap.model.layer_stream import LayerSource
from seap.model.loaded import LoadedModel

log = logging.getLogger(__name__)

GGUF_DTYPES = ("f16", "f32")
DEFAULT_GGUF_DTYPE = "f16"
SEAP_KEY = "seap.pruning"  # GGUF key prefix of the pruning record


@dataclass(frozen=True)
class GgufLayout:
    """What the file declares: the llama.cpp architecture and the widths of every layer."""

    architecture: str
    heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    ffn: tuple[int, ...]

    @property
    def uniform(self) -> bool:
        return len(set(self.heads)) == len(set(self.kv_heads)) == len(set(self.ffn)) == 1


def gguf_layout(model: LoadedModel | LayerSource) -> GgufLayout:
    """The llama.cpp architecture and per-layer widths a GGUF export of ``model`` (a loaded model,
    or a checkpoint read layer by layer) declares; refuses what llama.cpp cannot express, naming
    the layer and what to do instead."""
    from seap.model.layer_stream import open_layers

    source = open_layers(model)
    adapter = source.adapter
    info = pruning_record(source)
    if is_expert_record(info):
        raise UnsupportedArchitectureError(
            "GGUF export of pruned mixture-of-experts models is not available: llama.cpp's MoE architectures take "
            "one expert count and one expert width for all layers, and the kept router rows would need its own format",
            "serve the pruned MoE model through `seap.load_pruned` or the MLflow bundle")
    family = llama_cpp_family(adapter)  # (refuses a family llama.cpp export does not cover)
    geometry = adapter.geometry(source.model)  # (shapes only: a streamed checkpoint's layers need no weights)
    heads = tuple(g.num_heads for g in geometry.layers)
    kv = tuple(g.num_kv_heads for g in geometry.layers)
    ffn = tuple(g.intermediate_size for g in geometry.layers)
    prefixes = {id(m): n for n, m in source.model.named_modules()}
    for i, (mods, h, f) in enumerate(zip(adapter.all_layer_modules(source.model), heads, ffn, strict=True)):
        if h == 0 and mods.o_proj.bias is not None:
            name = f"{prefixes[id(mods.o_proj)]}.bias"
            if bool(source.read([name])[name].abs().max() > 0):
                raise SeapError(f"layer {i} keeps no attention heads but its output projection has a bias (from "
                                "reconstruction or bias compensation); llama.cpp skips a head-less layer's attention, "
                                "bias included", "rebuild the mask so that every layer keeps a head, or without a refit bias")
        if f == 0 and h > 0:
            raise SeapError(f"layer {i} keeps attention heads but no MLP channels; llama.cpp's deci architecture "
                            "drops the attention output of such a layer",
                            "rebuild the mask so that every layer keeps some MLP channels (a lower sparsity or cap)")
    layout = GgufLayout(family.architecture, heads, kv, ffn)
    if not layout.uniform or 0 in heads or 0 in ffn:
        per_layer = family.per_layer_architecture
        if per_layer is None:
            raise UnsupportedArchitectureError(
                f"the layers of this {adapter.name} model have different widths, and llama.cpp builds that family "
                "with one width for all layers",
                "prune with one width for all layers (`--same-width`, or the uniform schedule) and export again")
        layout = GgufLayout(per_layer, heads, kv, ffn)
    return layout


def bpe_pre_tokenizer(tokenizer: Any) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (``tokenizer.ggml.pre``), found as llama.cpp's
    converter finds it: by the hash of the token ids of one fixed text."""
    digest = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    name = PRE_TOKENIZERS.get(digest)
    if name is None:
        raise SeapError(f"llama.cpp does not know this tokenizer's pre-tokenizer (hash {digest[:16]}...)",
                        "pass the name llama.cpp uses for it with `--tokenizer-pre NAME` (see llama.cpp's "
                        "convert_hf_to_gguf_update.py), or export with --format hf and convert with llama.cpp's converter")
    return name


def _vocabulary(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and token types, as llama.cpp's converter lists them for byte-level BPE vocabularies."""
    from gguf import TokenType

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        if token in added:
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            looks_special = token.startswith("<|") and token.endswith("|>")
            types.append(TokenType.CONTROL if decoder[i].special or looks_special else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def _write_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, pre: str | None) -> None:
    import gguf

    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise SeapError("GGUF export needs a fast (tokenizer.json) tokenizer", "save the model with its tokenizer.json")
    model_kind = type(tokenizer.backend_tokenizer.model).__name__
    pre_kind = type(tokenizer.backend_tokenizer.pre_tokenizer).__name__ if tokenizer.backend_tokenizer.pre_tokenizer else ""
    if model_kind != "BPE" or pre_kind not in ("ByteLevel", "Sequence"):
        raise UnsupportedArchitectureError(
            f"GGUF export writes byte-level BPE tokenizers (Llama 3, SmolLM, Qwen, ...); this one is {model_kind} "
            f"with a {pre_kind or 'no'} pre-tokenizer",
            "export with --format hf, then convert with llama.cpp's convert_hf_to_gguf.py (it reads SentencePiece vocabularies)")
    tokens, types = _vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or bpe_pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:  # merges, special token ids and the chat template, as the converter reads them
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
    # whether a BOS/EOS is added as the tokenizer really does it, so llama.cpp tokenizes text the same way
    ids = tokenizer("a")["input_ids"]
    for kind, position in (("bos", 0), ("eos", -1)):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        special.add_special_token[kind] = token_id is not None and len(ids) > 1 and ids[position] == token_id
    special.add_to_gguf(writer, quiet=True)


def _rope(writer: Any, config: Any, head_dim: int) -> torch.Tensor | None:
    """Rotary settings as llama.cpp's converter writes them; the Llama-3 frequency factors as a tensor."""
    import gguf

    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    kind = str(params.get("rope_type") or params.get("type") or "default").lower()
    if kind == "default":
        return None
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
        return None
    if kind == "llama3":
        base = float(theta or 10000.0)
        freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        factor = params.get("factor", 8.0)
        low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
        old = params.get("original_max_position_embeddings", 8192)
        factors = []
        for f in freqs.tolist():
            wavelen = 2 * math.pi / f
            if wavelen < old / high:
                factors.append(1.0)
            elif wavelen > old / low:
                factors.append(factor)
            else:
                smooth = (old / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        return torch.tensor(factors, dtype=torch.float32)
    raise UnsupportedArchitectureError(f"rotary scaling {kind!r} is not exported to GGUF",
                                       "export with --format hf and convert with llama.cpp's converter")


def _pruning_record(writer: Any, source: LayerSource) -> None:
    info = dict(getattr(source.config, "seap_pruning", None) or {})
    writer.add_string(f"{SEAP_KEY}.model_fingerprint", source.fingerprint)
    for key in ("base_fingerprint", "mask_digest", "method", "task", "sparsity", "schedule", "score"):
        value = info.get(key)
        if isinstance(value, str):
            writer.add_string(f"{SEAP_KEY}.{key}", value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_float32(f"{SEAP_KEY}.{key}", float(value))


def is_seap_gguf(path: Path) -> str | None:
    """``"a SEAP GGUF export"`` when ``path`` is a GGUF file this module wrote (for ``--overwrite``)."""
    try:
        from gguf import GGUFReader

        return "a SEAP GGUF export" if f"{SEAP_KEY}.model_fingerprint" in GGUFReader(str(path)).fields else None
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return None


def export_gguf(model: LoadedModel | LayerSource, out: str | Path, dtype: str = DEFAULT_GGUF_DTYPE,
                overwrite: bool = False, name: str | None = None, tokenizer_pre: str | None = None,
                inputs: tuple[str, ...] = (), progress: bool = False) -> Path:
    """Write ``model`` (dense or hard-pruned; loaded, or a checkpoint read one decoder layer at a
    time, :func:`seap.model.layer_stream.open_layers`) as a GGUF file for llama.cpp; returns its path.

    ``dtype``: ``f16`` (default) or ``f32`` for the matrices (norms stay float32, as in llama.cpp's
    converter). The header and tensor table are written from the shapes alone, then the weights
    one layer at a time, so a streamed checkpoint never sits whole in memory (the file is the
    same byte for byte). It is written to a temporary sibling and renamed into place.
    """
    import gguf

    from seap.model.layer_stream import open_layers
    from seap.model.memory import return_freed_memory

    if dtype not in GGUF_DTYPES:
        raise SeapError(f"unknown GGUF dtype {dtype!r}", f"choose one of: {', '.join(GGUF_DTYPES)}")
    source = open_layers(model)
    if source.tokenizer is None:
        raise SeapError("the model has no tokenizer, and a GGUF file carries one", "save the model with its tokenizer")
    layout = gguf_layout(source)
    adapter = source.adapter
    family = llama_cpp_family(adapter)
    config = adapter.text_config(source.config)
    head_dim = adapter.head_dim(config)
    vocab_size = int(config.vocab_size)
    np_dtype = np.dtype(np.float16 if dtype == "f16" else np.float32)

    def as_written(tensor: torch.Tensor) -> np.ndarray:
        data = tensor.detach().to("cpu", torch.float32).numpy()
        return data if data.ndim == 1 else data.astype(np_dtype)

    layers = source.layers
    with atomic_file(out, overwrite=overwrite, inputs=inputs, recognise=is_seap_gguf) as tmp:
        writer = gguf.GGUFWriter(str(tmp), layout.architecture)
        writer.add_name(name or source.source)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
        writer.add_block_count(len(layout.heads))
        writer.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
        writer.add_embedding_length(int(config.hidden_size))
        per_layer = layout.architecture != family.architecture
        writer.add_feed_forward_length(list(layout.ffn) if per_layer else layout.ffn[0])
        writer.add_head_count(list(layout.heads) if per_layer else layout.heads[0])
        writer.add_head_count_kv(list(layout.kv_heads) if per_layer else layout.kv_heads[0])
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(vocab_size)
        rope_factors = _rope(writer, config, head_dim)
        _write_tokenizer(writer, source.tokenizer, vocab_size, tokenizer_pre)
        _pruning_record(writer, source)
        # the tensor table from the shapes (a streamed checkpoint's weights are not read yet)
        if rope_factors is not None:
            writer.add_tensor_info("rope_freqs.weight", rope_factors.shape, np.dtype(np.float32), rope_factors.nbytes)
        table = [*family.outer_tensors(adapter, source.model),
                 *(t for i, layer in enumerate(layers) for t in family.layer_tensors(adapter, source.model, i, layer))]
        for tensor_name, tensor in table:
            kind = np.dtype(np.float32) if tensor.dim() == 1 else np_dtype
            writer.add_tensor_info(tensor_name, tuple(tensor.shape), kind, tensor.numel() * kind.itemsize)
        names = [tensor_name for tensor_name, _t in table]
        del table
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        written: list[str] = []

        def write(tensor_name: str, tensor: torch.Tensor) -> None:
            writer.write_tensor_data(as_written(tensor))
            written.append(tensor_name)

        with torch.no_grad():
            if rope_factors is not None:
                writer.write_tensor_data(rope_factors.numpy())
            with source.outer(head=True):
                for tensor_name, tensor in family.outer_tensors(adapter, source.model):
                    write(tensor_name, tensor)
            bar = tqdm(range(len(layers)), desc="GGUF export", unit="layer", disable=not progress, leave=False)
            for i in bar:
                layer = source.layer(i)
                try:
                    for tensor_name, tensor in family.layer_tensors(adapter, source.model, i, layer):
                        write(tensor_name, tensor)
                finally:
                    source.release(i)
                return_freed_memory()
        if written != names:  # pragma: no cover - the table and the data come from the same functions
            raise RuntimeError("the GGUF tensor data does not follow its table")
        writer.close()
    log.debug("wrote %s (%s, %s, %d layers%s)", out, layout.architecture, dtype, len(layout.heads),
             "" if layout.uniform else ", per-layer widths")
    return Path(out)

"""Exporting a hard-pruned model as a folder that stock ``transformers`` loads, without seap.

Stock modelling code builds one width for all layers from the configuration
(``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``); transformers 5.23
has a heterogeneous ``per_layer_config`` on the configuration side, but the modelling code does
not build per-layer widths from it. So a pruned model exports to a stock folder exactly when
all its layers kept the same widths: the uniform schedule with no protected layers, or any
schedule with ``--same-width`` (:func:`seap.maths.schedules.same_width_allocation`). A mask with
per-layer widths is refused with what to do instead (the GGUF export, or ``load_pruned``).

The written folder is a plain checkpoint: the configuration with the pruned widths (and
``head_dim`` spelt out, since it no longer equals ``hidden_size / num_attention_heads``),
zero biases where the family's flag adds a bias to projections that have none (a refitted
bias on ``o_proj`` needs ``attention_bias``, which also gives q/k/v one), the weights in
safetensors and the tokenizer. Before the folder is moved into place it is loaded back with
plain ``AutoModelForCausalLM.from_pretrained`` and must give the same logits as the model
exported (a family whose stock code has no place for a refitted bias fails here, with a
message, instead of writing a checkpoint that silently drops it).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from seap.errors import SeapError, UnsupportedArchitectureError
from seap.export import pruning_record
from seap.export.gguf_names import exports_to_gguf
from seap.io import atomic_directory
from seap.model.adapters.base import ATTENTION_PROJECTIONS, MLP_PROJECTIONS
from seap.model.checkpoint import is_expert_record
from seap.model.loaded import LoadedModel

log = logging.getLogger(__name__)

STOCK_CHECK_TOKENS = 24  # tokens of the probe input compared after the folder is loaded back
# largest logit difference accepted in that check, relative to the largest logit: float32 (the same kernels,
# so ~1e-6 in practice), and half precision (the exported model may have run on another device)
STOCK_RTOL = {torch.float32: 1e-4, torch.float64: 1e-4}
STOCK_RTOL_HALF = 2e-2
BIAS_FLAGS = {"attention_bias": ATTENTION_PROJECTIONS, "mlp_bias": MLP_PROJECTIONS}


def same_widths(loaded: LoadedModel) -> tuple[int, int, int] | None:
    """``(heads, kv_heads, intermediate_size)`` when every layer has them, else ``None``."""
    layers = loaded.adapter.geometry(loaded.model).layers
    widths = {(g.num_heads, g.num_kv_heads, g.intermediate_size) for g in layers}
    return next(iter(widths)) if len(widths) == 1 else None


def _check_exportable(loaded: LoadedModel) -> tuple[int, int, int]:
    info = pruning_record(loaded)
    if is_expert_record(info):
        raise UnsupportedArchitectureError(
            "a pruned mixture-of-experts model keeps its own router (the removed experts' rows, for the softmax), "
            "expert numbering and per-layer expert widths, which stock modelling code has no place for",
            "serve it through seap.load_pruned or the MLflow bundle")
    widths = same_widths(loaded)
    if widths is None:
        geo = loaded.adapter.geometry(loaded.model).layers
        heads = sorted({g.num_heads for g in geo})
        inter = sorted({g.intermediate_size for g in geo})
        layer0 = (geo[0].num_heads, geo[0].num_kv_heads, geo[0].intermediate_size)
        blocked = _unbuildable_bias(loaded, _stock_config(loaded, layer0))  # (names do not depend on widths)
        rebuild = ("rebuild the mask with one width for all layers (`--same-width`, or `--schedule uniform` with no "
                   "protected layers)")
        if blocked:
            rebuild += (f" and without a refitted bias (`--no-refit-bias`: stock {loaded.adapter.name} code has no "
                        f"bias on {blocked})")
        raise SeapError(
            f"the layers of this pruned model have different widths (attention heads {heads[0]}..{heads[-1]}, MLP "
            f"channels {inter[0]}..{inter[-1]}), and stock transformers builds one width for all layers",
            f"{_serve_instead(loaded)}, or {rebuild}")
    if 0 in widths:
        raise SeapError("the pruned layers keep no attention heads or no MLP channels, which stock modelling code "
                        "cannot build", "rebuild the mask at a lower sparsity")
    return widths


def _serve_instead(loaded: LoadedModel) -> str:
    """What serves ``loaded`` as it is, with any widths and biases (GGUF only for families llama.cpp export covers)."""
    gguf = ", export it for llama.cpp (`--format gguf`, any widths)" if exports_to_gguf(loaded.adapter) else ""
    return f"load the pruned folder with seap.load_pruned{gguf}"


def _unbuildable_bias(loaded: LoadedModel, config: dict[str, Any]) -> str | None:
    """The first projection with a bias (from a refit or bias compensation) that the family's stock
    code cannot build from ``config`` (no bias flag for its group), or None."""
    names = {id(module): name for name, module in loaded.model.named_modules()}
    expected = _stock_keys(config)
    for flag, group in BIAS_FLAGS.items():
        if flag in config:
            continue
        for layer in loaded.adapter.decoder_layers(loaded.model):
            for projection in group:
                linear = getattr(loaded.adapter.layer_modules(layer), projection)
                if linear.bias is not None and f"{names[id(linear)]}.bias" not in expected:
                    return projection
    return None


def _stock_config(loaded: LoadedModel, widths: tuple[int, int, int]) -> dict[str, Any]:
    config = loaded.config.to_dict()
    for key in ("seap_pruning", "per_layer_config", "allow_global_per_layer_attribute_access", "quantization_config"):
        config.pop(key, None)
    heads, kv, inter = widths
    config.update(num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
                  head_dim=loaded.adapter.head_dim(loaded.config))
    info = dict(getattr(loaded.config, "seap_pruning", None) or {})
    # provenance (stock transformers keeps unknown keys as plain attributes); also what lets
    # --overwrite recognise the folder as SEAP's own output
    config["seap_export"] = {"model_fingerprint": loaded.fingerprint,
                             **{k: info[k] for k in ("base_fingerprint", "mask_digest", "task", "method", "sparsity",
                                                     "realised_sparsity", "schedule") if k in info}}
    return config


def _stock_keys(config: dict[str, Any]) -> set[str]:
    """The parameter names stock modelling code builds from ``config`` (on the meta device: no memory)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        stock_config = AutoConfig.for_model(**config)
    except (ValueError, TypeError, StrictDataclassError) as exc:  # transformers' validation of the configuration
        cause = str(getattr(exc, "__cause__", None) or exc).strip().splitlines()[-1].strip()
        raise UnsupportedArchitectureError(
            f"stock transformers refuses the pruned widths: {cause}",
            "prune to widths it accepts (for Llama, a head count that divides hidden_size), export for llama.cpp "
            "(`--format gguf`), or load the pruned folder with seap.load_pruned") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(stock_config)
    return set(model.state_dict())


def _stock_state(loaded: LoadedModel, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights to save under the names stock code builds from ``config``; switches a family's bias
    flag on (``attention_bias``, ``mlp_bias``) where the pruned model has biases the stock layers lack,
    with zero biases for the projections of that group that have none."""
    model = loaded.model
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    names = {id(module): name for name, module in model.named_modules()}
    layers = loaded.adapter.decoder_layers(model)
    expected = _stock_keys(config)
    for flag, group in BIAS_FLAGS.items():
        linears = [getattr(loaded.adapter.layer_modules(layer), p) for layer in layers for p in group]
        extra = [f"{names[id(lin)]}.bias" for lin in linears if lin.bias is not None and f"{names[id(lin)]}.bias" not in expected]
        if not extra:
            continue
        if flag not in config:
            raise UnsupportedArchitectureError(
                f"this {loaded.adapter.name} model has biases on {extra[0].rsplit('.', 2)[-2]} (from reconstruction or "
                f"bias compensation), and its stock modelling code has no {flag} setting to build them",
                f"rebuild the mask without a refitted bias (`--no-refit-bias`, or without bias compensation), or "
                f"{_serve_instead(loaded)}")
        config[flag] = True
    expected = _stock_keys(config)
    for key in expected - set(state):
        module_name, _, leaf = key.rpartition(".")
        if leaf != "bias":
            continue
        linear = model.get_submodule(module_name)
        state[key] = torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device)
    return state


def export_transformers(loaded: LoadedModel, out: str | Path, overwrite: bool = False,
                        inputs: tuple[str, ...] = ()) -> Path:
    """Write ``loaded`` (dense, or hard-pruned with one width for all layers) as a stock Hugging Face
    folder, after checking that plain ``from_pretrained`` loads it with the same logits."""
    widths = _check_exportable(loaded)
    config = _stock_config(loaded, widths)
    state = _stock_state(loaded, config)
    with atomic_directory(out, overwrite=overwrite, inputs=inputs) as tmp:
        save_file({k: v.cpu() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        generation = getattr(loaded.model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        check_stock_load(loaded, tmp)
    log.debug("wrote %s (heads %d, kv heads %d, MLP %d per layer)", out, *widths)
    return Path(out)


def check_stock_load(loaded: LoadedModel, folder: Path) -> float:
    """Load ``folder`` with stock ``from_pretrained`` and compare logits with ``loaded`` on a probe
    input; returns the largest difference, or raises naming what did not load."""
    from transformers import AutoModelForCausalLM

    dtype = next(loaded.model.parameters()).dtype
    stock, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, output_loading_info=True,
                                                       use_safetensors=True)
    bad = {k: sorted(v)[:5] for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise UnsupportedArchitectureError(
            f"stock transformers does not load the exported weights as they are ({bad})",
            _serve_instead(loaded))
    device = next(loaded.model.parameters()).device
    vocab = int(loaded.adapter.text_config(loaded.config).vocab_size)
    ids = torch.arange(1, STOCK_CHECK_TOKENS + 1, dtype=torch.long)[None, :] * 7919 % vocab
    with torch.inference_mode():
        want = loaded.model(input_ids=ids.to(device)).logits.float().cpu()
        got = stock.eval()(input_ids=ids).logits.float()
    diff = float((want - got).abs().max())
    if not diff <= STOCK_RTOL.get(dtype, STOCK_RTOL_HALF) * max(1.0, float(want.abs().max())):
        raise UnsupportedArchitectureError(
            f"stock transformers loads the export, but its logits differ from the pruned model's by {diff:.3g}",
            _serve_instead(loaded))
    return diff

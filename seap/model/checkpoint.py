"""Saving hard-pruned models in Hugging Face format and loading them back.

Stock ``from_pretrained`` cannot build a Llama whose layers have different widths
(transformers 5.23 reads one global size per config). The saved folder therefore holds:

* ``model.safetensors`` with the pruned shapes, plus the tokenizer files;
* ``config.json``: the base config, plus ``per_layer_config`` (Hugging Face's
  heterogeneous-model field: heads, key/value heads and intermediate size per layer) and a
  ``seap_pruning`` section (base fingerprint, mask digest, score, schedule, sparsity,
  fingerprint of the pruned weights);
* ``seap_mask/``: the mask it was derived from.

A mixture-of-experts model pruned by an expert mask (any unit: experts, channels inside them,
or both) records, per MoE layer, the experts kept, their width, the router's top-k and the
removed experts' router rows it keeps
(:class:`seap.model.adapters.moe.KeptExpertRouter`) instead of head and channel widths.

:func:`load_pruned` rebuilds the base architecture, resizes each layer, loads the weights
strictly and checks the recorded fingerprint, so the logits are identical to the saved model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from seap.errors import ArtifactError, SeapError
from seap.io import atomic_directory, atomic_write_json, read_json
from seap.maths.mask_formats import Mask
from seap.model.adapters import adapter_for_model_type
from seap.model.loaded import (
    LoadedModel,
    model_fingerprint,
    prepare_tokenizer,
    resolve_device,
    resolve_dtype,
)

PRUNED_MASK_DIR = "seap_mask"


def is_expert_record(info: Mapping[str, Any]) -> bool:
    """Whether a ``seap_pruning`` record is that of an expert mask applied to a mixture-of-experts
    model (experts removed, channels inside them, or both: its ``moe_layers``), rather than of
    a dense model's heads and channels."""
    return "moe_layers" in info or info.get("unit") in ("experts", "both")

_CONFIG_EXTRA = ("per_layer_config", "allow_global_per_layer_attribute_access")


def is_pruned_dir(path: str | Path) -> bool:
    """Whether ``path`` is a hard-pruned folder written by :func:`save_pruned`. A soft-masked folder
    (``seap apply --mode soft``: zeroed weights in dense shapes) is a plain checkpoint that loads
    as one, its ``seap_pruning`` record kept on the config (so exports can refuse it by name)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        info = json.loads(config.read_text(encoding="utf-8")).get("seap_pruning")
    except (OSError, json.JSONDecodeError, AttributeError):
        return False
    return isinstance(info, dict) and info.get("mode") != "soft"


def save_pruned(loaded: LoadedModel, path: str | Path, mask: Mask | None = None, overwrite: bool = False) -> Path:
    """Write a hard-pruned model (from :func:`seap.apply_mask` with ``mode="hard"``) as an HF folder."""
    info = dict(getattr(loaded.model.config, "seap_pruning", None) or {})
    if info.get("mode") != "hard":
        raise SeapError("only hard-pruned models can be saved as pruned checkpoints",
                        "apply the mask with mode='hard' (`seap apply --mode hard`), or save the mask itself")
    info["pruned_fingerprint"] = loaded.fingerprint
    if is_expert_record(info):  # a pruned MoE model: kept experts, their widths and top-k per MoE layer
        info["layers"] = [loaded.adapter.experts_record(layer) or {}  # type: ignore[attr-defined]
                          for layer in loaded.adapter.decoder_layers(loaded.model)]
    else:
        geometry = loaded.adapter.geometry(loaded.model)
        info["layers"] = [
            {"num_attention_heads": g.num_heads, "num_key_value_heads": g.num_kv_heads,
             "intermediate_size": g.intermediate_size, **loaded.adapter.layer_record(layer)}
            for g, layer in zip(geometry.layers, loaded.adapter.decoder_layers(loaded.model), strict=True)
        ]
    with atomic_directory(path, overwrite=overwrite) as tmp:
        # the live module names (what load_pruned fills), not a multimodal model's original checkpoint layout
        loaded.model.save_pretrained(tmp, safe_serialization=True, save_original_format=False)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        config["seap_pruning"] = info
        if not is_expert_record(info):  # (Hugging Face's per-layer widths; MoE records are SEAP's own)
            config["per_layer_config"] = {str(i): layer for i, layer in enumerate(info["layers"])}
            config["allow_global_per_layer_attribute_access"] = True
        atomic_write_json(tmp / "config.json", config)
        if mask is not None:
            mask.save(tmp / PRUNED_MASK_DIR)
    return Path(path)


def _pruned_config(p: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A pruned folder's config.json and its ``seap_pruning`` record (refused when it has none)."""
    raw = read_json(p / "config.json", "pruned model config")
    info = raw.get("seap_pruning")
    if not isinstance(info, dict) or "layers" not in info:
        raise ArtifactError(f"{p} is not a SEAP pruned model (no seap_pruning in config.json)",
                            "load it with seap.load_model, or re-create it with `seap prune`/`seap apply`")
    return raw, info


def pruned_skeleton(path: str | Path, dtype: torch.dtype, has_tensor: Callable[[str], bool]
                    ) -> tuple[nn.Module, Any, dict[str, Any]]:
    """The architecture of the pruned folder ``path`` (written by :func:`save_pruned` or
    :func:`write_pruned`) with every layer resized to its saved widths, its parameters not yet
    filled (built under :func:`seap.model.layer_stream.parameters_on_meta` they take no memory);
    ``has_tensor(name)`` says which projection biases the folder holds. Returns the model, its
    adapter and the ``seap_pruning`` record (with the per-layer ``layers``)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    p = Path(path)
    raw, info = _pruned_config(p)
    model_type = raw.get("model_type")
    adapter = adapter_for_model_type(str(model_type))
    base = {k: v for k, v in raw.items() if k not in _CONFIG_EXTRA and k != "seap_pruning"}
    config = CONFIG_MAPPING[model_type].from_dict(base)
    adapter.check_config(config)
    config.seap_pruning = {k: v for k, v in info.items() if k not in ("layers", "pruned_fingerprint")}
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    head_dim = adapter.head_dim(config)
    layers = adapter.decoder_layers(model)
    if len(info["layers"]) != len(layers):
        raise ArtifactError(f"{p}: config lists {len(info['layers'])} layers, the model has {len(layers)}", "re-save it")
    hidden = adapter.text_config(config).hidden_size
    for layer, sizes in zip(layers, info["layers"], strict=True):
        if is_expert_record(info):
            if sizes:  # (an MoE layer; dense layers of an MoE model are saved whole)
                adapter.resize_experts(layer, sizes, adapter.normalises_top_k(config))  # type: ignore[attr-defined]
            continue
        prefix = _module_prefix(model, layer)
        adapter.resize_layer(layer, sizes, head_dim, hidden,
                             lambda name: has_tensor(f"{prefix}.{adapter.projection_path(name)}.bias"))
    return model, adapter, info


def load_pruned(path: str | Path, device: str | None = "auto", dtype: str | torch.dtype | None = "auto") -> LoadedModel:
    """Load a folder written by :func:`save_pruned`; the logits equal those of the saved model."""
    from transformers import AutoTokenizer

    p = Path(path)
    _pruned_config(p)  # (not a pruned folder: refused before any weight is read)
    weights_file = p / "model.safetensors"
    if (p / "model.safetensors.index.json").is_file():  # written layer by layer (write_pruned): shards
        from seap.model.shards import checkpoint_files

        state = {}
        for shard in sorted(set(checkpoint_files(p).values())):
            state.update(load_file(str(shard)))
    elif not weights_file.is_file():
        raise ArtifactError(f"{weights_file} is missing", "re-save the pruned model")
    else:
        try:
            state = load_file(str(weights_file))
        except SafetensorError as exc:
            raise ArtifactError(f"{weights_file} is corrupt ({exc})", "re-save the pruned model") from exc

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    model, adapter, info = pruned_skeleton(p, torch_dtype, lambda name: name in state)
    config = model.config
    state = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ArtifactError(f"{weights_file} does not fit its config (missing {sorted(set(missing) - tied)[:5]}, "
                            f"unexpected {sorted(unexpected)[:5]})", "re-save the pruned model")
    if tied:
        model.tie_weights()
    model = model.to(dev).eval()
    fingerprint = model_fingerprint(model)
    recorded = info.get("pruned_fingerprint")
    # float32 holds any saved dtype exactly, so the fingerprint must then match the saved model's
    if recorded and torch_dtype == torch.float32 and fingerprint != recorded:
        raise ArtifactError(f"{p}: the weights do not match the fingerprint recorded at save time", "re-save the pruned model")
    tokenizer: Any = None
    if (p / "tokenizer_config.json").is_file() or (p / "tokenizer.json").is_file():
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(str(p), config=config))
    return LoadedModel(model, tokenizer, adapter, f"pruned:{p}", fingerprint)


def _module_prefix(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise RuntimeError("layer not found in model")


# ---------------------------------------------------------------------------------------
# written layer by layer

def _shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def write_pruned(source: Any, mask: Mask, path: str | Path, work: str | Path | None = None,
                 bias_compensation: bool | None = None, progress: bool = True) -> Path:
    """Write the base model of ``source`` (a :class:`~seap.model.layer_stream.LayerSource`)
    hard-pruned with ``mask`` to the new folder ``path``, one decoder layer at a time: each layer
    is read, pruned, written to its own safetensors shard and dropped, so the dense and pruned
    models never sit whole in memory. The folder is what :func:`save_pruned` writes (sharded,
    with ``model.safetensors.index.json``) and :func:`load_pruned` reloads to the same logits.
    ``mask`` removes heads and channels (a :class:`~seap.maths.masks.PruningMask`) or, on a
    mixture-of-experts model, experts (an :class:`~seap.maths.expert_selection.ExpertMask`).

    ``work`` (a folder that must not be shared with another job) keeps the finished shards and a
    progress record; a run killed part-way and started again with the same mask, base and
    options resumes after the last finished layer (other options start afresh there). On
    success it becomes ``path``."""
    import os
    import shutil

    from safetensors import safe_open
    from tqdm.auto import tqdm

    from seap.maths.expert_selection import ExpertMask, validate_expert_mask
    from seap.model.adapters.moe import moe_adapter
    from seap.model.memory import return_freed_memory
    from seap.model.loaded import fingerprint_of
    from seap.model.pruning import share_copy
    from seap.model.shards import INDEX_FILE, PROGRESS_FILE, write_safetensors
    from seap.model.surgery import (
        expert_pruning_record,
        prune_layer,
        prune_layer_experts,
        pruning_record,
        resolve_bias_compensation,
    )

    mask.check_model(source.fingerprint)
    experts = isinstance(mask, ExpertMask)
    target = Path(path)
    if target.exists():
        raise SeapError(f"output {target} already exists", "choose another path, or remove it")
    adapter, config = source.adapter, source.config
    if experts:
        adapter = moe_adapter(source)
        validate_expert_mask(mask, {i: m.num_experts for i, m in adapter.moe_layers(source.model).items()})
        normalise = adapter.normalises_top_k(config)
        compensate = None
    else:
        compensate = resolve_bias_compensation(mask, bias_compensation)
        head_dim = adapter.head_dim(config)
    layers = source.layers
    total = len(layers) + 1  # one shard per decoder layer, one for everything else
    work = Path(work) if work is not None else target.parent / f".{target.name}.partial"
    plan = {"base_fingerprint": source.fingerprint, "mask_digest": mask.digest(), "bias_compensation": compensate,
            "dtype": str(source.dtype), "shards": total}
    record = work / PROGRESS_FILE
    done: dict[str, Any] = {"plan": plan, "layers": []}
    if record.is_file():
        try:
            previous = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = {}
        if previous.get("plan") == plan:
            done = previous
        else:  # other options: never mix, start afresh
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = dict(done.get("weight_map", {}))
    sizes: list[dict[str, Any]] = list(done.get("sizes", []))
    prefixes = {id(m): n for n, m in source.model.named_modules()}
    bar = tqdm(range(len(layers)), desc=f"pruned checkpoint [{mask.task}]", unit="layer", disable=not progress,
               leave=False)
    for i in bar:
        if i < len(done["layers"]):
            continue
        layer = source.layer(i)
        try:
            pruned = share_copy(layer)
            if experts:  # (dense layers of an MoE model are written whole)
                with torch.no_grad():
                    if i in mask.experts:
                        prune_layer_experts(adapter, pruned, mask, i, True, normalise)
                sizes.append(adapter.experts_record(pruned) or {})
            else:
                prune_layer(adapter, pruned, mask.layers[i], head_dim, True, compensate)
                layer_mask = mask.layers[i]
                sizes.append({"num_attention_heads": int(layer_mask.heads.sum()),
                              "num_key_value_heads": int(layer_mask.kv_heads.sum()),
                              "intermediate_size": int(layer_mask.channels.sum()), **adapter.layer_record(pruned)})
            prefix = prefixes[id(layer)]
            tensors = {f"{prefix}.{name}": t.detach().to("cpu").contiguous()
                       for name, t in pruned.state_dict().items()}
            del pruned
        finally:
            source.release(i)
        shard = _shard_name(i, total)
        write_safetensors(tensors, work / shard)
        weight_map.update({name: shard for name in tensors})
        done["layers"].append(i)
        done.update(weight_map=weight_map, sizes=sizes)
        atomic_write_json(record, done)
        del tensors
        return_freed_memory()
    # everything outside the decoder layers: embeddings, final norm, an untied head
    layer_prefixes = tuple(prefixes[id(layer)] + "." for layer in layers)
    rest = [n for n in source.names if not n.startswith(layer_prefixes)]
    shard = _shard_name(len(layers), total)
    outer = source.read(rest) if rest else {}
    write_safetensors(outer, work / shard)
    weight_map.update({name: shard for name in outer})
    del outer
    # the pruned model's fingerprint (seap.model.loaded.model_fingerprint), read back one tensor at a time
    def written(name: str) -> torch.Tensor:
        with safe_open(str(work / weight_map[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    record_of = (expert_pruning_record(mask, "hard", {i: sizes[i] for i in mask.experts}) if experts  # type: ignore[union-attr]
                 else pruning_record(mask, "hard", compensate))
    info = {**record_of, "pruned_fingerprint": fingerprint_of(config, weight_map, written), "layers": sizes}
    total_size = sum((work / f).stat().st_size for f in set(weight_map.values()))
    atomic_write_json(work / INDEX_FILE, {"metadata": {"total_size": total_size}, "weight_map": weight_map})
    raw = json.loads(config.to_json_string(use_diff=False))
    raw.update(seap_pruning=info)
    if not experts:  # (Hugging Face's per-layer widths; MoE records are SEAP's own)
        raw.update(per_layer_config={str(i): layer for i, layer in enumerate(sizes)},
                   allow_global_per_layer_attribute_access=True)
    atomic_write_json(work / "config.json", raw)
    if source.tokenizer is not None:
        source.tokenizer.save_pretrained(work)
    mask.save(work / PRUNED_MASK_DIR)
    record.unlink()
    os.rename(work, target)
    return target

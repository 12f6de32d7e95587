"""The loaded model the engine works on, and its fingerprint.

Every model the engine touches has a *fingerprint*: the SHA-256 of its architecture
config and of every parameter (cast to float32, in name order). Artifacts record it and
refuse to be applied to another model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from seap.errors import SeapError
from seap.io import canonical_json
from seap.model.adapters import ArchitectureAdapter, get_adapter

# Config fields that define the computation; cosmetic ones (paths, versions, dtype) are left out.
FINGERPRINT_CONFIG_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "hidden_act",
    "rms_norm_eps",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "sliding_window",
    "use_sliding_window",
)


@dataclass
class LoadedModel:
    """A model ready for the engine, with its tokenizer, adapter and provenance."""

    model: nn.Module
    tokenizer: Any
    adapter: ArchitectureAdapter
    source: str
    fingerprint: str

    @property
    def config(self) -> Any:
        return self.model.config  # type: ignore[attr-defined]

    @property
    def location(self) -> str:
        """Where the model came from, as the user gave it (source ``local:/m`` -> ``/m``)."""
        return self.source.split("+", 1)[0].split(":", 1)[-1]


# ---------------------------------------------------------------------------------------
# fingerprint


FINGERPRINT_CHUNK = 1 << 24  # elements hashed at a time


def config_fingerprint_fields(config: Any) -> dict[str, Any]:
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: data[k] for k in FINGERPRINT_CONFIG_KEYS if k in data and data[k] is not None}


def fingerprint_of(config: Any, names: Iterable[str], read: Callable[[str], torch.Tensor]) -> str:
    """``sha256:<hex>`` of the architecture ``config`` and the tensors ``names``, each read with
    ``read(name)`` one at a time and hashed as float32, in name order. A model in memory
    (:func:`model_fingerprint`) and a checkpoint read tensor by tensor give the same."""
    digest = hashlib.sha256()
    digest.update(canonical_json(config_fingerprint_fields(config)).encode())
    for name in sorted(names):
        tensor = read(name).detach()
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        flat = tensor.reshape(-1)
        for start in range(0, flat.numel(), FINGERPRINT_CHUNK):
            chunk = flat[start : start + FINGERPRINT_CHUNK].to(device="cpu", dtype=torch.float32).contiguous()
            digest.update(chunk.numpy().tobytes())
        del tensor, flat
    return "sha256:" + digest.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """``sha256:<hex>`` of the architecture config and all parameters (as float32, name order)."""
    params = dict(model.named_parameters())
    return fingerprint_of(model.config, params, params.__getitem__)


def resolve_devices(device: str | None) -> list[torch.device]:
    """Every device a run may use: ``auto``, every visible CUDA device (``CUDA_VISIBLE_DEVICES``
    chooses them), else the CPU; a comma-separated list (``cuda:0,cuda:1``), those; one name,
    that one. Each must exist here (checked before any model is loaded). Work that splits
    (each task's statistics, each mask's refit) is spread over them; everything else runs on the
    first (:func:`resolve_device`)."""
    if device in (None, "auto"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [torch.device("cuda", i) for i in range(count)] or [torch.device("cpu")]
    names = [part.strip() for part in str(device).split(",")]
    if len(names) > 1 and (not all(names) or "auto" in names):
        raise SeapError(f"device list {device!r} has an empty or 'auto' entry", "list devices such as cuda:0,cuda:1")
    return [_one_device(name) for name in names]


def resolve_device(device: str | None) -> torch.device:
    """The device single-device work runs on: ``auto``, CUDA when available, else the CPU; of a
    list (:func:`resolve_devices`), its first. A named device must exist here (checked before
    any model is loaded)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return resolve_devices(device)[0]


def _one_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SeapError(f"unknown device {device!r}", "use auto, cpu, cuda, cuda:N, a list such as cuda:0,cuda:1, "
                        "or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()}
    if not available.get(dev.type, False):
        raise SeapError(f"device {device!r} is not available on this machine",
                        "use --device auto (CUDA if present, else CPU) or --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SeapError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                        "use cuda:0 .. cuda:N-1, or --device auto")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU (bf16 matmuls are several times slower there), bfloat16 on GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise SeapError(f"unknown dtype {dtype!r}", f"use one of: auto, {', '.join(table)}")
    return table[dtype]


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Give the tokenizer a pad token (EOS) for batching; padding is always masked out."""
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def wrap_model(model: nn.Module, tokenizer: Any, source: str = "in-memory") -> LoadedModel:
    """Wrap an already-built HF model (e.g. a test model) for the engine."""
    adapter = get_adapter(model)
    adapter.check_config(model.config)
    if tokenizer is not None:
        prepare_tokenizer(tokenizer)
    return LoadedModel(model.eval(), tokenizer, adapter, source, model_fingerprint(model))

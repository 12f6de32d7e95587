"""Architecture adapters and their lookup by ``config.model_type``."""

from __future__ import annotations

from typing import Any

from seap.errors import UnsupportedArchitectureError
from seap.model.adapters.base import ArchitectureAdapter, LayerModules
from seap.model.adapters.gemma2 import Gemma2Adapter
from seap.model.adapters.gemma3 import Gemma3Adapter
from seap.model.adapters.granite import GraniteAdapter
from seap.model.adapters.granitemoe import GraniteMoeAdapter
from seap.model.adapters.llama import LlamaAdapter
from seap.model.adapters.mistral import MistralAdapter
from seap.model.adapters.mixtral import MixtralAdapter
from seap.model.adapters.moe import MoeAdapter
from seap.model.adapters.olmo2 import Olmo2Adapter
from seap.model.adapters.olmoe import OlmoeAdapter
from seap.model.adapters.phi3 import Phi3Adapter
from seap.model.adapters.qwen2 import Qwen2Adapter
from seap.model.adapters.qwen2_moe import Qwen2MoeAdapter
from seap.model.adapters.qwen3 import Qwen3Adapter
from seap.model.adapters.qwen3_moe import Qwen3MoeAdapter
from seap.model.adapters.smollm3 import SmolLM3Adapter

ADAPTERS: tuple[type[ArchitectureAdapter], ...] = (
    LlamaAdapter, Qwen2Adapter, MistralAdapter, Qwen3Adapter, Gemma2Adapter, Gemma3Adapter, Phi3Adapter,
    Olmo2Adapter, SmolLM3Adapter, GraniteAdapter,
    Qwen3MoeAdapter, Qwen2MoeAdapter, MixtralAdapter, OlmoeAdapter, GraniteMoeAdapter)  # mixture-of-experts


def supported_model_types() -> list[str]:
    return sorted(t for cls in ADAPTERS for t in cls.model_types)


def supported_gguf_architectures() -> list[str]:
    return sorted(a for cls in ADAPTERS for a in cls.gguf_architectures)


def adapter_for_model_type(model_type: str) -> ArchitectureAdapter:
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls()
    raise UnsupportedArchitectureError(
        f"unsupported architecture {model_type!r}",
        f"SEAP supports these model types: {', '.join(supported_model_types())}",
    )


def get_adapter(model_or_config: Any) -> ArchitectureAdapter:
    """The adapter for a model (or its config)."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedArchitectureError(
            "the model has no config.model_type",
            f"pass a Hugging Face causal LM of one of: {', '.join(supported_model_types())}",
        )
    return adapter_for_model_type(str(model_type))


__all__ = [
    "ADAPTERS",
    "ArchitectureAdapter",
    "LayerModules",
    "MoeAdapter",
    "adapter_for_model_type",
    "get_adapter",
    "supported_gguf_architectures",
    "supported_model_types",
]

"""Exports of pruned models for the engines users serve with.

* :func:`seap.export.to_gguf.export_gguf`: a GGUF file for an unmodified llama.cpp (any per-layer widths);
* :func:`seap.export.to_transformers.export_transformers`: a folder stock ``transformers`` loads
  (one width for all layers).
"""

from __future__ import annotations

from typing import Any

from seap.errors import SeapError


def pruning_record(loaded: Any) -> dict[str, Any]:
    """The model's ``seap_pruning`` record, after refusing a soft-masked model: every export writes
    a model's real shapes, and a soft mask leaves the dense ones (zeroed weights)."""
    info = dict(getattr(loaded.config, "seap_pruning", None) or {})
    if info.get("mode") == "soft":
        raise SeapError("this model is soft-masked (pruned weights are zeroed, the shapes are the dense ones): "
                        "exporting it would write a dense-sized model",
                        "apply the mask with mode='hard' (`seap apply --mode hard`, or `seap prune`) and export that")
    return info

"""What every mask applier shares (:mod:`seap.model.surgery` for heads and channels,
:mod:`seap.model.expert_pruning` for the experts of an MoE model): the pruning modes, the
refusals made before any weight is touched, and the structural copy a pruned model is built in.

* **soft**: pruned units are zeroed (switched off), every shape stays the dense one;
* **hard**: pruned units are removed, the tensors get smaller.
"""

from __future__ import annotations

import copy

from torch import nn

from seap.errors import SeapError
from seap.model.loaded import LoadedModel

MODES = ("soft", "hard")


def check_mode(mode: str) -> None:
    """Refuse a pruning mode other than :data:`MODES`."""
    if mode not in MODES:
        raise SeapError(f"unknown pruning mode {mode!r}", f"use one of: {', '.join(MODES)}")


def check_unpruned(loaded: LoadedModel) -> None:
    """Refuse a model that a mask was already applied to (masks apply to the dense base)."""
    if getattr(loaded.model.config, "seap_pruning", None):
        raise SeapError("this model is already pruned", "apply masks to the dense base model")


def share_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers are the original tensors.

    Pruning then replaces the pruned linear layers of the copy with new, smaller ones, so
    an expert costs only its own pruned layers: embeddings, norms and the LM head stay
    shared with the base model, which is never modified.
    """
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


__all__ = ["MODES", "check_mode", "check_unpruned", "share_copy"]

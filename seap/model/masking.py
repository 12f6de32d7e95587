"""Applying a mask of any kind to a loaded model, by the mask's own format.

Each kind of mask (:class:`seap.maths.mask_formats.Mask`) has its applier, registered in
:data:`APPLIERS` under the mask's format name:

* ``seap-mask``: heads and channels of a dense model (:func:`seap.model.surgery.apply_pruning_mask`);
* ``seap-expert-mask``: experts of a mixture-of-experts model
  (:func:`seap.model.expert_pruning.apply_expert_mask`).

Neither applier knows the other; what they share (the modes, the refusals, the structural
copy) is in :mod:`seap.model.pruning`.
"""

from __future__ import annotations

from typing import Protocol

from seap.errors import SeapError
from seap.maths.expert_selection import ExpertMask
from seap.maths.mask_formats import Mask
from seap.maths.masks import PruningMask
from seap.model.expert_pruning import apply_expert_mask
from seap.model.loaded import LoadedModel
from seap.model.pruning import MODES, check_mode
from seap.model.surgery import apply_pruning_mask


class Applier(Protocol):
    """Applies one kind of mask: the model pruned by ``mask`` in ``mode`` (a copy sharing the
    base's unpruned tensors unless ``inplace``)."""

    def __call__(self, loaded: LoadedModel, mask: Mask, mode: str, bias_compensation: bool | None,
                 inplace: bool) -> LoadedModel: ...


def _apply_expert_mask(loaded: LoadedModel, mask: ExpertMask, mode: str, bias_compensation: bool | None,
                       inplace: bool) -> LoadedModel:
    """(An expert mask carries no calibration means: ``bias_compensation`` does not apply to it.)"""
    return apply_expert_mask(loaded, mask, mode, inplace=inplace)


APPLIERS: dict[str, Applier] = {
    PruningMask.format: apply_pruning_mask,  # type: ignore[dict-item]
    ExpertMask.format: _apply_expert_mask,  # type: ignore[dict-item]
}


def apply_mask(loaded: LoadedModel, mask: Mask, mode: str = "hard", bias_compensation: bool | None = None,
               inplace: bool = False) -> LoadedModel:
    """Return the model pruned by ``mask`` (of any kind), in ``mode`` (:data:`MODES`).

    Unless ``inplace``, the base model is left untouched: the result is a structural copy that
    shares the base's unpruned tensors and owns new pruned layers, so several experts of one
    base cost little memory. The mask must have been built on this model (same fingerprint);
    the result records it in ``model.config.seap_pruning`` and gets its own fingerprint.

    Bias compensation (FLAP) is a property of a heads-and-channels mask built with calibration
    means: ``None`` applies it as the mask says, ``False`` turns it off, ``True`` requires it
    (see :func:`seap.model.surgery.apply_pruning_mask`). An expert mask has none.
    """
    check_mode(mode)
    applier = APPLIERS.get(getattr(mask, "format", None))  # type: ignore[arg-type]
    if applier is None:
        raise SeapError(f"no applier for a {type(mask).__name__} (mask format {getattr(mask, 'format', None)!r})",
                        f"pass a mask of one of the formats: {', '.join(APPLIERS)}")
    return applier(loaded, mask, mode, bias_compensation, inplace)


__all__ = ["APPLIERS", "MODES", "Applier", "apply_mask"]

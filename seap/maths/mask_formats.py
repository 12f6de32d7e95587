"""Mask artifacts of every kind: what each offers (:class:`Mask`), and reading one back by the
format its metadata records (:func:`load_mask`).

Two kinds exist, registered in :data:`MASK_FORMATS` by format name:

* ``seap-mask`` (:class:`seap.maths.masks.PruningMask`): heads, key/value heads and MLP channels
  of a dense model;
* ``seap-expert-mask`` (:class:`seap.maths.expert_selection.ExpertMask`): routed experts (and
  channels inside them) of a mixture-of-experts model.

Neither kind knows the other. Code that handles masks takes a :class:`Mask`, reads it with
:func:`load_mask` and applies it with :func:`seap.model.masking.apply_mask`, which picks the
kind's applier by the same format name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from seap.artifacts import ArtifactKind
from seap.errors import ArtifactError
from seap.io import read_json
from seap.maths.expert_selection import ExpertMask
from seap.maths.masks import PruningMask


@runtime_checkable
class Mask(Protocol):
    """What every mask artifact offers.

    A mask is tied to the fingerprint of the base model it was built on, is saved as an
    artifact folder of its :attr:`format` and is applied to that model (soft: zeroed, or hard:
    removed) by the applier registered for its format (:data:`seap.model.masking.APPLIERS`).
    """

    artifact: ClassVar[ArtifactKind]  # its folder's format name, version and file names
    format: ClassVar[str]  # ``artifact.format``: the key of the registries of readers and appliers
    meta: dict[str, Any]  # provenance: task, score, target sparsity, base source, ...

    @property
    def task(self) -> str:
        """The task it was built for (``a+b``: a general mask of several)."""
        ...

    @property
    def base_fingerprint(self) -> str:
        """The fingerprint of the base model it applies to."""
        ...

    @property
    def has_bias_compensation(self) -> bool:
        """Whether applying it adds FLAP's bias compensation by default."""
        ...

    @property
    def is_reconstructed(self) -> bool:
        """Whether it carries refitted weights."""
        ...

    def digest(self) -> str:
        """``sha256:...`` of what it keeps (and of its refitted weights)."""
        ...

    def realised_sparsity(self) -> float:
        """The fraction of the prunable parameters it removes."""
        ...

    def check_model(self, fingerprint: str) -> None:
        """Refuse, before any weight is touched, a model with another fingerprint."""
        ...

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write it as an artifact folder of its format."""
        ...

    @classmethod
    def load(cls, path: str | Path) -> Mask:
        """Read a folder of its format, verifying checksums and shapes."""
        ...


MASK_FORMATS: dict[str, type[Mask]] = {cls.format: cls for cls in (PruningMask, ExpertMask)}
BUDGET_META = "accuracy_budget"  # (the metadata key of an expert an accuracy budget sized) what sized it
DEFAULT_MASK_FORMAT = PruningMask.format  # a folder without any mask metadata: its reader says what is missing


def mask_class(path: str | Path) -> type[Mask]:
    """The mask class that reads folder ``path``: the one registered for the ``format`` its
    metadata file records. A format that is unknown or unreadable goes to the owner of that
    metadata file, and a folder without one to the dense mask, whose readers then say what is wrong."""
    folder = Path(path)
    for owner in MASK_FORMATS.values():
        meta_file = folder / owner.artifact.meta_file
        if meta_file.is_file():
            try:
                recorded = read_json(meta_file, f"{owner.format} metadata")
            except ArtifactError:
                return owner
            return MASK_FORMATS.get(recorded.get("format") if isinstance(recorded, dict) else None, owner)
    return MASK_FORMATS[DEFAULT_MASK_FORMAT]


def load_mask(path: str | Path) -> Mask:
    """A mask folder of any registered kind, read by the class of its recorded format."""
    return mask_class(path).load(path)


__all__ = ["BUDGET_META", "DEFAULT_MASK_FORMAT", "MASK_FORMATS", "Mask", "load_mask", "mask_class"]

"""Error types with messages that name the problem and the fix."""

from __future__ import annotations


class SeapError(ValueError):
    """A user-facing error: ``problem`` says what is wrong, ``fix`` how to repair it."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem}\n  fix: {fix}")


class ArtifactError(SeapError):
    """An artifact on disk is missing, corrupt, of another format version, or of another model."""


class DiskFullError(SeapError):
    """A write ran out of space: the disk is full, a quota is reached, or a file passed the
    file-size limit (``ulimit -f``). Nothing partial is kept; a re-run after freeing space resumes."""


class UnsupportedArchitectureError(SeapError):
    """The model's architecture has no adapter."""


class ModelMismatchError(ArtifactError):
    """An artifact was made for a different base model than the one it is applied to."""

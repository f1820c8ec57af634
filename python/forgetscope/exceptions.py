"""The forgetscope exception tree.

Every error raised for bad input names the file (``path``) and, where there is one, the tensor
(``tensor``). The CLI maps classes to exit codes through ``exit_code``.
"""

from __future__ import annotations

from typing import Optional

__all__ = [
    "ForgetscopeError",
    "UsageError",
    "InvalidCheckpointError",
    "UnsafePathError",
    "CheckpointNotFoundError",
    "CheckpointPermissionError",
]


class ForgetscopeError(Exception):
    """Base class of every forgetscope error."""

    exit_code: int = 4
    path: Optional[str] = None
    tensor: Optional[str] = None


class UsageError(ForgetscopeError, ValueError):
    """An option or argument is invalid (CLI exit 2)."""

    exit_code = 2


class InvalidCheckpointError(ForgetscopeError, ValueError):
    """A checkpoint is malformed, foreign or inconsistent (CLI exit 3)."""

    exit_code = 3


class UnsafePathError(InvalidCheckpointError):
    """A path leaves the checkpoint directory, or is a FIFO, device or directory (CLI exit 3)."""


class CheckpointNotFoundError(InvalidCheckpointError, FileNotFoundError):
    """A checkpoint, shard or tensor does not exist (CLI exit 3)."""


class CheckpointPermissionError(InvalidCheckpointError, PermissionError):
    """The OS refused to read a file (CLI exit 3)."""

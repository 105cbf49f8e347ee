"""Backends run one turn of an agent. See `base.Backend` for the seam."""

from .base import Backend, BackendError, Emit
from .command import CommandBackend
from .echo import EchoBackend

__all__ = ["Backend", "BackendError", "CommandBackend", "EchoBackend", "Emit"]

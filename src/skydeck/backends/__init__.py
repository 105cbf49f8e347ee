"""Backends run one turn of an agent. See `base.Backend` for the seam."""

from .base import Backend, Emit
from .command import CommandBackend
from .echo import EchoBackend

__all__ = ["Backend", "CommandBackend", "EchoBackend", "Emit"]

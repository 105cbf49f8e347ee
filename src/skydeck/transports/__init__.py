"""Where records go beyond the local store (Parachute Vault, later Telegram)."""

from .base import Mirror, with_retry

__all__ = ["Mirror", "with_retry"]

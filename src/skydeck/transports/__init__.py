"""Where records go beyond the local store (Parachute Vault, later Telegram)."""

from .base import DeliveryError, Mirror, with_retry

__all__ = ["DeliveryError", "Mirror", "with_retry"]

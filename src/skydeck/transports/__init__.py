"""Where replies go beyond the local store (Parachute Vault, later Telegram)."""

from .base import DeliveryError, ReplySink, deliver_with_retry

__all__ = ["DeliveryError", "ReplySink", "deliver_with_retry"]

"""Training callbacks: the protocol (``base``), a closed registry, and one file per method.

Importing this package registers the built-in callbacks.
"""

from . import mat, npft, qat, telemetry, temporal_kd  # noqa: F401  (registration)
from .base import Callback, Context, TrainState
from .dispatch import CallbackList
from .registry import CALLBACKS, create

__all__ = ["CALLBACKS", "Callback", "CallbackList", "Context", "TrainState", "create"]

"""Low-rank error reconstruction methods, one file each behind ``base.Reconstructor``; importing the package registers the built-ins."""

from . import aser, l2qer, lqer, whiten  # noqa: F401  (registration)
from .base import RECONSTRUCTORS, Preparation, Reconstructor

__all__ = ["RECONSTRUCTORS", "Preparation", "Reconstructor"]

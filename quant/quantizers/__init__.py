"""Weight quantizers, one file each behind ``base.WeightQuantizer``; importing the package registers the built-ins."""

from . import gptq, rtn, signround  # noqa: F401  (registration)
from .base import QUANTIZERS, WeightQuantizer

__all__ = ["QUANTIZERS", "WeightQuantizer"]

"""qaft: quantization-aware fine-tuning. Subpackages: ``qaft.trainer``, ``qaft.callbacks``, ``qaft.quant``."""

__version__ = "0.1.0"

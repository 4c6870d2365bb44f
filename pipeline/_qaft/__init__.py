"""qaft: quantization-aware fine-tuning. Subpackages: ``qaft.trainer``, ``qaft.callbacks``, ``qaft.quant``."""

__version__ = "0.1.0"


def load_quantized(path, *, verify: bool = True, loader: str | None = None):
    """``(model, tokenizer, manifest)`` from a ``qaft export`` folder: the packed base with the low-rank
    adapter attached by peft, after checking the manifest's hashes (see ``qaft.quant.export.load_export``)."""
    from qaft.export.exporter import load_export

    return load_export(path, verify=verify, loader=loader)

"""qaft: quantization-aware fine-tuning of LLMs.

Packages, in the order their imports flow: ``qaft.core`` → ``qaft.quant`` → ``qaft.callbacks`` →
``qaft.trainer`` → ``qaft.eval`` → ``qaft.export`` → ``qaft.pipeline`` (CLI, ``qaft run``, doctor, report).
"""

__version__ = "0.1.0"


def load_quantized(path, *, verify: bool = True, loader: str | None = None):
    """``(model, tokenizer, manifest)`` from a ``qaft export`` folder: the packed base with the low-rank
    adapter attached, after checking the manifest's hashes (see ``qaft.export.exporter.load_export``)."""
    # Imported on use: this package is the parent of qaft.core, so importing it must not pull in the export stack.
    from qaft.export.exporter import load_export

    return load_export(path, verify=verify, loader=loader)

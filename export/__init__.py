"""Deployable files: formats behind one interface (``formats``; compressed-tensors + PEFT adapter in
``ctformat``, GGUF for llama.cpp in ``ggufformat``), reload parity, sizes, manifest and model card;
``exporter`` writes and reads export folders. Importing the package registers the built-in formats."""

from . import ctformat, ggufformat  # noqa: F401  (registration)
from .formats import FORMATS, ExportFormat

__all__ = ["FORMATS", "ExportFormat"]

"""The export-format interface and its registry.

A format turns a post-pass result (``quant.store``: a model of ``QuantLinear`` layers) into files a
runtime loads without qaft, and proves it: ``write`` puts the files into a temp folder and returns
the format's part of the manifest, including a reload parity check; ``load`` reads a folder back
(``qaft eval --export``, ``qaft.load_quantized``); ``card`` writes the model card. ``check_scheme`` and
``check_model_config`` refuse, before any work, what the format cannot hold (the doctor runs them
too). New format = one file with a subclass and one ``FORMATS.register`` call.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch

from qaft.core.errors import ExportError
from qaft.core.registry import Registry
from qaft.core.typed import suggest
from qaft.quant.fakequant import off_scheme_formats
from qaft.quant.scheme import QuantScheme, WeightQuant

from .config import ExportConfig


class ExportFormat:
    """Base class: set ``name`` and ``summary``, implement the methods, then ``FORMATS.register`` it.

    One instance writes one export; ``reload`` keeps its reload of the folder, so the parity check, the
    perplexity rows and the runtime check read the files once (a GGUF reload parses the vocabulary
    several times and de-quantizes every tensor: ~40% of a small model's export time)."""

    def __init__(self) -> None:
        self._reloaded: dict[Path, tuple[torch.nn.Module, Any]] = {}

    def reload(self, folder: Path) -> tuple[torch.nn.Module, Any]:
        """``load(folder)``, read once per instance (until ``release``)."""
        key = Path(folder).resolve()
        if key not in self._reloaded:
            self._reloaded[key] = type(self).load(key)
        return self._reloaded[key]

    def release(self) -> None:
        """Drop the kept reload (before the next model is loaded: one reload plus one model in memory at a time)."""
        self._reloaded.clear()

    name: ClassVar[str]
    summary: ClassVar[str]
    """One line for the doctor: what the files are."""

    @classmethod
    def native(cls, scheme: QuantScheme) -> bool:
        """Whether ``export.format: auto`` picks this format for ``scheme``."""
        return False

    @classmethod
    def check_scheme(cls, scheme: QuantScheme) -> None:
        """Raise ``ExportError`` (naming the fix) when the files cannot hold ``scheme``."""

    @classmethod
    def check_model_config(cls, config: Any, scheme: QuantScheme, model_class: str) -> None:
        """Raise ``ExportError`` when the files cannot hold this architecture (the doctor calls it with a meta model's config)."""

    menu_fix: ClassVar[str] = "quantize without postpass.budget_formats"
    """The fix the refusal of a format ``holds`` rejects names."""

    @classmethod
    def holds(cls, spec: WeightQuant) -> bool:
        """Whether the files can hold a Linear on ``spec`` beside the scheme's others (``postpass.budget_formats``)."""
        return False

    @classmethod
    def check_menu(cls, scheme: QuantScheme, menu: Iterable[WeightQuant]) -> None:
        """Raise ``ExportError`` when ``postpass.budget_formats`` offers a format the files cannot hold (the doctor, before the post-pass)."""
        bad = sorted({spec.label for spec in menu if spec != scheme.weight and not cls.holds(spec)})
        if bad:
            raise ExportError(f"postpass.budget_formats: export.format {cls.name} cannot write {', '.join(bad)}; {cls.menu_fix}")

    @classmethod
    def check_model(cls, model: torch.nn.Module, scheme: QuantScheme) -> None:
        """Raise ``ExportError`` when the loaded post-pass result has something the files cannot hold
        (by default: Linears that ``postpass.budget_formats`` put on a format ``holds`` rejects)."""
        refuse_other_formats(cls, model, scheme)

    consumes_model: ClassVar[bool] = True
    """``write`` may change ``model`` (packing in place), so the exporter hands it an untouched copy as ``reference``;
    a writer that only reads the model says False, and ``reference`` is then ``model`` itself (one model less in memory)."""

    def write(
        self, tmp: Path, model: torch.nn.Module, reference: torch.nn.Module, tokenizer: Any, scheme: QuantScheme, meta: dict[str, Any], settings: ExportConfig
    ) -> dict[str, Any]:
        """Write the files into ``tmp`` (``model`` may be consumed; ``reference`` is an untouched copy) and
        check that they reload to ``reference``'s logits within ``settings.parity_atol``. Returns the manifest
        part: ``format``, ``ranks``, ``quantized_modules``, ``parity``, ``sizes`` (``sizes.size_record``)."""
        raise NotImplementedError

    @classmethod
    def owns(cls, folder: Path) -> bool:
        """Whether ``folder`` is an export of this format."""
        return False

    @classmethod
    def load(cls, folder: Path, **options: Any) -> tuple[torch.nn.Module, Any]:
        """``(model, tokenizer)`` from the files, with the adapter attached when there is one (``disable_adapter()`` turns it off)."""
        raise NotImplementedError

    runtime: ClassVar[str | None] = None
    """The program users deploy the files with, when qaft can run it on them (``runtime_check``); None: only ``load``."""

    @classmethod
    def runtime_missing(cls) -> str | None:
        """Why ``runtime`` cannot run on this machine (with how to install it), or None."""
        return None

    @classmethod
    def runtime_check(cls, folder: Path, windows: torch.Tensor | None, reloaded: tuple[torch.nn.Module, Any]) -> dict[str, Any]:
        """Run the files in ``runtime``: ``{"rows": {row name: {ppl, seconds, reload, ...}}, ...}`` (perplexity over
        ``windows``, token ids from the folder's own tokenizer; no rows without them; ``reload``: the row of
        ``reloaded``'s perplexity it must match, ``export.runtime_ppl_rtol``) plus what else it checked, against
        ``reloaded``, the caller's ``load(folder)``."""
        raise NotImplementedError

    @classmethod
    def card(cls, manifest: dict[str, Any]) -> str:
        """The folder's ``README.md``."""
        raise NotImplementedError


FORMATS: Registry[type[ExportFormat]] = Registry("export format")


def resolve(name: str, scheme: QuantScheme) -> type[ExportFormat]:
    """``export.format`` (``auto`` resolved by the scheme), checked against the scheme."""
    if name == "auto":
        native = [FORMATS.get(n) for n in FORMATS.names() if FORMATS.get(n).native(scheme)]
        if not native:
            why = []
            for n in FORMATS.names():
                try:
                    FORMATS.get(n).check_scheme(scheme)
                except ExportError as e:
                    why.append(str(e))
            raise ExportError(f"export.format: no format holds {scheme.label}: " + " | ".join(why))
        fmt = native[0]
    else:
        fmt = FORMATS.get(name, where="export.format")
    fmt.check_scheme(scheme)
    return fmt


def of_folder(folder: Path) -> type[ExportFormat]:
    """The format that wrote ``folder``."""
    for name in FORMATS.names():
        if FORMATS.get(name).owns(folder):
            return FORMATS.get(name)
    raise ExportError(f"{folder}: not an export of any known format ({', '.join(FORMATS.names())}); write one with `qaft export CONFIG`")


def check_name(name: str) -> str | None:
    """Why ``name`` is not a valid ``export.format`` value, or None."""
    if name == "auto" or name in FORMATS:
        return None
    return f"format: got {name!r}, expected auto or one of {', '.join(FORMATS.names())}{suggest(name, ['auto', *FORMATS.names()])}"


def refuse_other_formats(fmt: type[ExportFormat], model: torch.nn.Module, scheme: QuantScheme) -> None:
    """One line when ``postpass.budget_formats`` put a Linear on a format ``fmt``'s files cannot hold."""
    bad = {n: spec for n, spec in off_scheme_formats(model, scheme.weight).items() if not fmt.holds(spec)}
    if bad:
        first = min(bad)
        labels = ", ".join(sorted({spec.label for spec in bad.values()}))
        raise ExportError(
            f"export.format: {fmt.name} cannot write {labels}, where postpass.budget_formats put {first} (and {len(bad) - 1} more Linears) "
            f"beside quant.weight {scheme.weight.label}; {fmt.menu_fix}"
        )

"""One immutable, versioned ``QuantScheme``: what gets quantized and how.

The same value travels with training (callbacks read it, e.g. NPFT's noise step), the post-pass
and every export, and is saved in each checkpoint, so a run can always say how its numbers were
made. Defaults follow ``shared/docs/protocol.md``: W4 symmetric per output channel, float
activations, every Linear inside the decoder blocks (embeddings and ``lm_head`` stay float).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Annotated

from qaft.trainer.typed import Ge, Gt, Le


class WeightFormat(str, enum.Enum):
    INT = "int"
    """Integer codes with a float scale (and zero point when asymmetric) per tensor/channel/group."""
    MXINT = "mxint"
    """OCP microscaling: ``group_size`` values share one power-of-two exponent (always symmetric)."""


class Granularity(str, enum.Enum):
    TENSOR = "tensor"
    CHANNEL = "channel"
    """One scale per output channel (row of the ``[out, in]`` weight)."""
    GROUP = "group"
    """One scale per ``group_size`` consecutive input channels of each row."""


class ActGranularity(str, enum.Enum):
    TOKEN = "token"
    """Dynamic, one scale per token (row of ``x``): the protocol's ``A8``."""
    TENSOR = "tensor"


@dataclass(frozen=True, kw_only=True)
class WeightQuant:
    bits: Annotated[int, Ge(2), Le(8)] = 4
    """Bits per weight code."""
    format: WeightFormat = WeightFormat.INT
    """``int`` or ``mxint`` (block floating point with a shared exponent)."""
    symmetric: bool = True
    """Symmetric (no zero point) or asymmetric min–max."""
    granularity: Granularity = Granularity.CHANNEL
    """Scope of one scale: ``tensor``, ``channel`` or ``group``."""
    group_size: Annotated[int, Gt(0)] = 64
    """Input channels per group (``granularity: group``) or per MX block (``format: mxint``)."""

    def __post_init__(self) -> None:
        if self.format is WeightFormat.MXINT and not self.symmetric:
            raise ValueError("symmetric: got False, expected True for format 'mxint' (blocks share one exponent, no zero point)")
        if self.format is WeightFormat.MXINT and self.granularity is not Granularity.GROUP:
            raise ValueError("granularity: format 'mxint' works on blocks of input channels; set granularity: group and group_size: 16 or 32")

    @property
    def label(self) -> str:
        if self.format is WeightFormat.MXINT:
            return f"MXINT{self.bits} b{self.group_size}"
        scope = {Granularity.TENSOR: "per-tensor", Granularity.CHANNEL: "per-channel", Granularity.GROUP: f"g{self.group_size}"}
        return f"W{self.bits} {scope[self.granularity]} {'sym' if self.symmetric else 'asym'}"


@dataclass(frozen=True, kw_only=True)
class ActQuant:
    bits: Annotated[int, Ge(2), Le(16)] | None = None
    """Bits for dynamic activation fake quantization of each quantized Linear's input; null = float."""
    granularity: ActGranularity = ActGranularity.TOKEN
    """``token`` (one scale per token) or ``tensor``."""

    @property
    def label(self) -> str:
        return "" if self.bits is None else f"A{self.bits}"


@dataclass(frozen=True, kw_only=True)
class QuantScheme:
    """YAML section ``quant``."""

    version: int = 1
    """Format version of this record, bumped when a field's meaning changes."""
    weight: WeightQuant = field(default_factory=WeightQuant)
    """How weights are quantized."""
    activation: ActQuant = field(default_factory=ActQuant)
    """How activations are quantized (dynamic fake quantization)."""
    targets: tuple[str, ...] = ()
    """Regexes on module names to quantize; empty = every ``nn.Linear`` inside the decoder blocks."""
    ignore: tuple[str, ...] = ("lm_head",)
    """Regexes on module names never quantized (wins over ``targets``)."""

    def __post_init__(self) -> None:
        if self.version != 1:
            raise ValueError(f"version: got {self.version}, expected 1 (this qaft reads scheme version 1)")

    def selects(self, name: str) -> bool:
        """Whether the Linear called ``name`` is quantized: matches ``targets`` (or there are none) and no ``ignore``."""
        if any(re.search(p, name) for p in self.ignore):
            return False
        return not self.targets or any(re.search(p, name) for p in self.targets)

    @property
    def label(self) -> str:
        return " ".join(p for p in (self.weight.label, self.activation.label) if p)

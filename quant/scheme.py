"""One immutable, versioned ``QuantScheme``: what gets quantized and how.

The same value travels with training (callbacks read it, e.g. NPFT's noise step), the post-pass
and every export, and is saved in each checkpoint, so a run can always say how its numbers were
made. Defaults follow the evaluation protocol (``docs/protocol.md``): W4 symmetric per output
channel, float activations, every Linear inside the decoder blocks (embeddings and ``lm_head`` stay
float). ``QuantScheme.linears`` is the one rule for *which* Linears that is, used by the post-pass,
the callbacks that train for the scheme (NPFT, QAT) and the doctor.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Annotated

import torch

from qaft.core.modules import decoder_layers
from qaft.core.typed import Ge, Gt, Le


class WeightFormat(str, enum.Enum):
    INT = "int"
    """Integer codes with a float scale (and zero point when asymmetric) per tensor/channel/group."""
    MXINT = "mxint"
    """OCP microscaling: ``group_size`` values share one power-of-two exponent (always symmetric)."""
    GGUF = "gguf"
    """llama.cpp's round-to-nearest block formats (``gguf_type``), bit-exact with the ``gguf`` package."""


class GGUFType(str, enum.Enum):
    """The GGUF block types qaft trains for, quantizes and exports: blocks of 32 input channels."""

    Q4_0 = "Q4_0"
    """4-bit codes, fp16 scale, no offset: the block's largest-magnitude weight is code −8."""
    Q4_1 = "Q4_1"
    """4-bit codes, fp16 scale and fp16 block minimum."""
    Q5_0 = "Q5_0"
    Q5_1 = "Q5_1"
    Q8_0 = "Q8_0"
    """8-bit codes ±127, fp16 scale."""
    MXFP4 = "MXFP4"
    """OCP MXFP4: FP4 E2M1 elements, one shared power-of-two (E8M0) scale."""

    @property
    def bits(self) -> int:
        return {"Q4": 4, "Q5": 5, "Q8": 8, "MX": 4}[self.value[:2]]

    @property
    def symmetric(self) -> bool:
        """No offset: ``_1`` types store a block minimum."""
        return not self.value.endswith("_1")


GGUF_BLOCK = 32
"""Every GGUF type above quantizes blocks of 32 consecutive input channels."""


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
    """``int``, ``mxint`` (block floating point with a shared exponent) or ``gguf`` (llama.cpp's block types)."""
    symmetric: bool = True
    """Symmetric (no zero point) or asymmetric min–max."""
    granularity: Granularity = Granularity.CHANNEL
    """Scope of one scale: ``tensor``, ``channel`` or ``group``."""
    group_size: Annotated[int, Gt(0)] = 64
    """Input channels per group (``granularity: group``) or per MX block (``format: mxint``)."""
    gguf_type: GGUFType | None = None
    """With ``format: gguf``: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 or MXFP4 (it fixes bits, offset and block 32)."""
    full_range: bool = False
    """Symmetric int on all ``2^b`` codes (−8…7 at 4 bits): each row/group's largest-magnitude weight is code
    ``−2^(b−1)`` and its scale carries that weight's sign (llama.cpp Q4_0's and AutoRound's rule), so the steps are
    ``(2^(b−1)−1)/2^(b−1)`` of the ±7 grid's (7/8 at 4 bits) at the same bits; false = codes ``±(2^(b−1)−1)``."""

    def __post_init__(self) -> None:
        if (self.format is WeightFormat.GGUF) != (self.gguf_type is not None):
            raise ValueError("gguf_type: set it (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, MXFP4) exactly when format is 'gguf'")
        if self.gguf_type is not None:
            self._fix_to_gguf(self.gguf_type)
        if self.format is WeightFormat.MXINT and not self.symmetric:
            raise ValueError("symmetric: got False, expected True for format 'mxint' (blocks share one exponent, no zero point)")
        if self.full_range and not (self.format is WeightFormat.INT and self.symmetric):
            raise ValueError("full_range: true needs format 'int' with symmetric: true (the other grids fix their own code range)")
        if self.format is WeightFormat.MXINT and self.granularity is not Granularity.GROUP:
            raise ValueError("granularity: format 'mxint' works on blocks of input channels; set granularity: group and group_size: 16 or 32")

    def _fix_to_gguf(self, t: GGUFType) -> None:
        """Set bits/symmetric/granularity/group_size from the GGUF type; a value that is neither the
        default nor the type's own is an error rather than silently replaced."""
        implied = {"bits": t.bits, "symmetric": t.symmetric, "granularity": Granularity.GROUP, "group_size": GGUF_BLOCK}
        for name, value in implied.items():
            got, default = getattr(self, name), WeightQuant.__dataclass_fields__[name].default
            if got != value and got != default:
                raise ValueError(f"{name}: got {got!r}, but gguf_type {t.value} implies {value!r}; drop {name}")
            object.__setattr__(self, name, value)

    @property
    def scale_bits(self) -> int:
        """Bits of one stored scale: an E8M0 power of two for MX blocks (MXINT, GGUF MXFP4), fp16 otherwise."""
        return 8 if self.format is WeightFormat.MXINT or self.gguf_type is GGUFType.MXFP4 else 16

    @property
    def label(self) -> str:
        if self.gguf_type is not None:
            return f"GGUF {self.gguf_type.value}"
        if self.format is WeightFormat.MXINT:
            return f"MXINT{self.bits} b{self.group_size}"
        scope = {Granularity.TENSOR: "per-tensor", Granularity.CHANNEL: "per-channel", Granularity.GROUP: f"g{self.group_size}"}
        kind = ("sym full-range" if self.full_range else "sym") if self.symmetric else "asym"
        return f"W{self.bits} {scope[self.granularity]} {kind}"


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

    def layer_linears(self, layer: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Module]:
        """The Linears of one decoder block (``prefix`` = its dotted name) this scheme quantizes, by name
        relative to the block. Under peft a target is the LoRA layer wrapping the Linear (its
        ``base_layer``); names are the plain model's (no ``base_model.model.`` / ``.base_layer``)."""
        prefix = prefix.removeprefix("base_model.model.")
        out = {}
        for name, mod in layer.named_modules():
            if "lora_" in name or name.endswith("base_layer"):
                continue
            linear = isinstance(mod, torch.nn.Linear) or isinstance(getattr(mod, "base_layer", None), torch.nn.Linear)
            if linear and self.selects(f"{prefix}.{name}"):
                out[name] = mod
        return out

    def linears(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """Every Linear of ``model`` this scheme quantizes (see ``layer_linears``), by its full plain name."""
        prefix, layers = decoder_layers(model)
        plain = prefix.removeprefix("base_model.model.")
        return {f"{plain}.{i}.{n}": m for i, layer in enumerate(layers) for n, m in self.layer_linears(layer, f"{prefix}.{i}").items()}

    @property
    def label(self) -> str:
        return " ".join(p for p in (self.weight.label, self.activation.label) if p)

"""The weight-quantizer interface and its registry.

A weight quantizer turns one Linear's weight into codes and scales on the scheme's grid:
``quantize(weight [out, in], input statistics, grid spec) -> QuantizedWeight``, in RTN's layout
(``grid.pack``), so every reconstructor, the store and both export formats take any quantizer's
output unchanged. RTN ignores the statistics; GPTQ uses ``XᵀX``. New quantizer = one file with a
class like ``rtn.RTN`` and one ``QUANTIZERS.register`` call.

A quantizer may also refine a whole decoder layer's results against the float layer's output
(``refine_block``, given a ``Block``): the interactions between one layer's Linears (and its
non-linearities) are invisible to a per-Linear objective. The driver then keeps a float stream of
layer inputs beside the quantized one, for the float targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from qaft.core.registry import NoOptions, Registry

from ..calibrate import LayerStats
from ..grid import QuantizedWeight
from ..scheme import ActQuant, WeightQuant


class QuantizationFailed(ValueError):
    """A layer this quantizer cannot handle with these options; the message says what to change."""


@dataclass
class Block:
    """One decoder layer's Linears after per-Linear quantization, and what their joint refinement fits."""

    layer: torch.nn.Module
    """The decoder layer, its targets still the float Linears (a refiner may swap them while it works; it puts them back)."""
    linears: dict[str, torch.nn.Linear]
    """Target Linears by name relative to ``layer``."""
    weights: dict[str, torch.Tensor]
    """What each Linear's grid holds (the weight, less columns a reconstructor extracted)."""
    inputs: list[tuple[torch.Tensor, dict[str, Any]]]
    """``(hidden_states, kwargs)`` the deployed layer will see (quantized propagation), one per calibration sequence."""
    targets: list[torch.Tensor]
    """The float layer's output on the float inputs (what the refined layer should produce from ``inputs``)."""
    spec: WeightQuant
    act: ActQuant
    input_scales: dict[str, torch.Tensor]
    """A reconstructor's input smoothing the deployed Linear applies (``Preparation.input_scales``)."""
    corrections: dict[str, torch.Tensor] = field(default_factory=dict)
    """``[out, in]`` low-rank corrections the deployed Linear adds on its (unrounded) input, held fixed while the
    rounding is refined around them (they carry any extracted columns whole)."""


@dataclass(frozen=True)
class Refined:
    weights: dict[str, QuantizedWeight]
    loss_start: float
    """Relative block output error ``‖y − y_float‖² / ‖y_float‖²`` of the per-Linear results on the first batch of
    calibration sequences (the refinement's first step scores it anyway; a pass over all of them would cost ~5 % of
    the refinement's time for telemetry)."""
    loss: float
    """The same, on the same tokens, after the refinement."""


class WeightQuantizer:
    """Base class: set ``name`` and ``Options``, implement ``quantize``, then ``QUANTIZERS.register`` it."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    reads_statistics: ClassVar[bool] = True
    """False when ``quantize`` ignores its ``stats`` (it is then passed None and no calibration forward runs for it)."""

    def __init__(self, options: Any):
        self.options = options

    def quantize(self, weight: torch.Tensor, stats: LayerStats | None, spec: WeightQuant) -> QuantizedWeight:
        raise NotImplementedError

    @property
    def refines_blocks(self) -> bool:
        """Whether the driver should call ``refine_block`` (and keep the float stream it needs)."""
        return False

    def refine_block(self, block: Block) -> Refined:
        raise NotImplementedError


QUANTIZERS: Registry[type[WeightQuantizer]] = Registry("weight quantizer")

"""The weight-quantizer interface and its registry.

A weight quantizer turns one Linear's weight into codes and scales on the scheme's grid:
``quantize(weight [out, in], input statistics, grid spec) -> QuantizedWeight``, in RTN's layout
(``grid.pack``), so every reconstructor, the store and both export formats take any quantizer's
output unchanged. RTN ignores the statistics; GPTQ uses ``XᵀX``. New quantizer = one file with a
class like ``rtn.RTN`` and one ``QUANTIZERS.register`` call.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from qaft.core.registry import NoOptions, Registry

from ..calibrate import LayerStats
from ..grid import QuantizedWeight
from ..scheme import WeightQuant


class QuantizationFailed(ValueError):
    """A layer this quantizer cannot handle with these options; the message says what to change."""


class WeightQuantizer:
    """Base class: set ``name`` and ``Options``, implement ``quantize``, then ``QUANTIZERS.register`` it."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any):
        self.options = options

    def quantize(self, weight: torch.Tensor, stats: LayerStats, spec: WeightQuant) -> QuantizedWeight:
        raise NotImplementedError


QUANTIZERS: Registry[type[WeightQuantizer]] = Registry("weight quantizer")

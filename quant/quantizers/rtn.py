"""Round-to-nearest: every weight to its nearest grid point (``grid.quantize_weight``); no calibration data."""

from __future__ import annotations

import torch

from ..calibrate import LayerStats
from ..grid import QuantizedWeight, quantize_weight
from ..scheme import WeightQuant
from .base import QUANTIZERS, WeightQuantizer


@QUANTIZERS.register
class RTN(WeightQuantizer):
    name = "rtn"
    reads_statistics = False

    def quantize(self, weight: torch.Tensor, stats: LayerStats | None, spec: WeightQuant) -> QuantizedWeight:
        return quantize_weight(weight, spec)

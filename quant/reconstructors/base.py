"""The reconstructor interface and its registry.

A reconstructor turns one Linear's quantization error ``E = W − Q(W)`` (``[out, in]``) and its input
statistics into rank-k factors, ``reconstruct(E, stats, LowRank) -> Correction``; the deployed layer
computes ``y = x Q(W)ᵀ + (x Bᵀ) Aᵀ``, i.e. a LoRA adapter with scaling 1. A method may also change
the layer before it is quantized (ASER's smoothing): ``observe`` wraps the calibration forward of one
decoder layer, then ``prepare`` edits the layer's weights and statistics and returns what the driver
must do differently (``Preparation``). The defaults do neither. New method = one file with a class
like ``lqer.LQER`` and one ``RECONSTRUCTORS.register`` call; the contract tests enrol it.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from qaft.core.registry import NoOptions, Registry

from ..calibrate import LayerStats
from ..lowrank import Correction, LowRank


@dataclass
class Preparation:
    """What ``prepare`` asks of the driver for one decoder layer, by Linear name (relative to the layer)."""

    input_scales: dict[str, torch.Tensor] = field(default_factory=dict)
    """``[in]`` factors the Linear multiplies its input by (a smoothing no norm could absorb)."""
    extracted: dict[str, torch.Tensor] = field(default_factory=dict)
    """Input columns left out of the quantized weight; the correction carries them whole."""


NO_OPTIONS = NoOptions()


class Reconstructor:
    """Base class: set ``name`` (and ``Options``), implement ``reconstruct``, then ``RECONSTRUCTORS.register`` it."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    reads_statistics: ClassVar[bool] = True
    """False when ``reconstruct`` ignores its ``stats`` and ``observe``/``prepare`` keep their defaults (it is then passed None)."""

    def __init__(self, options: Any = NO_OPTIONS):
        self.options = options

    @classmethod
    def rank_problem(cls, options: Any, rank: int) -> str | None:
        """Why these options cannot work at ``rank`` (``"<option>: ..."``, checked when the config loads), or None."""
        return None

    def observe(self, layer: torch.nn.Module, targets: dict[str, torch.nn.Linear]) -> AbstractContextManager[Any]:
        """Entered around the calibration forward of ``layer``; what it yields is passed to ``prepare``."""
        return contextlib.nullcontext()

    def prepare(self, layer: torch.nn.Module, targets: dict[str, torch.nn.Linear], stats: dict[str, LayerStats], observed: Any) -> Preparation:
        """Change the layer (and ``stats`` in place) before its Linears are quantized."""
        return Preparation()

    def reconstruct(self, error: torch.Tensor, stats: LayerStats, lowrank: LowRank) -> Correction:
        raise NotImplementedError


RECONSTRUCTORS: Registry[type[Reconstructor]] = Registry("reconstructor")

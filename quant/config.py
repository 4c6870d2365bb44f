"""The ``postpass`` config section: which quantizer and reconstructor, at what rank, calibrated on what."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Annotated, Literal

from qaft.core.registry import Spec
from qaft.core.typed import Ge, Gt, Le

from .quantizers import QUANTIZERS
from .reconstructors import RECONSTRUCTORS
from .scheme import WeightQuant


class BudgetWeighting(str, enum.Enum):
    """How ``budget_bpw`` makes Linears' output errors comparable (``quant/budget.py``)."""

    RELATIVE = "relative"
    """Each Linear's ``‖X Eᵀ‖² / ‖X Wᵀ‖²``: every layer's output counts alike."""
    ABSOLUTE = "absolute"
    """``‖X Eᵀ‖²`` itself: layers with large outputs (the residual stream's big writers) count more."""
    FISHER = "fisher"
    """``s · ‖X Eᵀ‖²``, ``s`` the mean squared loss gradient at the Linear's output (``quant/sensitivity.py``): the loss
    the error costs, to second order; one extra forward and backward per calibration sequence."""


class Propagation(str, enum.Enum):
    """What stream of inputs a decoder layer calibrates on, once the layers before it are quantized."""

    QUANTIZED = "quantized"
    """The quantized layers' outputs: each layer sees what it will see deployed (each method its own stream)."""
    FLOAT = "float"
    """The float model's outputs: whole-model calibration, the same statistics for every method (``qaft eval`` computes them once)."""


@dataclass(frozen=True, kw_only=True)
class PostpassConfig:
    """Used by ``qaft quantize`` (post-training quantization + low-rank error reconstruction)."""

    quantizer: Annotated[Spec, QUANTIZERS] = Spec("rtn")
    """Weight quantizer, a name or ``{name: ..., <options>}``: ``rtn`` (round to nearest) or ``gptq`` (error feedback through the inverse input covariance; options ``damp``, ``block_size``, ``act_order``). The reconstructor then works on its residual."""
    reconstructor: Annotated[Spec | None, RECONSTRUCTORS.optional()] = Spec("l2qer")
    """Low-rank error reconstruction: ``lqer`` (plain SVD), ``l2qer`` (activation-scaled SVD), ``whiten`` (whitening SVD), ``aser`` (whitening + activation smoothing; options ``alpha``, ``outliers``, ``extract``, ``fold_only``), or ``none``."""
    rank: Annotated[int, Ge(0)] = 32
    """Rank of the correction factors per layer (with ``energy``: the per-layer cap)."""
    budget_bpw: Annotated[float, Gt(0.0)] | None = None
    """Bits per quantized weight for everything stored (codes, scales, fp16 factors): each Linear's rank is chosen from 0 … ``rank`` to minimise the summed output error (``budget_weighting``) within it (``quant/budget.py``); null = ``rank`` everywhere."""
    budget_weighting: BudgetWeighting = BudgetWeighting.ABSOLUTE
    """What the budget allocator minimises, summed over the Linears: ``absolute`` (the output error ``‖X Eᵀ‖²``), ``relative`` (over its output energy) or ``fisher`` (times the mean squared loss gradient there). Measured in docs/methods/postpass.md."""
    budget_sensitivity_samples: Annotated[int, Ge(1)] | None = None
    """With ``budget_weighting: fisher``: measure the sensitivities on the first this many calibration sequences (one forward and backward each); null = all. Measured in docs/methods/postpass.md."""
    budget_formats: tuple[WeightQuant, ...] = ()
    """With ``budget_bpw``: more formats a Linear may take besides ``quant.weight``, each like ``quant.weight`` (e.g. ``[{bits: 3, granularity: group}, {bits: 8}]``); format and rank are chosen together; each adds about a post-pass of work."""
    energy: Annotated[float, Gt(0.0), Le(1.0)] | None = None
    """Per-layer rank: the smallest k keeping this share of the error energy, at most ``rank``, so the total stays within rank × layers; null = ``rank`` everywhere."""
    randomized_svd: bool = False
    """Randomized rank-(k+10) SVD, 8 power iterations: ~3x faster; within 0.1% perplexity for l2qer/whiten/aser on SmolLM2, but 1.5% worse for lqer (flat error spectrum). false = full float64 SVD."""
    factor_bits: Annotated[int, Ge(2), Le(8)] | None = None
    """Keep the correction factors on a symmetric per-row int grid of this many bits (8 = what an int8 LoRA kernel stores), balanced first; null = float."""
    calibration_path: str | None = None
    """Calibration text; null = ``data.path``. Must not overlap the eval text."""
    output_dir: str | None = None
    """Where ``qaft quantize`` writes the quantized model; null = ``<training.output_dir>/quantized``."""
    bf16: bool | Literal["auto"] = "auto"
    """bf16 autocast for the calibration forwards (the layer passes that gather statistics and carry the stream on); statistics still come from float32 products summed in float64. ``auto`` = where the device has bf16 units."""
    propagate: Propagation = Propagation.QUANTIZED
    """``quantized`` (each layer calibrates on the quantized layers' outputs, as deployed) or ``float`` (on the float model's; ``qaft eval`` then shares one set of statistics among all its methods)."""
    calibration_samples: Annotated[int, Ge(1)] = 16
    """Calibration sequences."""
    calibration_seq_len: Annotated[int, Ge(8)] = 512
    """Tokens per calibration sequence."""

    def __post_init__(self) -> None:
        if self.budget_bpw is not None:
            if self.reconstructor is None:
                raise ValueError("budget_bpw: allocates the correction's ranks; name a reconstructor (e.g. whiten)")
            if self.energy is not None or self.factor_bits is not None:
                raise ValueError("budget_bpw: cannot be combined with energy or factor_bits (yet); drop one of them")
        if self.budget_formats and self.budget_bpw is None:
            raise ValueError("budget_formats: chooses among formats within a bits budget; set budget_bpw too (e.g. budget_bpw: 4.5)")
        if self.budget_formats and QUANTIZERS.create(self.quantizer).refines_blocks:
            raise ValueError(
                f"budget_formats: quantizer {self.quantizer.name} refines each decoder layer as a whole, on one format; use rtn or gptq with budget_formats"
            )
        if self.reconstructor is not None:
            why = RECONSTRUCTORS.get(self.reconstructor.name).rank_problem(self.reconstructor.options, self.rank)
            if why:
                raise ValueError(f"reconstructor.{why}")

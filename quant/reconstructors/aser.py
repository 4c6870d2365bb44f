"""ASER: activation smoothing with outlier extraction, then the whitening SVD (``whiten``) on what is left.

Zhao et al., "ASER: Activation Smoothing and Error Reconstruction for LLM Quantization", 2024.

Smoothing is our reading of the abstract, as SmoothQuant does it (no official code exists). A few
input channels carry activations far larger than the rest and make per-token activation quantization
lossy. For the Linears that share one input, ``f_j = max|x_j|^α / max_i |W[i, j]|^(1−α)`` (weights of the
whole group), then ``x_j / f_j`` and ``W[:, j] · f_j``: the product is unchanged and activations become
smooth. ``1/f`` folds into the norm that produced the input (q/k/v share one, gate/up share one);
where no norm did (o_proj, down_proj), it stays as an explicit per-channel input scale, unless
``fold_only`` skips those Linears (exports cannot carry such a scale). ``outliers=k`` smooths only the
k channels with the largest ``max|x_j|`` (factor 1 elsewhere); ``None`` smooths every channel.

"Outlier extraction" has two readings, both behind ``extract``: (a) ``extract: false`` quantizes the
whole smoothed weight and lets the whitened factors absorb the larger error of the grown columns;
(b) ``extract: true`` (the default, chosen on WikiText-2 validation: 28.74 vs 37.30 for (a), W4A8 rank 32) leaves the smoothed outlier
columns out of the quantized weight so they do not inflate the per-row scales, and the low-rank
factors carry them whole, so it needs ``outliers <= rank``. The statistics of ``x/f`` follow exactly
from those of ``x``, so no second calibration pass is needed.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Annotated, Any

import torch

from qaft.core.typed import Ge, Le

from ..calibrate import LayerStats, input_sources
from .base import RECONSTRUCTORS, Preparation
from .whiten import Whiten


@dataclass(frozen=True, kw_only=True)
class ASEROptions:
    alpha: Annotated[float, Ge(0.0), Le(1.0)] = 0.5
    """Migration strength: ``f = max|x|^alpha / max|W|^(1-alpha)``."""
    outliers: Annotated[int, Ge(1)] | None = 4
    """Smooth only the N input channels with the largest ``max|x|``; null = every channel."""
    extract: bool = True
    """Leave the smoothed outlier columns out of the quantized weight; the low-rank correction carries them (needs ``outliers <= rank``)."""
    fold_only: bool = False
    """Smooth only inputs that a norm produces (1/f folds into its weight). The others (o_proj, down_proj inputs) need an explicit input scale, which exported formats (compressed-tensors, GGUF) cannot carry: set true for a run you will export."""


def factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float, outliers: int | None) -> torch.Tensor:
    """``f`` (``[in]``, float64) for Linears with weights ``[out_i, in]`` that share an input with ``act_absmax``."""
    a = act_absmax.to(torch.float64).clamp(min=1e-5)
    w = torch.cat([x.detach().abs().to(torch.float64) for x in weights]).amax(0).clamp(min=1e-5)
    f = a.pow(alpha) / w.pow(1 - alpha)
    if outliers is not None:
        keep = torch.zeros_like(f, dtype=torch.bool)
        keep[a.topk(min(outliers, a.numel())).indices] = True
        f = torch.where(keep, f, torch.ones_like(f))
    return f


def smoothed_stats(st: LayerStats, f: torch.Tensor) -> LayerStats:
    """Statistics of ``x / f`` from those of ``x``."""
    inv = 1.0 / f.to(torch.float64)
    return LayerStats(st.in_features, st.n_tokens, st.abs_mean_max * inv, st.abs_max * inv, st.xtx * inv[:, None] * inv[None, :])


@torch.no_grad()
def smooth_layer(
    layer: torch.nn.Module, targets: dict[str, torch.nn.Linear], stats: dict[str, LayerStats], sources: dict[str, tuple[int, str | None]], cfg: ASEROptions
) -> Preparation:
    """Scale weight columns by f and fold 1/f into the producing norm.

    Returns explicit input scales (Linears whose input no norm produced) and, with ``cfg.extract``,
    the smoothed columns of each Linear to keep out of quantization."""
    groups: dict[int, list[str]] = {}
    for n in targets:
        groups.setdefault(sources[n][0], []).append(n)
    explicit, extracted = {}, {}
    for members in groups.values():
        norm = sources[members[0]][1]
        if norm is None and cfg.fold_only:
            continue
        st = stats[members[0]]
        f = factors(st.abs_max, [targets[n].weight for n in members], cfg.alpha, cfg.outliers)
        cols = torch.nonzero(f != 1).flatten()
        for n in members:
            targets[n].weight.mul_(f.to(targets[n].weight.dtype))
            stats[n] = smoothed_stats(stats[n], f)
            if cfg.extract and cfg.outliers is not None:
                extracted[n] = cols
        if norm is not None:
            mod = layer.get_submodule(norm)
            mod.weight.div_(f.to(mod.weight.dtype))
            if getattr(mod, "bias", None) is not None:
                mod.bias.div_(f.to(mod.bias.dtype))
        else:
            explicit |= {n: (1.0 / f).to(targets[n].weight.dtype) for n in members}
    return Preparation(input_scales=explicit, extracted=extracted)


@RECONSTRUCTORS.register
class ASER(Whiten):
    name = "aser"
    Options = ASEROptions

    @classmethod
    def rank_problem(cls, options: ASEROptions, rank: int) -> str | None:
        if options.extract and (options.outliers is None or options.outliers > rank):
            return f"outliers: got {options.outliers}, expected at most rank ({rank}) when extract is true: the correction must carry the extracted columns"
        return None

    def observe(self, layer: torch.nn.Module, targets: dict[str, torch.nn.Linear]) -> AbstractContextManager[Any]:
        return input_sources(layer, targets)

    def prepare(self, layer: torch.nn.Module, targets: dict[str, torch.nn.Linear], stats: dict[str, LayerStats], observed: Any) -> Preparation:
        return smooth_layer(layer, targets, stats, observed, self.options)

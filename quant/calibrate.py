"""Per-Linear input statistics, accumulated in float64 by forward pre-hooks, computed once and shared by methods.

For each quantized Linear and each calibration batch ``x`` (``[..., in]``):
- ``abs_mean_max``: the max over batches of the batch's mean ``|x_j|`` (L2QER's activation scale,
  as the LQER authors' code computes it);
- ``abs_max``: ``max |x_j|`` over everything (outlier channels, smoothing);
- ``xtx``: ``Σ xᵀx`` (``[in, in]``), so ``C = xtx / n_tokens`` is the input covariance (ASER's whitening).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch


@dataclass
class LayerStats:
    in_features: int
    n_tokens: int = 0
    abs_mean_max: torch.Tensor = field(default=None)  # type: ignore[assignment]
    abs_max: torch.Tensor = field(default=None)  # type: ignore[assignment]
    xtx: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.abs_mean_max = z(self.in_features) if self.abs_mean_max is None else self.abs_mean_max
        self.abs_max = z(self.in_features) if self.abs_max is None else self.abs_max
        self.xtx = z(self.in_features, self.in_features) if self.xtx is None else self.xtx

    def update(self, x: torch.Tensor) -> None:
        """Add one calibration batch (``[..., in]``)."""
        x = x.detach().reshape(-1, self.in_features).to(torch.float64)
        if self.xtx.device != x.device:  # accumulate where the activations live (a GPU, when the model is on one)
            self.abs_mean_max, self.abs_max, self.xtx = (t.to(x.device) for t in (self.abs_mean_max, self.abs_max, self.xtx))
        a = x.abs()
        self.abs_mean_max = torch.maximum(self.abs_mean_max, a.mean(0))
        self.abs_max = torch.maximum(self.abs_max, a.amax(0))
        self.xtx += x.T @ x
        self.n_tokens += x.shape[0]

    @property
    def covariance(self) -> torch.Tensor:
        """``XᵀX / n`` (second moment, not centred: the output error is on raw inputs)."""
        return self.xtx / max(self.n_tokens, 1)


@contextmanager
def collect(linears: Mapping[str, torch.nn.Linear]) -> Iterator[dict[str, LayerStats]]:
    """Within the block, every forward call of each Linear adds its input as one batch."""
    stats = {name: LayerStats(m.in_features) for name, m in linears.items()}
    handles = [m.register_forward_pre_hook(lambda mod, args, s=stats[n]: s.update(args[0])) for n, m in linears.items()]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()

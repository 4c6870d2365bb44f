"""Calibration: the token windows, and per-Linear input statistics accumulated in float64 by forward pre-hooks, computed once and shared by methods.

Calibration takes the first ``samples × seq_len`` tokens of the calibration text (deterministic, so
no seed is involved).

For each quantized Linear and each calibration batch ``x`` (``[..., in]``):
- ``abs_mean_max``: the max over batches of the batch's mean ``|x_j|`` (L2QER's activation scale,
  as the LQER authors' code computes it);
- ``abs_max``: ``max |x_j|`` over everything (outlier channels, smoothing);
- ``xtx``: ``Σ xᵀx`` (``[in, in]``), so ``C = xtx / n_tokens`` is the input covariance (ASER's whitening).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qaft.core import text
from qaft.core.errors import DataError
from qaft.core.io import sha256_file


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


@contextmanager
def input_sources(layer: torch.nn.Module, targets: dict[str, torch.nn.Linear]):
    """Yield ``{linear: (group_key, norm_name | None)}``: Linears fed the same tensor share a key, and
    the norm that produced it (if any) is named, so smoothing can fold into it.

    Read on the first forward; the tensors are held until the end, so identities cannot be reused."""
    first_in: dict[str, torch.Tensor] = {}
    first_out: dict[str, torch.Tensor] = {}
    norms = {n: m for n, m in layer.named_modules() if "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None}

    def keep(store: dict[str, torch.Tensor], name: str, t: torch.Tensor) -> None:  # a hook must return None,
        store.setdefault(name, t)  # or torch replaces the module's input/output with what it returned

    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: keep(first_in, n, args[0])) for n, m in targets.items()]
    handles += [m.register_forward_hook(lambda mod, args, out, n=n: keep(first_out, n, out)) for n, m in norms.items()]
    result: dict[str, tuple[int, str | None]] = {}
    try:
        yield result
    finally:
        for h in handles:
            h.remove()
    for n, x in first_in.items():
        producer = next((norm for norm, out in first_out.items() if out is x), None)
        result[n] = (id(x), producer)


def calibration_ids(path: str, tokenizer: Any, samples: int, seq_len: int, *, key: str = "postpass.calibration_path") -> torch.Tensor:
    """``[samples, seq_len]`` ids from the start of the calibration text (any source ``core.text`` reads)."""
    ids = text.token_stream(path, tokenizer, key=key)
    if ids.numel() < samples * seq_len:
        raise DataError(f"{key}: {path!r} has {ids.numel()} tokens, fewer than {samples} x {seq_len}")
    return text.windows_of(ids, seq_len, samples)


def calibration_record(path: str, ids: torch.Tensor) -> dict[str, Any]:
    """Where the calibration tokens came from and a sha256 of them (and of the file, when it is one)."""
    return {
        "path": path,
        "sha256": sha256_file(Path(path)) if Path(path).is_file() else None,
        "samples": ids.shape[0],
        "seq_len": ids.shape[1],
        "tokens": ids.numel(),
        "tokens_sha256": hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest(),
    }

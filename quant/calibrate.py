"""Calibration: the token windows, and per-Linear input statistics gathered by forward pre-hooks (float32 products per batch, float64 sums), one set per distinct input.

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
        """Add one calibration batch (``[..., in]``). The batch's own products run in float32 (as GPTQ's
        reference code does; a float64 matmul is several times slower on CPUs) and the sums across batches
        accumulate in float64, so the statistics do not lose precision as tokens add up."""
        with torch.autocast(x.device.type, enabled=False):  # the hooks fire inside the calibration's bf16 autocast,
            self._add(x.detach().reshape(-1, self.in_features).float())  # which would run xᵀx in bf16: not PSD

    def _add(self, x: torch.Tensor) -> None:
        if self.xtx.device != x.device:  # accumulate where the activations live (a GPU, when the model is on one)
            self.abs_mean_max, self.abs_max, self.xtx = (t.to(x.device) for t in (self.abs_mean_max, self.abs_max, self.xtx))
        a = x.abs()
        self.abs_mean_max = torch.maximum(self.abs_mean_max, a.mean(0, dtype=torch.float64))
        self.abs_max = torch.maximum(self.abs_max, a.amax(0).double())
        self.xtx += (x.T @ x).double()
        self.n_tokens += x.shape[0]

    @property
    def covariance(self) -> torch.Tensor:
        """``XᵀX / n`` (second moment, not centred: the output error is on raw inputs)."""
        return self.xtx / max(self.n_tokens, 1)


@contextmanager
def collect(linears: Mapping[str, torch.nn.Linear]) -> Iterator[dict[str, LayerStats]]:
    """Within the block, every forward call of each Linear adds its input as one batch.

    Linears fed the very same tensor (q/k/v after one norm, gate/up after another) share one ``LayerStats``
    object, so ``XᵀX`` (the costly part) is computed once per distinct input. Sharing is read from tensor
    identity on every call, never assumed from names; the dict is complete (every Linear) once the block ends."""
    stats: dict[str, LayerStats] = {}
    followers: set[str] = set()  # Linears that read the stats of the Linear called just before them on the same tensor
    last: list[Any] = [None, None]  # the latest input seen (held, so its identity cannot be reused) and its stats

    def hook(name: str, x: torch.Tensor) -> None:
        if x is last[0]:
            if stats.setdefault(name, last[1]) is not last[1]:
                raise RuntimeError(f"calibration: {name} shared its input with another Linear on this batch but not on an earlier one")
            followers.add(name)
            return
        if name in followers:
            raise RuntimeError(f"calibration: {name} shared its input with another Linear on an earlier batch but not on this one")
        s = stats.setdefault(name, LayerStats(x.shape[-1]))
        s.update(x)
        last[:] = [x, s]

    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: hook(n, args[0])) for n, m in linears.items()]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
        last[:] = [None, None]
        for name, m in linears.items():
            stats.setdefault(name, LayerStats(m.in_features))


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
    stream = text.token_stream(path, tokenizer, key=key)
    if stream.fits(seq_len) < samples:
        raise DataError(f"{key}: {path!r} has {stream.ids.numel()} tokens, fewer than {samples} x {seq_len}")
    return text.windows_of(stream, seq_len, samples)


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

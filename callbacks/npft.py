"""NPFT: noise perturbation of outlier weights during LoRA fine-tuning (Wang & Yang, arXiv 2412.06858).

For zero-mean noise δ_i of variance σ_i² on a set O of weights, ``E[L(W+δ)] ≈ L(W) + ½ Σ_{i∈O} σ_i² H_ii``:
training the LoRA on a perturbed base minimises the loss plus the Hessian trace on O, flattening the
loss exactly where RTN will move the most sensitive weights. Default = the authors' released algorithm:

1. every ``rounds``-th of the run, score every quantized base weight (``criterion``; default
   diagonal Fisher over ``calib_windows`` training blocks, batch 1) on the *effective* weight
   ``W0 + ΔW_lora`` (the gradient w.r.t. the frozen base equals the one w.r.t. the merged weight, so
   "merge, then recompute" needs no merge), and take the top ``ratio`` of each module as outliers;
2. draw noise on the outliers (``noise``) and add it to the frozen base weights for the training
   forward/backward passes of each step; the LoRA trains as usual;
3. after training, ``final/`` is the clean base with the LoRA merged in, ready for RTN.

Fixes over the authors' released code: noise comes from generators seeded by
(run seed, round or step), identical on every rank and after a resume; the clean values at the
outlier positions are kept and written back (never ``w + n − n``), so the base is bit-identical
whenever noise is off, which is always outside a step's forward/backward (evaluation and
checkpoints see the clean model); vectorised scatter ops instead of per-row Python loops; and a row
holding a single outlier, which the zero-sum draw leaves at exactly zero, gets noise uniform in ±½
the module's median row range instead (zero-mean in expectation, not per row).

``noise: quant_step`` draws ``U(−Δ/2, Δ/2)·noise_scale`` per outlier with Δ the RTN step of that
weight's channel/group under the run's ``quant`` scheme (computed at the start of each round):
exactly the error RTN will make. ``redraw: step`` draws fresh noise every step instead of once per round.

Multi-process: every rank computes the same masks (same probe blocks) and the same noise (seeded
generators), so the perturbed base stays identical across ranks. ZeRO-3-sharded base weights are not
supported (refused at the start).
"""

from __future__ import annotations

import enum
import math
import time
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from peft.tuners.lora import LoraLayer
from torch.nn.attention import SDPBackend, sdpa_kernel

from qaft.core.errors import PreflightError
from qaft.core.typed import Ge, Gt, Lt
from qaft.quant.grid import quant_step

from .base import Callback, Context
from .registry import CALLBACKS


class Criterion(str, enum.Enum):
    FISHER = "fisher"
    """Diagonal Fisher: Σ over calibration blocks of (∂L/∂w)² (the authors' choice)."""
    ACT_WEIGHTED = "act_weighted"
    """``|w_ij| · mean_t |x_tj|`` (forward passes only)."""
    MAGNITUDE = "magnitude"
    """``|w_ij|`` (no data)."""


class Noise(str, enum.Enum):
    OUTLIER_RANGE = "outlier_range"
    """Per row, uniform between the row's smallest and largest outlier value, minus the row mean of the draws."""
    QUANT_STEP = "quant_step"
    """Uniform in ±Δ/2 per outlier, Δ = the RTN step of its channel/group under ``quant``."""


class Redraw(str, enum.Enum):
    ROUND = "round"
    STEP = "step"


@dataclass(frozen=True, kw_only=True)
class NPFTOptions:
    ratio: Annotated[float, Gt(0.0), Lt(1.0)] = 0.0005
    """Share of each module's weights treated as outliers (the paper: 0.05%)."""
    criterion: Criterion = Criterion.FISHER
    """How outliers are scored: ``fisher``, ``act_weighted`` or ``magnitude``."""
    noise: Noise = Noise.OUTLIER_RANGE
    """``outlier_range`` (the authors') or ``quant_step`` (the RTN error distribution of the run's scheme)."""
    noise_scale: Annotated[float, Ge(0.0)] = 1.0
    """Multiplies the noise; 0 leaves training unchanged."""
    redraw: Redraw = Redraw.ROUND
    """Draw noise once per ``round`` or every ``step``."""
    rounds: Annotated[int, Ge(1)] = 3
    """Outliers are re-scored at the start of each of this many equal parts of the run."""
    calib_windows: Annotated[int, Ge(0)] = 16
    """Training blocks (batch 1, corpus order) for ``fisher`` / ``act_weighted`` scores."""
    hessian_probes: Annotated[int, Ge(0)] = 8
    """Rademacher probes for the Hessian-trace diagnostic on the outliers, at the start and end of training (0 = off)."""
    hessian_windows: Annotated[int, Ge(1)] = 1
    """Training blocks in the diagnostic's loss."""

    def __post_init__(self) -> None:
        if self.criterion is not Criterion.MAGNITUDE and self.calib_windows == 0:
            raise ValueError(
                f"calib_windows: got 0, expected at least 1 for criterion {self.criterion.value!r} "
                "(it scores weights on training blocks); or use criterion: magnitude"
            )


# ---- pure pieces (tested on their own) ---------------------------------------------------------


def top_k_indices(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Flat indices of the ``max(1, round(ratio · numel))`` highest scores, sorted (int64)."""
    k = max(1, round(ratio * scores.numel()))
    return torch.topk(scores.reshape(-1).float(), k, sorted=False).indices.sort().values


def outlier_range_noise(values: torch.Tensor, rows: torch.Tensor, generator: torch.Generator, scale: float) -> torch.Tensor:
    """Noise for outlier ``values`` in ``rows``: per row uniform in [row min, row max], minus the row mean
    (so each row's noise sums to zero); single-outlier rows get ±½ the median multi-outlier row range."""
    uniq, inv, counts = torch.unique(rows, return_inverse=True, return_counts=True)
    n = len(uniq)
    v = values.float()
    lo = torch.full((n,), math.inf).scatter_reduce(0, inv, v, "amin")
    hi = torch.full((n,), -math.inf).scatter_reduce(0, inv, v, "amax")
    u = torch.rand(len(values), generator=generator)
    draw = lo[inv] + u * (hi - lo)[inv]
    mean = torch.zeros(n).scatter_add(0, inv, draw) / counts
    noise = draw - mean[inv]
    single = counts[inv] == 1
    if single.any():
        multi = (hi - lo)[counts > 1]
        width = multi.median() if len(multi) else v.abs().median()
        noise[single] = (u[single] - 0.5) * width
    return noise * scale


def quant_step_noise(delta: torch.Tensor, generator: torch.Generator, scale: float) -> torch.Tensor:
    """``U(−Δ/2, Δ/2) · scale`` per outlier."""
    return (torch.rand(delta.shape, generator=generator) - 0.5) * delta.float() * scale


def hessian_trace(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    mask: Mapping[str, torch.Tensor],
    probes: int = 16,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Hutchinson estimate of ``tr(H)`` restricted to ``mask`` (``{parameter name: flat indices}``), and its standard error.

    ``vᵀ H v`` for Rademacher ``v`` supported on the masked coordinates (zero elsewhere), with ``H v``
    from a second backward through ``autograd.grad(create_graph=True)``; the loss is the mean of
    ``model(**batch).loss`` over ``batches``. Parameters are made to require grad for the call only."""
    params = dict(model.named_parameters())
    targets = [params[n] for n in mask]
    flags = [p.requires_grad for p in targets]
    for p in targets:
        p.requires_grad_(True)
    try:
        batches = list(batches)
        with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
            loss = sum(model(**b).loss for b in batches) / len(batches)
            grads = torch.autograd.grad(loss, targets, create_graph=True)
        estimates = []
        for _ in range(probes):
            vs = []
            for p, idx in zip(targets, mask.values()):
                v = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                v[idx] = (torch.randint(0, 2, (len(idx),), generator=generator) * 2 - 1).to(p.dtype).to(p.device)
                vs.append(v.view_as(p))
            gv = sum((g * v).sum() for g, v in zip(grads, vs))
            with sdpa_kernel(SDPBackend.MATH):
                hv = torch.autograd.grad(gv, targets, retain_graph=True)
            estimates.append(sum((h * v).sum() for h, v in zip(hv, vs)).item())
    finally:
        for p, f in zip(targets, flags):
            p.requires_grad_(f)
            p.grad = None
    t = torch.tensor(estimates, dtype=torch.float64)
    return t.mean().item(), (t.std(unbiased=True) / math.sqrt(len(t))).item() if len(t) > 1 else math.nan


# ---- the callback ------------------------------------------------------------------------------


@dataclass
class _Module:
    """One perturbed base Linear: where its outliers are and what they hold."""

    weight: torch.nn.Parameter
    lora: Any | None
    idx: torch.Tensor | None = None
    clean: torch.Tensor | None = None
    """The clean base values at ``idx``, written back to remove the noise bit-exactly."""
    values: torch.Tensor | None = None
    """The effective (base + LoRA) values at ``idx`` when the round started: ``outlier_range`` draws from their row ranges."""
    noise: torch.Tensor | None = None
    """The round's noise (``redraw: round``)."""
    delta: torch.Tensor | None = None
    """Δ at ``idx`` (``noise: quant_step``)."""


_SAVED = ("idx", "clean", "values", "noise", "delta")


def _generator(*parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(":".join(map(str, parts)).encode()))


class NPFT(Callback):
    name = "npft"
    Options = NPFTOptions

    @classmethod
    def quantized_base_problem(cls, options: NPFTOptions) -> str | None:
        return "it perturbs the float base weights that rounding will move, and in qaft tune the base is already rounded (frozen codes)"

    @classmethod
    def sharded_weights_problem(cls, options: NPFTOptions) -> str | None:
        return "it scores and perturbs whole rows of the base weights in place, which each process holds only a shard of"

    def __init__(self, options: NPFTOptions, *, generator: torch.Generator):
        super().__init__(options, generator=generator)
        self.modules: dict[str, _Module] = {}
        self.round = -1
        self.hessian: dict[str, float] = {}
        self._noisy = False
        self._overhead = 0.0  # seconds spent applying and removing noise this step (not round scoring)
        self._pending: dict[str, Any] | None = None

    @classmethod
    def neutral_options(cls) -> NPFTOptions:
        return NPFTOptions(noise_scale=0.0, hessian_probes=0, calib_windows=2)

    # -- setup

    def _find_modules(self, ctx: Context) -> dict[str, _Module]:
        """The base Linears the run's scheme quantizes (``QuantScheme.linears``), by parameter name."""
        model = ctx.accelerator.unwrap_model(ctx.model)
        names = {id(p): n for n, p in model.named_parameters()}
        found = {}
        for clean_name, mod in ctx.scheme.linears(model).items():
            owner = mod if isinstance(mod, LoraLayer) else None
            weight = mod.get_base_layer().weight if owner is not None else mod.weight
            if getattr(weight, "ds_id", None) is not None or weight.numel() == 0:
                raise PreflightError(
                    f"callbacks.npft: {clean_name}'s weight is sharded (DeepSpeed ZeRO-3?); NPFT perturbs full base weights, use ZeRO-2 or DDP"
                )
            found[names[id(weight)]] = _Module(weight, owner)
        if not found:
            raise PreflightError("callbacks.npft: no decoder Linear matches quant.targets/quant.ignore; NPFT has nothing to perturb")
        return found

    def on_train_begin(self, ctx: Context) -> None:
        self.modules = self._find_modules(ctx)
        if self._pending is not None:  # resumed: adopt the checkpointed round rather than re-scoring it
            for name, saved in self._pending.items():
                m = self.modules[name]
                m.idx, m.clean, m.values, m.noise, m.delta = (None if saved[k] is None else saved[k].to(m.weight.device) for k in _SAVED)
            self._pending = None
        if self.options.hessian_probes and ctx.state.step == 0:
            self._start_round(ctx, 0)
            self.hessian |= dict(zip(("hessian_trace_start", "hessian_trace_start_se"), self._hessian(ctx)))

    def _effective(self, m: _Module) -> torch.Tensor:
        w = m.weight.detach()
        if m.lora is None:
            return w
        delta = sum(m.lora.get_delta_weight(a) for a in m.lora.active_adapters if a in m.lora.lora_A)
        return w + delta

    def _scores(self, ctx: Context) -> dict[str, torch.Tensor]:
        o = self.options
        if o.criterion is Criterion.MAGNITUDE:
            return {n: self._effective(m).abs() for n, m in self.modules.items()}
        model = ctx.accelerator.unwrap_model(ctx.model)
        blocks = self._probe(ctx, o.calib_windows)
        was_training = model.training
        model.eval()
        try:
            if o.criterion is Criterion.FISHER:
                return self._fisher(model, blocks)
            return self._act_weighted(model, blocks)
        finally:
            model.train(was_training)

    def _probe(self, ctx: Context, n: int) -> list[dict[str, torch.Tensor]]:
        if ctx.probe_blocks is None or len(ctx.probe_blocks) == 0:
            raise PreflightError("callbacks.npft: no training blocks to score outliers on; use criterion: magnitude")
        dev = ctx.accelerator.device
        return [{"input_ids": b[None].to(dev), "labels": b[None].to(dev)} for b in ctx.probe_blocks[:n]]

    def _fisher(self, model: torch.nn.Module, blocks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``autograd.grad``, not ``backward``: it leaves every ``.grad`` alone and fires no gradient hook,
        so the adapter's accumulated gradients (and DeepSpeed's buffers, which hooks fill) are untouched."""
        weights = {n: m.weight for n, m in self.modules.items()}
        fisher = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
        for w in weights.values():
            w.requires_grad_(True)
        try:
            for b in blocks:  # batch 1: the diagonal Fisher is a sum of per-sample squared gradients
                grads = torch.autograd.grad(model(**b).loss, list(weights.values()))
                for f, g in zip(fisher.values(), grads):
                    f.add_(g.float().square())
        finally:
            for w in weights.values():
                w.requires_grad_(False)
        return fisher

    @torch.no_grad()
    def _act_weighted(self, model: torch.nn.Module, blocks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        owners = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and f"{n}.weight" in self.modules}
        sums = {f"{n}.weight": torch.zeros(m.in_features) for n, m in owners.items()}
        tokens = [0]
        hooks = [
            m.register_forward_pre_hook(
                lambda mod, args, k=f"{n}.weight": sums[k].add_(args[0].detach().abs().reshape(-1, args[0].shape[-1]).sum(0).float().cpu())
            )
            for n, m in owners.items()
        ]
        try:
            for b in blocks:
                model(**b)
                tokens[0] += b["input_ids"].numel()
        finally:
            for h in hooks:
                h.remove()
        return {n: self._effective(m).abs() * (sums[n] / tokens[0]).to(m.weight.device) for n, m in self.modules.items()}

    def _start_round(self, ctx: Context, r: int) -> None:
        """Score, select outliers, keep their clean values, prepare Δ or the round's noise."""
        self._remove_noise()
        scores = self._scores(ctx)
        with torch.no_grad():
            self._select(ctx, r, scores)
        self.round = r

    def _select(self, ctx: Context, r: int, scores: dict[str, torch.Tensor]) -> None:
        o = self.options
        for name, m in self.modules.items():
            m.idx = top_k_indices(scores[name], o.ratio).to(m.weight.device)
            flat = m.weight.detach().view(-1)
            m.clean = flat[m.idx].clone()
            eff = self._effective(m)
            m.values = eff.reshape(-1)[m.idx].clone()
            m.delta = quant_step(eff, ctx.scheme.weight).reshape(-1)[m.idx].clone() if o.noise is Noise.QUANT_STEP else None
            m.noise = self._draw(m, _generator(ctx.seed, self.name, "round", r, name)) if o.redraw is Redraw.ROUND else None

    def _draw(self, m: _Module, g: torch.Generator) -> torch.Tensor:
        o = self.options
        if o.noise is Noise.QUANT_STEP:
            n = quant_step_noise(m.delta.cpu(), g, o.noise_scale)
        else:
            n = outlier_range_noise(m.values.cpu(), m.idx.cpu() // m.weight.shape[1], g, o.noise_scale)
        return n.to(device=m.weight.device, dtype=m.weight.dtype)

    # -- per step

    def _round_length(self, ctx: Context) -> int:
        return max(1, math.ceil(ctx.state.max_steps / self.options.rounds))

    def on_step_begin(self, ctx: Context) -> None:
        r = min(ctx.state.step // self._round_length(ctx), self.options.rounds - 1)
        if r != self.round or any(m.idx is None for m in self.modules.values()):
            self._start_round(ctx, r)
        t0 = time.perf_counter()
        with torch.no_grad():
            for name, m in self.modules.items():
                noise = m.noise
                if self.options.redraw is Redraw.STEP:
                    noise = self._draw(m, _generator(ctx.seed, self.name, "step", ctx.state.step, name))
                m.weight.view(-1)[m.idx] = m.clean + noise
        self._noisy = True
        self._overhead += time.perf_counter() - t0

    @torch.no_grad()
    def _remove_noise(self) -> None:
        if not self._noisy:
            return
        t0 = time.perf_counter()
        for m in self.modules.values():
            m.weight.view(-1)[m.idx] = m.clean
        self._noisy = False
        self._overhead += time.perf_counter() - t0

    def on_gradients(self, ctx: Context) -> None:
        self._remove_noise()  # the optimizer step, evaluation and checkpoints see the clean base

    def on_step_end(self, ctx: Context) -> dict[str, float]:
        self._remove_noise()
        out = {"round": float(self.round), "outliers": float(sum(len(m.idx) for m in self.modules.values())), "noise_s": self._overhead}
        self._overhead = 0.0
        if ctx.state.step == ctx.state.max_steps and self.options.hessian_probes:
            self.hessian |= dict(zip(("hessian_trace_end", "hessian_trace_end_se"), self._hessian(ctx)))
        if self.hessian:
            out |= self.hessian
            self.hessian = {}
        return out

    def on_train_end(self, ctx: Context) -> None:
        self._remove_noise()

    def _hessian(self, ctx: Context) -> tuple[float, float]:
        model = ctx.accelerator.unwrap_model(ctx.model)
        was_training = model.training
        model.eval()
        try:
            mask = {n: m.idx for n, m in self.modules.items()}
            g = _generator(ctx.seed, self.name, "hutchinson", ctx.state.step)
            return hessian_trace(model, self._probe(ctx, self.options.hessian_windows), mask, self.options.hessian_probes, g)
        finally:
            model.train(was_training)

    # -- checkpoint

    def state_dict(self) -> dict[str, Any]:
        cpu = lambda t: None if t is None else t.detach().cpu().clone()  # noqa: E731
        return {
            **super().state_dict(),
            "round": self.round,
            "modules": {
                n: {k: cpu(getattr(m, k).to(torch.int32) if k == "idx" and m.idx is not None else getattr(m, k)) for k in _SAVED}
                for n, m in self.modules.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.round = state["round"]
        self._pending = {n: {**s, "idx": None if s["idx"] is None else s["idx"].long()} for n, s in state["modules"].items()} or None


CALLBACKS.register(NPFT)

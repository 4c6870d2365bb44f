"""Temporal distillation (TSKD; Wang et al., arXiv 2307.00811), adapted to a causal LM trained with LoRA.

The student "reviews": a Conv-LSTM reads how its own features moved over earlier training phases
and forecasts the student–teacher gap, so the target moves with the student instead of being fixed.

- Feature map of a chosen decoder layer = per-token energy ``mean_d(h²)``, L2-normalised over each
  sequence (``[batch, tokens]``); the chosen layers are the Conv-LSTM's channels.
- Snapshots = LoRA states taken at every phase boundary (``phase_steps``), the last ``history`` (K) kept
  in a ring, oldest first. Every ``review_every``-th phase is a review phase (once the ring is full).
- On review phases, per micro-batch: features under each snapshot (no grad; adapters swapped in place,
  forward stopped after the deepest chosen layer) A_1..A_K, and under the current student with grad
  A_c, give the increments ``[|A_1−A_2|, …, |A_{K−1}−A_K|, |A_K−A_c|]`` (K maps); the forecaster
  predicts the next increment P; its target is the current gap ``|A_c − A_teacher|``; loss term
  ``mse = weight · MSE(P, gap)``. Student and Conv-LSTM train together (no stop-gradient), as in the paper.
- Every micro-batch: ``kl = kl_weight · T² · KL(teacher ‖ student)`` of next-token distributions at
  temperature T. Teacher = the frozen base with the adapters disabled (under NPFT: the base as it is
  during the step, i.e. with its noise).

The Conv-LSTM has its own Adam optimizer, stepped once per optimizer step (its gradients averaged
across processes); both, and the snapshot ring, are checkpointed. Fixed from the official code:
peepholes are registered parameters, the loss weight is used, snapshots live in memory (LoRA states
are small) instead of being reloaded from disk for every batch.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import torch
import torch.nn.functional as F

from qaft.core.errors import PreflightError
from qaft.core.modules import decoder_layers
from qaft.core.typed import Ge, Gt

from .base import Callback, Context
from .convlstm import ConvLSTMForecaster
from .registry import CALLBACKS


@dataclass(frozen=True, kw_only=True)
class TemporalKDOptions:
    layers: tuple[int, ...] = (-1,)
    """Decoder layers whose per-token energy forms the feature maps (negative counts from the end)."""
    history: Annotated[int, Ge(1)] = 3
    """K: LoRA snapshots kept (one per phase boundary)."""
    phase_steps: Annotated[int, Ge(1)] = 50
    """Optimizer steps per phase."""
    review_every: Annotated[int, Ge(1)] = 4
    """Every this-many-th phase is a review phase (the forecast loss is on)."""
    weight: Annotated[float, Ge(0.0)] = 1.0
    """Weight of MSE(forecast, gap)."""
    kl_weight: Annotated[float, Ge(0.0)] = 1.0
    """Weight of the KL to the teacher (0 = no KL term)."""
    temperature: Annotated[float, Gt(0.0)] = 4.0
    """Softmax temperature of the KL term."""
    hidden: Annotated[int, Ge(1)] = 16
    """Conv-LSTM hidden channels."""
    kernel: Annotated[int, Ge(1)] = 3
    """Conv-LSTM gate convolution width over tokens (odd)."""
    lr: Annotated[float, Gt(0.0)] = 1e-3
    """Learning rate of the Conv-LSTM's Adam."""

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("layers: got an empty list, expected at least one decoder layer index")
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel: got {self.kernel}, expected an odd width (the convolution keeps the token count)")


def energy(h: torch.Tensor) -> torch.Tensor:
    """Per-token energy ``mean_d(h²)``, L2-normalised over each sequence: ``[batch, tokens, d]`` → ``[batch, tokens]``."""
    return F.normalize(h.float().pow(2).mean(-1), dim=-1)


def increments(history: list[torch.Tensor], current: torch.Tensor) -> torch.Tensor:
    """``[|A_1−A_2|, …, |A_K−A_c|]`` stacked on a time axis: K × ``[b, C, T]`` (oldest first) + ``[b, C, T]`` → ``[b, K, C, T]``."""
    seq = [*history, current]
    return torch.stack([(b - a).abs() for a, b in zip(seq, seq[1:])], dim=1)


@contextmanager
def adapters_off(model: torch.nn.Module) -> Iterator[None]:
    """peft's ``disable_adapter``, leaving every ``requires_grad`` flag as it found it.

    Re-enabling adapters makes peft set ``requires_grad=True`` on all of them, which would undo
    another callback's freezing (MAT stops the gradients of fully gated tensors)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with model.disable_adapter():
            yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


class _Stop(Exception):
    """Ends a forward pass once the deepest chosen layer has run."""


class TemporalKD(Callback):
    name = "temporal_kd"
    Options = TemporalKDOptions

    @classmethod
    def quantized_base_problem(cls, options: TemporalKDOptions) -> str | None:
        return "its teacher is the base with peft adapters switched off; qaft tune already distils from the float model (tune.objective kd)"

    @classmethod
    def sharded_weights_problem(cls, options: TemporalKDOptions) -> str | None:
        return "its snapshot ring copies and swaps whole adapter tensors, which each process holds only a shard of"

    def __init__(self, options: TemporalKDOptions, *, generator: torch.Generator):
        super().__init__(options, generator=generator)
        with torch.random.fork_rng(devices=[]):  # initialise from our own generator, not the global RNG
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            self.net = ConvLSTMForecaster(len(options.layers), options.hidden, options.kernel)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=options.lr)
        self.ring: deque[dict[str, torch.Tensor]] = deque(maxlen=options.history)
        self._captured: dict[int, torch.Tensor] = {}
        self._stop_after: int | None = None
        self._hooks: list[Any] = []
        self._extra = 0.0
        self._mse: list[float] = []

    @classmethod
    def neutral_options(cls) -> TemporalKDOptions:
        return TemporalKDOptions(weight=0.0, kl_weight=0.0, phase_steps=10**9)

    # -- setup

    def on_train_begin(self, ctx: Context) -> None:
        model = ctx.accelerator.unwrap_model(ctx.model)
        if not hasattr(model, "disable_adapter"):
            raise PreflightError(
                "callbacks.temporal_kd: the teacher is the frozen base with the adapters disabled, and this run has no adapter; train with LoRA"
            )
        _, layers = decoder_layers(model)
        n = len(layers)
        bad = [i for i in self.options.layers if not -n <= i < n]
        if bad:
            raise PreflightError(
                f"callbacks.temporal_kd.layers: {bad} out of range for a model with {n} decoder layers (use 0..{n - 1} or negative from the end)"
            )
        self.index = sorted({i % n for i in self.options.layers})
        self.channel = [self.index.index(i % n) for i in self.options.layers]
        self.net.to(ctx.accelerator.device)
        for st in self.opt.state.values():  # a resumed optimizer state was loaded on the CPU
            for k, v in st.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    st[k] = v.to(ctx.accelerator.device)
        for i in self.index:
            self._hooks.append(layers[i].register_forward_hook(lambda mod, args, out, i=i: self._capture(i, out)))

    def _capture(self, i: int, out: Any) -> None:
        self._captured[i] = out[0] if isinstance(out, tuple) else out
        if self._stop_after == i:
            raise _Stop

    def _features(self) -> torch.Tensor:
        """``[b, C, T]`` energy maps of the captured layers, in the configured order."""
        return torch.stack([energy(self._captured[self.index[c]]) for c in self.channel], dim=1)

    # -- snapshots

    def _trainable(self, ctx: Context) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in ctx.accelerator.unwrap_model(ctx.model).named_parameters() if p.requires_grad}

    def on_step_begin(self, ctx: Context) -> None:
        step = ctx.state.step
        if step > 0 and step % self.options.phase_steps == 0 and (not self.ring or self.ring[-1].get("__step__") != step):
            snap = {n: p.detach().cpu().clone() for n, p in self._trainable(ctx).items()}
            snap["__step__"] = step
            self.ring.append(snap)

    def _reviewing(self, ctx: Context) -> bool:
        phase = ctx.state.step // self.options.phase_steps
        return self.options.weight > 0 and len(self.ring) == self.options.history and (phase + 1) % self.options.review_every == 0

    @torch.no_grad()
    def _history_features(self, ctx: Context, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Features of ``input_ids`` under each snapshot (oldest first).

        The snapshot's adapter is passed to ``torch.func.functional_call`` rather than copied into the
        live parameters: an in-place swap would bump their version counters between the student's
        forward and its backward, which autograd rightly refuses."""
        model = ctx.accelerator.unwrap_model(ctx.model)
        device = input_ids.device
        out = []
        self._stop_after = self.index[-1]
        was_training = model.training
        model.eval()  # no adapter dropout: a snapshot's features, not a random mask's
        try:
            for snap in self.ring:
                weights = {n: t.to(device) for n, t in snap.items() if n != "__step__"}
                try:
                    torch.func.functional_call(model, weights, (), {"input_ids": input_ids}, strict=False)
                except _Stop:
                    pass
                out.append(self._features())
        finally:
            self._stop_after = None
            model.train(was_training)
        return out

    # -- loss

    def loss_terms(self, ctx: Context, batch: Mapping[str, torch.Tensor], outputs: Any) -> dict[str, torch.Tensor]:
        o = self.options
        if o.weight == 0 and o.kl_weight == 0:
            return {}
        t0 = time.perf_counter()
        student = self._features()  # captured during the loop's own forward, with grad
        model = ctx.accelerator.unwrap_model(ctx.model)
        with torch.no_grad(), adapters_off(model):
            teacher_logits = model(input_ids=batch["input_ids"]).logits
        teacher = self._features()
        terms = {}
        if o.kl_weight > 0:
            t = o.temperature
            s_log = F.log_softmax(outputs.logits.float() / t, dim=-1)
            t_log = F.log_softmax(teacher_logits.float() / t, dim=-1)
            kl = F.kl_div(s_log.flatten(0, 1), t_log.flatten(0, 1), log_target=True, reduction="batchmean")
            terms["kl"] = o.kl_weight * t * t * kl
        if self._reviewing(ctx):
            history = self._history_features(ctx, batch["input_ids"])
            forecast = self.net(increments(history, student))
            mse = F.mse_loss(forecast, (student - teacher).abs())
            self._mse.append(mse.item())
            terms["mse"] = o.weight * mse
        self._extra += time.perf_counter() - t0
        return terms

    def on_step_end(self, ctx: Context) -> dict[str, float]:
        acc = ctx.accelerator
        if any(p.grad is not None for p in self.net.parameters()):
            if acc.num_processes > 1:
                for p in self.net.parameters():
                    if p.grad is not None:
                        p.grad = acc.reduce(p.grad, reduction="mean")
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        out = {"extra_s": self._extra, "snapshots": float(len(self.ring))}
        if self._mse:
            out["forecast_mse"] = sum(self._mse) / len(self._mse)
        self._extra, self._mse = 0.0, []
        return out

    def on_train_end(self, ctx: Context) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- checkpoint

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "net": self.net.state_dict(), "opt": self.opt.state_dict(), "ring": [dict(s) for s in self.ring]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.ring = deque((dict(s) for s in state["ring"]), maxlen=self.options.history)


CALLBACKS.register(TemporalKD)

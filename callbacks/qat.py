"""QAT: quantization-aware LoRA training with a straight-through estimator.

Every Linear the run's ``quant`` scheme targets computes, in training and evaluation alike,
``y = Q_a(x) · Q(W + s·BA)ᵀ + b``: the RTN grid of the *merged* weight (and the scheme's dynamic
activation quantization, if it has A-bits), i.e. exactly the layer that ``qaft quantize`` with RTN
will deploy from ``final/``. The adapter therefore learns what survives rounding, and RTN of
``final/`` reproduces the last training-time forward bit for bit (tested).

Gradient (straight-through, identity: the max-abs / min–max grids clip no weight except, at most,
a group's extreme through float rounding): ``∂L/∂W' = gᵀ Q_a(x)``, hence ``∂L/∂B = s·gᵀ(Q_a(x)Aᵀ)``
and ``∂L/∂A = s·Bᵀgᵀ Q_a(x)``. We get these from a LoRA branch on the (detached) quantized input
whose *value* is subtracted out again, so a QAT step costs a plain LoRA step plus the elementwise
rounding of each weight, never the ``[out, in]`` weight gradient. LoRA dropout acts on that branch
only: it randomises the adapter's gradient as in plain LoRA, while the forward stays the deployed
layer. The input gradient flows through ``Q(W')`` (and the identity STE of ``Q_a``).

``init: loftq`` replaces each targeted base weight by ``Q(W − s·B₀A₀)`` and starts the adapter at
``B₀A₀`` (``quant/loftq.py``, against the run's scheme): the float merged model starts within the
LoftQ residual of ``W`` and both factors get gradients from step 0. Checkpoints hold the adapter only,
so the callback state keeps, per layer, the rank-r factors the base was quantized against
(``LoftQResult.shift``); a resume rebuilds ``Q(W − s·B₀A₀)`` from the original weights with them,
bit for bit, instead of storing a second copy of the model.
``start_step`` trains plain LoRA first and switches the quantized forward on at that step
(torchao's "fake quant after n steps"). Adapters disabled (e.g. temporal distillation's teacher)
give the untouched float layer. Combining with ``npft`` is refused: both redefine what the
forward reads of the base weight, and neither order is defined.
"""

from __future__ import annotations

import enum
import statistics
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer

from qaft.core.errors import PreflightError
from qaft.core.typed import Ge
from qaft.quant.grid import fake_quant_activation, quantize_weight
from qaft.quant.loftq import loftq, loftq_base
from qaft.quant.scheme import ActQuant, QuantScheme, WeightQuant

from .base import Callback, Context
from .registry import CALLBACKS


class Init(str, enum.Enum):
    ZERO = "zero"
    """peft's default (``B = 0``): training starts from RTN of the original weights."""
    LOFTQ = "loftq"
    """LoftQ against the run's scheme: base ← ``Q(W − s·BA)``, adapter ← rank-r SVD of the residual."""


@dataclass(frozen=True, kw_only=True)
class QATOptions:
    init: Init = Init.ZERO
    """Adapter initialisation: ``zero`` (peft's) or ``loftq``."""
    iters: Annotated[int, Ge(1)] = 1
    """LoftQ alternations (``init: loftq``; peft's default is 1)."""
    start_step: Annotated[int, Ge(0)] = 0
    """Optimizer steps of plain LoRA before the quantized forward switches on."""


def ste_activation(x: torch.Tensor, act: ActQuant) -> torch.Tensor:
    """``Q_a(x)`` in the forward, identity in the backward."""
    if act.bits is None:
        return x
    return x + (fake_quant_activation(x, act) - x).detach()


@torch.no_grad()
def quantized_weight(w: torch.Tensor, spec: WeightQuant) -> torch.Tensor:
    """RTN grid values of ``w``, by the same function (and so the same bits) as the post-pass."""
    return quantize_weight(w, spec).dequant


def _lora_forward(layer: Any, scheme: QuantScheme):
    """``forward`` for one peft ``lora.Linear``: the deployed layer's value, the adapter's gradient."""
    original = layer.forward

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapters = [a for a in self.active_adapters if a in self.lora_A]
        if self.disable_adapters or self.merged or not adapters:
            return original(x, *args, **kwargs)
        base = self.get_base_layer()
        # float32 even under bf16 autocast: B·A in bf16 would move weights across rounding boundaries, and the
        # grid must be the one the float32 merge_and_unload + post-pass deploy; only the matmul below is bf16.
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            merged = base.weight + sum(self.get_delta_weight(a) for a in adapters)  # what merge_and_unload stores
            grid = quantized_weight(merged, scheme.weight)
        xq = ste_activation(x, scheme.activation)
        y = F.linear(xq, grid, base.bias)
        xd = xq.detach()
        for a in adapters:
            branch = self.lora_B[a](self.lora_A[a](self.lora_dropout[a](xd.to(self.lora_A[a].weight.dtype)))) * self.scaling[a]
            y = y + (branch - branch.detach()).to(y.dtype)  # value 0, gradient = the adapter's share of ∂L/∂W'
        return y

    return original, types.MethodType(forward, layer)


def _linear_forward(layer: torch.nn.Linear, scheme: QuantScheme):
    """``forward`` for a targeted Linear without an adapter: frozen, so its grid is computed once."""
    original = layer.forward
    grid = quantized_weight(layer.weight, scheme.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(ste_activation(x, scheme.activation), grid, self.bias)

    return original, types.MethodType(forward, layer)


@CALLBACKS.register
class QAT(Callback):
    name = "qat"
    Options = QATOptions
    conflicts = {"npft": "both redefine the base weight the forward reads (NPFT adds noise to W, QAT rounds W + s·BA) and no order is defined; use one"}

    @classmethod
    def quantized_base_problem(cls, options: QATOptions) -> str | None:
        return "qaft tune's model is already the quantized forward QAT simulates"

    @classmethod
    def sharded_weights_problem(cls, options: QATOptions) -> str | None:
        return "its forward rounds the whole merged weight W + s·BA, read outside the base layer's own forward, where ZeRO-3/FSDP would gather it"

    def __init__(self, options: QATOptions, *, generator: torch.Generator):
        super().__init__(options, generator=generator)
        self.initialized = False  # LoftQ has rewritten the base weights
        self.loftq_stats: dict[str, float] = {}
        # per "module/adapter": the factors the LoftQ base was quantized against (None: Q(W)). Checkpoints keep the
        # adapter only, so a resume rebuilds the grid base from the original weights with these (bit-exact, small).
        self.loftq_shift: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._originals: dict[torch.nn.Module, Any] = {}

    @classmethod
    def neutral_options(cls) -> QATOptions:
        return QATOptions(start_step=10**9)

    # -- setup

    def _targets(self, ctx: Context) -> dict[str, torch.nn.Module]:
        """The Linears the post-pass will quantize (``QuantScheme.linears``): peft layer or plain Linear."""
        found = ctx.scheme.linears(ctx.accelerator.unwrap_model(ctx.model))
        if not found:
            raise PreflightError("callbacks.qat: no decoder Linear matches quant.targets/quant.ignore; QAT has nothing to quantize")
        return found

    def on_train_begin(self, ctx: Context) -> None:
        self.modules = self._targets(ctx)
        if self.options.init is Init.LOFTQ:
            self._rebuild_base(ctx) if self.initialized else self._loftq(ctx)
        self._sync(ctx)

    def _lora_weights(self, ctx: Context):
        """``(key, layer, adapter, base weight)`` for every active LoRA adapter on a target (full weights required)."""
        for name, mod in self.modules.items():
            if not isinstance(mod, LoraLayer):
                continue
            for a in (a for a in mod.active_adapters if a in mod.lora_A):
                base = mod.get_base_layer().weight
                if getattr(base, "ds_id", None) is not None or base.numel() == 0:
                    raise PreflightError(
                        f"callbacks.qat: {name}'s weight is sharded (DeepSpeed ZeRO-3?); init: loftq rewrites full base weights, use ZeRO-2 or DDP"
                    )
                yield f"{name}/{a}", mod, a, base

    @torch.no_grad()
    def _rebuild_base(self, ctx: Context) -> None:
        """After a resume: the model was loaded from the original weights; put the LoftQ grid base back."""
        for key, mod, a, base in self._lora_weights(ctx):
            if key not in self.loftq_shift:
                raise PreflightError(
                    f"callbacks.qat: the checkpoint has no LoftQ record for {key}; resume with the targets and LoRA config it was written with"
                )
            base.copy_(loftq_base(base, ctx.scheme.weight, self.loftq_shift[key], float(mod.scaling[a])).to(base.dtype))

    @torch.no_grad()
    def _loftq(self, ctx: Context) -> None:
        ratios = []
        for key, mod, a, base in list(self._lora_weights(ctx)):
            r = loftq(base, ctx.scheme.weight, mod.r[a], float(mod.scaling[a]), self.options.iters)
            base.copy_(r.base)
            mod.lora_A[a].weight.copy_(r.lora_A)
            mod.lora_B[a].weight.copy_(r.lora_B)
            self.loftq_shift[key] = r.shift
            ratios.append([res / r.rtn_residual for res in r.residuals])
        self.initialized = True
        for i in range(self.options.iters):  # the residual relative to plain RTN's, per iteration (median over layers)
            self.loftq_stats[f"loftq_residual_vs_rtn_iter{i + 1}"] = statistics.median(x[i] for x in ratios)

    # -- the quantized forward

    def _sync(self, ctx: Context) -> None:
        if not self._originals and ctx.state.step >= self.options.start_step:
            for mod in self.modules.values():
                original, patched = (_lora_forward if isinstance(mod, LoraLayer) else _linear_forward)(mod, ctx.scheme)
                mod.forward = patched
                self._originals[mod] = original

    def on_step_begin(self, ctx: Context) -> None:
        self._sync(ctx)

    def on_step_end(self, ctx: Context) -> dict[str, float]:
        out = {"active": float(bool(self._originals))}
        if self.loftq_stats and ctx.state.step == 1:
            out |= self.loftq_stats
        return out

    def on_train_end(self, ctx: Context) -> None:
        for mod in self._originals:
            del mod.forward  # back to the class's forward (the instance attribute goes)
        self._originals = {}

    # -- state

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "initialized": self.initialized, "loftq_stats": dict(self.loftq_stats), "loftq_shift": dict(self.loftq_shift)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.initialized = bool(state["initialized"])
        self.loftq_stats = dict(state["loftq_stats"])
        self.loftq_shift = dict(state["loftq_shift"])

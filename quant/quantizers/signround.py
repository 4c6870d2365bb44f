"""SignRound: learned rounding offsets and clipping by signed gradient descent, on qaft's grids.

The method of Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent for the Quantization
of LLMs" (arXiv 2309.05516), which Intel's AutoRound implements.

Each weight is rounded as ``round(w/Δ + V)`` instead of ``round(w/Δ)``, with a learned ``V ∈ [−½, ½]``
per weight, and on int grids each row/group's range is clipped by learned factors ``α`` (of its max)
and ``β`` (of its min) in ``[min_clip, 1]``. Both are trained by signed gradient descent (each step
moves every parameter by ``lr · sign(grad)``, ``lr`` decaying linearly to 0, so ``iters`` steps of
``lr = 1/iters`` can move ``V`` across its whole range, AutoRound's default) on the Linear's output
error on the calibration inputs. The iterate with the lowest error is kept, the start (RTN) included,
so the result is never worse than RTN on that error, and ``iters: 0`` is RTN bit for bit.

Our reading, and why:

- **Two objectives** (``objective``). ``linear``: per Linear, ``‖X (W − Q)ᵀ‖² = tr(E H Eᵀ)`` with
  ``H = XᵀX / n`` (what GPTQ minimises too), from the statistics every method shares: exact over *all*
  calibration tokens, ``out · in²`` per step whatever the token count, no activations kept; blind to
  the interactions between one layer's Linears and to its non-linearities. ``block``: AutoRound's, all
  Linears of a decoder layer at once, the squared error of the layer's output against the *float*
  layer's output on the *float* stream of inputs, while the quantized layer reads the quantized stream
  (AutoRound's ``enable_quanted_input``): the rounding also learns to absorb the error the layers below
  left. Each step sums the gradients of ``batch`` calibration sequences (cycling through them; the
  iterate kept is the one with the lowest loss on its step's batch, as AutoRound does), under bf16
  autocast where the CPU has bf16 units. The layer is simulated as deployed (``QuantLinear``'s input
  smoothing, activation rounding and low-rank correction). ``block`` is the default: on SmolLM2 at 50
  steps it reaches 37.31 (W4 per-channel) and 33.96 (W4 g64) where ``linear`` reaches 41.63 and 40.53,
  in about 1.5× the time.
- **With a reconstructor** (``block``): its correction is solved first, on the round-to-nearest residual
  (the closed form), and held fixed while the rounding is learned around it, so the refinement fits codes
  and factors together and starts from the closed form. The other order — refine alone, then solve the
  correction on the refined residual — is worse than no correction at all on SmolLM2 (W4 g64 −8…7 + whiten
  r7: 33.56 alone, 33.81 with it, 33.50 held, 32.04 after ``qaft tune``): a block-refined residual is not an error to undo, it is
  rounding chosen for the layer as a whole, and a per-Linear correction pulls each Linear back towards its
  float weight. ``linear`` quantizes each Linear alone, and the reconstructor works on its residual.
- **Gradients**: straight-through through ``round`` (and through the activation rounding); ``clamp`` passes none outside the grid's range
  (AutoRound's choice), which is what lets ``α < 1`` trade clipping against resolution.
- **Grids**: int (symmetric or asymmetric; per tensor, channel or group): ``V`` and ``α``/``β``. MXINT and
  GGUF Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0: ``V`` only, because their scales follow the format's rule
  (powers of two; llama.cpp re-derives a block's scale from its values), so ``minmax`` is off there and
  refused when asked for. GGUF MXFP4's values are not evenly spaced (no single ``Δ`` to offset by):
  refused.
- The calibration is the post-pass's (``postpass.calibration_samples`` × ``calibration_seq_len``),
  shared with every other method, so there are no separate ``nsamples`` / ``seqlen`` options.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F

from qaft.core.hardware import resolve_bf16
from qaft.core.modules import hidden_states, set_submodule
from qaft.core.typed import Ge, Le

from .. import ggufgrid
from ..calibrate import LayerStats
from ..fakequant import deployed_input
from ..grid import (
    QuantizedWeight,
    asymmetric_scale,
    grid_params,
    group_view,
    int_code_range,
    pack,
    quantize_weight,
    round_to_grid,
    symmetric_peak,
    symmetric_scale,
    working,
)
from ..scheme import ActQuant, GGUFType, WeightFormat, WeightQuant
from .base import QUANTIZERS, Block, QuantizationFailed, Refined, WeightQuantizer


class Objective(str, enum.Enum):
    LINEAR = "linear"
    """Each Linear's output error from the calibration statistics, ``tr(E H Eᵀ)``: exact over all tokens, cheap."""
    BLOCK = "block"
    """The decoder layer's output against the float layer's, all its Linears at once (AutoRound's objective)."""


@dataclass(frozen=True, kw_only=True)
class SignRoundOptions:
    iters: Annotated[int, Ge(0)] = 200
    """Signed-gradient steps per decoder layer (``block``) or per Linear (``linear``): AutoRound's default; its light setting is 50; 0 = RTN."""
    lr: Annotated[float, Ge(0.0)] | None = None
    """Step size at the start (decays linearly to 0); null = 1 / iters."""
    minmax: bool | None = None
    """Also learn the clipping of each row/group's range; null = where the grid's scales are free (int), off for MXINT / GGUF."""
    min_clip: Annotated[float, Ge(0.0), Le(1.0)] = 0.5
    """Smallest clipping factor of a range (1 = no clipping)."""
    objective: Objective = Objective.BLOCK
    """``block`` (per decoder layer, against the float layer's output: better, ~1.5x the time) or ``linear`` (per Linear, from the statistics)."""
    batch: Annotated[int, Ge(1)] = 4
    """Calibration sequences per step of the block objective (consecutive; the steps cycle through the calibration)."""
    bf16: bool | Literal["auto"] = "auto"
    """bf16 autocast for the block objective's forward and backward; auto = where the CPU/GPU has bf16 units."""


def _ste(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y``'s value with ``x``'s gradient (straight-through); exactly ``y`` when no gradient is recorded."""
    return x + (y - x).detach() if torch.is_grad_enabled() else y


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return _ste(x, torch.round(x))


class _Grid:
    """The rounding of one weight as a differentiable function of ``V`` (and ``α``, ``β`` on int grids)."""

    def __init__(self, g: torch.Tensor, spec: WeightQuant, minmax: bool):
        self.g, self.spec, self.minmax = g, spec, minmax
        self.scale, self.zero = grid_params(g, spec)  # RTN's grid: the start, and the fixed grid without minmax
        if spec.gguf_type is not None:
            self.step = ggufgrid.step(g, self.scale, spec.gguf_type)
        else:
            self.step = self.scale.expand_as(g)
        if minmax:
            self.hi = symmetric_peak(g, spec) if spec.symmetric else g.amax(-1, keepdim=True).clamp(min=0)
            self.lo = None if spec.symmetric else g.amin(-1, keepdim=True).clamp(max=0)

    def int_grid(self, alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``grid.grid_params``'s int rule on the clipped range; at ``α = β = 1`` exactly RTN's grid."""
        if self.spec.symmetric:
            return symmetric_scale(self.hi * alpha, self.spec), None
        lo = self.lo * beta
        scale = asymmetric_scale(self.hi * alpha - lo, self.hi > self.lo, self.spec)
        return scale, _ste_round(-lo / scale)

    def __call__(self, v: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(codes, dequantized, scale, zero)``; ``dequantized`` carries gradients to ``v`` (and ``α``, ``β``)."""
        if not self.minmax:  # a fixed grid: round the shifted weight by the format's own rule, straight through
            x = self.g + v * self.step
            codes, deq = round_to_grid(x.detach(), self.scale, self.zero, self.spec)
            return codes, _ste(x, deq), self.scale, self.zero
        scale, zero = self.int_grid(alpha, beta)
        lo, hi = int_code_range(self.spec)
        if zero is None:
            codes = torch.clamp(_ste_round(self.g / scale + v), lo, hi)
            return codes.detach(), codes * scale, scale, None
        codes = torch.clamp(_ste_round(self.g / scale + v) + zero, lo, hi)
        return codes.detach(), (codes - zero) * scale, scale, zero


class _Rounding:
    """One weight's learnable rounding: ``V`` (and ``α``, ``β``), starting at RTN."""

    def __init__(self, w: torch.Tensor, spec: WeightQuant, minmax: bool):
        self.like, self.spec = w, spec
        self.W = working(w.detach())  # RTN's working precision
        self.grid = _Grid(group_view(self.W, spec), spec, minmax)
        self.v = torch.zeros_like(self.grid.g, requires_grad=True)
        shape = self.grid.scale.shape
        self.alpha = torch.ones(shape, dtype=self.W.dtype, device=w.device, requires_grad=minmax)
        self.beta = torch.ones(shape, dtype=self.W.dtype, device=w.device, requires_grad=minmax and not spec.symmetric)

    def params(self) -> list[torch.Tensor]:
        return [p for p in (self.v, self.alpha, self.beta) if p.requires_grad]

    def dequant(self) -> torch.Tensor:
        """``[out, in]`` the grid values under the current parameters (differentiable in them)."""
        return self.grid(self.v, self.alpha, self.beta)[1].reshape(self.W.shape)

    def state(self) -> tuple[torch.Tensor, ...]:
        return tuple(p.detach().clone() for p in (self.v, self.alpha, self.beta))

    @torch.no_grad()
    def load(self, state: tuple[torch.Tensor, ...]) -> None:
        for p, s in zip((self.v, self.alpha, self.beta), state):
            p.copy_(s)

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], lr: float, min_clip: float) -> None:
        for p, g in zip(self.params(), grads):
            p -= lr * g.sign()
        self.v.clamp_(-0.5, 0.5)
        self.alpha.clamp_(min_clip, 1.0)
        self.beta.clamp_(min_clip, 1.0)

    @torch.no_grad()
    def result(self) -> QuantizedWeight:
        codes, deq, scale, zero = self.grid(self.v, self.alpha, self.beta)
        return pack(codes, scale, zero, deq, self.like, self.spec)


Evaluate = Callable[[int, bool], tuple[float, list[torch.Tensor] | None]]
"""``(step, with_gradients) -> (loss, gradients of every parameter in order, or None)``."""


def descend(roundings: list[_Rounding], evaluate: Evaluate, options: SignRoundOptions) -> None:
    """Signed gradient descent on ``roundings`` (``lr`` decaying linearly to 0); loads the iterate with the lowest
    loss, the start included."""
    iters = options.iters
    lr = options.lr if options.lr is not None else 1.0 / max(iters, 1)
    sizes = [len(r.params()) for r in roundings]
    best, best_loss = [r.state() for r in roundings], float("inf")
    with torch.enable_grad():  # the post-pass driver runs under no_grad
        for i in range(iters + 1):  # the start (RTN) is scored first, the last step's result last
            value, grads = evaluate(i, i < iters)
            if value < best_loss:
                best, best_loss = [r.state() for r in roundings], value
            if i == iters:
                break
            for r, n in zip(roundings, sizes):
                r.step(grads[:n], lr * (1 - i / iters), options.min_clip)
                grads = grads[n:]
    for r, s in zip(roundings, best):
        r.load(s)


def check_grid(spec: WeightQuant, minmax: bool | None) -> bool:
    """Whether the clipping is learned on ``spec``; a grid the method cannot express raises ``QuantizationFailed``."""
    if spec.gguf_type is GGUFType.MXFP4:
        raise QuantizationFailed(
            "signround cannot offset GGUF MXFP4's unevenly spaced values; it works on int grids, MXINT and GGUF Q4_0, Q4_1, Q5_0, Q5_1, Q8_0"
        )
    free = spec.format is WeightFormat.INT
    if minmax and not free:
        raise QuantizationFailed(
            f"signround's minmax needs scales the format leaves free (int grids); {spec.label}'s scales follow the format's rule: set minmax: false"
        )
    return free if minmax is None else minmax


def signround(w: torch.Tensor, stats: LayerStats, spec: WeightQuant, options: SignRoundOptions = SignRoundOptions()) -> QuantizedWeight:
    """Learned rounding of ``w`` (``[out, in]``) against ``tr(E H Eᵀ) / tr(W H Wᵀ)``, the Linear's relative output error
    over all calibration tokens (the ``linear`` objective); same return layout as ``grid.quantize_weight``."""
    r = _Rounding(w, spec, check_grid(spec, options.minmax))
    H = stats.covariance.to(device=r.W.device, dtype=r.W.dtype)
    norm = ((r.W @ H) * r.W).sum().clamp(min=1e-30)
    params = r.params()

    def evaluate(i: int, grad: bool) -> tuple[float, list[torch.Tensor] | None]:
        e = r.W - r.dequant()
        value = ((e @ H) * e).sum() / norm
        return value.item(), list(torch.autograd.grad(value, params)) if grad else None

    descend([r], evaluate, options)
    return r.result()


class _Deployed(torch.nn.Module):
    """A target Linear as the deployed ``QuantLinear`` computes it, its grid weight set from outside each step."""

    def __init__(self, lin: torch.nn.Linear, gridded: torch.Tensor, act: ActQuant, input_scale: torch.Tensor | None, correction: torch.Tensor | None):
        super().__init__()
        self.weight: torch.Tensor = gridded
        self.bias, self.act, self.input_scale = lin.bias, act, input_scale
        # the held correction; without one, columns a reconstructor extracted, which its correction will carry whole
        extra = lin.weight - gridded if correction is None else correction.to(lin.weight.dtype)
        self.extra = extra if bool(extra.any()) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, xq = deployed_input(x, self.input_scale, self.act)
        y = F.linear(xq, self.weight.to(xq.dtype), self.bias)
        return y if self.extra is None else y + F.linear(x, self.extra)


_Chunk = tuple[torch.Tensor, dict[str, Any], torch.Tensor]
"""``(hidden_states [b, seq, d], layer kwargs, float targets [b, seq, d])``: what one forward of the layer computes."""


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or a == b


def _batches(block: Block, size: int) -> list[list[_Chunk]]:
    """The steps' batches of ``size`` calibration sequences each, in order. Sequences whose layer kwargs are identical
    (same length, no padding: positions, rotary tables and causal mask coincide) are stacked into one forward, which
    runs larger matmuls; others go one per forward, their gradients summed."""
    n = len(block.inputs)
    stack = all(_same(block.inputs[0][1], kw) and h.shape[0] == 1 for h, kw in block.inputs)
    out = []
    for s in range(0, n, size):
        idx = range(s, min(s + size, n))
        if stack:
            out.append([(torch.cat([block.inputs[j][0] for j in idx]), block.inputs[s][1], torch.cat([block.targets[j] for j in idx]))])
        else:
            out.append([(block.inputs[j][0], block.inputs[j][1], block.targets[j]) for j in idx])
    return out


def refine(block: Block, options: SignRoundOptions) -> Refined:
    """Learned rounding of every Linear of ``block`` against the block's output error, from RTN. The layer's Linears
    are swapped while it works and put back."""
    minmax = check_grid(block.spec, options.minmax)
    roundings = {n: _Rounding(w, block.spec, minmax) for n, w in block.weights.items()}
    modules = {n: _Deployed(block.linears[n], w, block.act, block.input_scales.get(n), block.corrections.get(n)) for n, w in block.weights.items()}
    use_bf16, _ = resolve_bf16(options.bf16)
    device = block.inputs[0][0].device
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)  # noqa: E731
    norm = sum(working(t).pow(2).sum().item() for t in block.targets)
    params = [p for r in roundings.values() for p in r.params()]
    batches = _batches(block, options.batch)

    def error(chunks: list[_Chunk]) -> float:
        """Squared output error over ``chunks``, relative to the whole targets' energy (backward per chunk under grad)."""
        total = 0.0
        for h, kw, target in chunks:
            with autocast():
                y = hidden_states(block.layer(h, **kw))
            e = (working(y) - working(target)).pow(2).sum() / norm
            if torch.is_grad_enabled():
                e.backward()
            total += e.item()
        return total

    def share(chunks: list[_Chunk]) -> float:
        return sum(len(h) for h, _, _ in chunks) / len(block.inputs)  # scales a batch's loss to the whole calibration

    start: list[float] = []  # the first step's score: the start's, on batch 0

    def evaluate(i: int, grad: bool) -> tuple[float, list[torch.Tensor] | None]:
        chunks = batches[i % len(batches)]
        if not grad:
            value, grads = scored_on(chunks), None
        else:
            deq = [r.dequant() for r in roundings.values()]
            leaves = [d.detach().requires_grad_() for d in deq]
            for m, leaf in zip(modules.values(), leaves):
                m.weight = leaf
            value = error(chunks) / share(chunks)
            grads = list(torch.autograd.grad(deq, params, grad_outputs=[leaf.grad for leaf in leaves]))
        if i == 0:
            start.append(value)
        return value, grads

    def scored_on(chunks: list[_Chunk]) -> float:
        with torch.no_grad():
            for m, r in zip(modules.values(), roundings.values()):
                m.weight = r.dequant()
            return error(chunks) / share(chunks)

    trainable = {p: p.requires_grad for p in block.layer.parameters()}
    block.layer.requires_grad_(False)  # gradients flow to the roundings only
    for n, m in modules.items():
        set_submodule(block.layer, n, m)
    try:
        descend(list(roundings.values()), evaluate, options)
        # the first step scored the start on batch 0; both relative to that batch's own energy
        energy = sum(working(t).pow(2).sum().item() for _, _, t in batches[0]) / (norm * share(batches[0]))
        before, after = start[0] / energy, scored_on(batches[0]) / energy
    finally:
        for n, lin in block.linears.items():
            set_submodule(block.layer, n, lin)
        for p, flag in trainable.items():
            p.requires_grad_(flag)
    return Refined({n: r.result() for n, r in roundings.items()}, before, after)


@QUANTIZERS.register
class SignRound(WeightQuantizer):
    name = "signround"
    Options = SignRoundOptions

    def quantize(self, weight: torch.Tensor, stats: LayerStats, spec: WeightQuant) -> QuantizedWeight:
        if self.refines_blocks:  # the block objective starts from RTN; a grid it cannot express fails here, per Linear
            check_grid(spec, self.options.minmax)
            return quantize_weight(weight, spec)
        return signround(weight, stats, spec, self.options)

    @property
    def refines_blocks(self) -> bool:
        return self.options.objective is not Objective.LINEAR

    def refine_block(self, block: Block) -> Refined:
        return refine(block, self.options)

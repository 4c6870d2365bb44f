"""MAT: modular adaptive training (per-head modular NTK λmax; only heads above a dynamic threshold learn).

Module = one attention head, on the LoRA parameters (full fine-tuning is not a qaft training mode):

- query head ``h`` (module kind ``q``): rows ``h·d:(h+1)·d`` of ``q_proj.lora_B`` and columns
  ``h·d:(h+1)·d`` of ``o_proj.lora_A`` (the o_proj input that head writes);
- key/value group ``g`` (kind ``kv``): rows ``g·d:(g+1)·d`` of ``k_proj.lora_B`` and ``v_proj.lora_B``.
  With grouped-query attention a k/v slice serves every query head of its group, so it cannot belong
  to one query head; it is its own module, compared only with other kv groups (λmax grows with a
  module's size, so only modules of equal shape are compared).

The shared factors (``lora_A`` of q/k/v, ``lora_B`` of o_proj, the MLP adapters) belong to no head
and are always updated.

λmax of module m on n probe samples = the top eigenvalue of ``Θ_m = J_m J_mᵀ``, the n×n Gram matrix of
per-sample loss gradients restricted to the module (``per_sample_grads``: a loop of n backward
passes, or ``torch.func.vmap(grad)``; both are tested to agree). Recomputed on the same probe blocks
every ``interval`` steps after ``warmup_steps`` of full updates.

Threshold (no official code exists; the paper's rule could not be confirmed), per kind, from the
current λmax distribution: ``ratio_of_mean`` (default: λ ≥ alpha · mean λ, alpha 1, so "heads learning
faster than average"; on skewed λ distributions that is about a third of the heads, the share the
paper reports), ``ratio_of_max`` (λ ≥ alpha · max λ) or ``quantile`` (λ ≥ the alpha-quantile). With
``stability_eps``, a module whose λmax moved by less than that relative amount since the last
recomputation is also frozen. Every module is re-judged at each recomputation.

Gating is real: a frozen head's gradient slices are zeroed before clipping (so they do not count in
the norm), and its parameter and AdamW moment slices are saved before the optimizer step and written
back after it (zero gradient alone is not enough: momentum and weight decay would still move them).
Adam's step counter is per tensor and shared with the tensor's other heads. When every head of a
tensor is frozen and the run has one process, the tensor stops requiring grad for the interval, which
skips its weight-gradient product; ``mat/grad_skipped`` reports the share of gated LoRA parameters
whose gradient was not computed at all.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from torch.func import functional_call, grad, vmap

from qaft.core.errors import ModelError, PreflightError
from qaft.core.modules import decoder_layers
from qaft.core.typed import Ge, Gt

from .base import Callback, Context
from .registry import CALLBACKS


class Mode(str, enum.Enum):
    RATIO_OF_MEAN = "ratio_of_mean"
    RATIO_OF_MAX = "ratio_of_max"
    QUANTILE = "quantile"


class Grads(str, enum.Enum):
    LOOP = "loop"
    FUNC = "func"


@dataclass(frozen=True, kw_only=True)
class MATOptions:
    probe_samples: Annotated[int, Ge(2)] = 8
    """Probe blocks (the first N training blocks, fixed) for the per-sample gradients."""
    interval: Annotated[int, Ge(1)] = 50
    """Recompute λmax and the active set every this many steps after warm-up."""
    warmup_steps: Annotated[int, Ge(0)] = 100
    """Full updates before the first gating."""
    mode: Mode = Mode.RATIO_OF_MEAN
    """Threshold rule, per module kind: ``ratio_of_mean``, ``ratio_of_max`` or ``quantile``."""
    alpha: Annotated[float, Gt(0.0)] = 1.0
    """The rule's parameter (a ratio, or a quantile in (0, 1))."""
    stability_eps: Annotated[float, Gt(0.0)] | None = None
    """Also freeze a module whose λmax changed by less than this share since the last recomputation; null = off."""
    grads: Grads = Grads.LOOP
    """Per-sample gradients by a ``loop`` of backward passes or ``func`` (torch.func vmap)."""
    heatmap: bool = True
    """Write ``mat_lambda.json`` and, with matplotlib, ``mat_lambda.png`` (layers × heads per recomputation) at the end."""

    def __post_init__(self) -> None:
        if self.mode is Mode.QUANTILE and not self.alpha < 1:
            raise ValueError(f"alpha: got {self.alpha}, expected a quantile in (0, 1) for mode 'quantile'")


@dataclass
class Slice:
    param: torch.nn.Parameter
    dim: int
    start: int
    length: int

    def of(self, t: torch.Tensor) -> torch.Tensor:
        return t.narrow(self.dim, self.start, self.length)


@dataclass
class HeadModule:
    kind: str
    """``q`` (query head + its o_proj columns) or ``kv`` (a key/value group)."""
    layer: int
    index: int
    slices: list[Slice]


_ATTN = {"q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("o_proj", "out_proj", "dense")}


def _lora(attn: torch.nn.Module, names: tuple[str, ...], factor: str) -> torch.nn.Parameter | None:
    for n in names:
        mod = getattr(attn, n, None)
        if mod is not None and hasattr(mod, factor) and len(getattr(mod, factor)):
            return next(iter(getattr(mod, factor).values())).weight
    return None


def head_modules(model: torch.nn.Module) -> list[HeadModule]:
    """The per-head modules of every decoder layer's attention (see the module docstring)."""
    config = model.config
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    d = getattr(config, "head_dim", None) or config.hidden_size // heads
    try:
        _, layers = decoder_layers(model)
    except ModelError:
        attn = next((m for m in model.modules() if "attention" in type(m).__name__.lower()), model)
        raise PreflightError(
            f"callbacks.mat: cannot slice {type(attn).__name__} into heads (no decoder layer list with q_proj, k_proj, "
            "v_proj and o_proj/out_proj Linears); MAT supports Llama- and OPT-style attention"
        ) from None
    out: list[HeadModule] = []
    for i, layer in enumerate(layers):
        attn = next((m for n, m in layer.named_children() if "attn" in n.lower() or "attention" in n.lower()), None)
        if attn is None or not all(any(hasattr(attn, n) for n in names) for names in _ATTN.values()):
            raise PreflightError(
                f"callbacks.mat: cannot slice {type(attn or layer).__name__} into heads (needs q_proj, k_proj, v_proj and "
                "o_proj/out_proj Linears); MAT supports Llama- and OPT-style attention"
            )
        q, k, v = (_lora(attn, _ATTN[x], "lora_B") for x in "qkv")
        o = _lora(attn, _ATTN["o"], "lora_A")
        for h in range(heads):
            s = [Slice(q, 0, h * d, d)] if q is not None else []
            s += [Slice(o, 1, h * d, d)] if o is not None else []
            if s:
                out.append(HeadModule("q", i, h, s))
        for g in range(kv):
            s = [Slice(p, 0, g * d, d) for p in (k, v) if p is not None]
            if s:
                out.append(HeadModule("kv", i, g, s))
    if not out:
        raise PreflightError("callbacks.mat: no attention projection carries a LoRA adapter; add q_proj/k_proj/v_proj/o_proj to lora.target_modules")
    return out


def per_sample_grads(model: torch.nn.Module, input_ids: torch.Tensor, params: list[torch.nn.Parameter], method: Grads) -> list[torch.Tensor]:
    """Gradients of each sample's causal-LM loss w.r.t. ``params``: one ``[n, *param.shape]`` tensor per parameter."""
    if method is Grads.LOOP:
        rows = [torch.autograd.grad(model(input_ids=x[None], labels=x[None]).loss, params) for x in input_ids]
        return [torch.stack(g) for g in zip(*rows)]
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]
    frozen = {n: p.detach() for n, p in model.named_parameters() if id(p) not in {id(q) for q in params}}

    def loss(trainable: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {**frozen, **trainable}, (), {"input_ids": x[None], "labels": x[None]}).loss

    g = vmap(grad(loss), in_dims=(None, 0), randomness="same")({k: p.detach() for k, p in zip(keys, params)}, input_ids)
    return [g[k] for k in keys]


def lambda_max(modules: list[HeadModule], grads: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """Top eigenvalue of each module's per-sample-gradient Gram matrix (``grads``: id(param) → ``[n, *shape]``)."""
    out = []
    for m in modules:
        j = torch.cat([grads[id(s.param)].narrow(s.dim + 1, s.start, s.length).flatten(1) for s in m.slices], dim=1).double()
        out.append(torch.linalg.eigvalsh(j @ j.T)[-1].clamp(min=0))
    return torch.stack(out)


def active_set(lam: torch.Tensor, kinds: list[str], mode: Mode, alpha: float) -> torch.Tensor:
    """Boolean mask of modules at or above the threshold, computed separately for each kind."""
    keep = torch.zeros(len(lam), dtype=torch.bool)
    for kind in set(kinds):
        idx = torch.tensor([i for i, k in enumerate(kinds) if k == kind])
        x = lam[idx]
        t = {Mode.RATIO_OF_MEAN: alpha * x.mean(), Mode.RATIO_OF_MAX: alpha * x.max(), Mode.QUANTILE: torch.quantile(x, alpha)}[mode]
        keep[idx] = x >= t
    return keep


class MAT(Callback):
    name = "mat"
    Options = MATOptions

    @classmethod
    def quantized_base_problem(cls, options: MATOptions) -> str | None:
        return "it gates per-head slices of peft LoRA adapters, and qaft tune trains per-layer correction factors"

    @classmethod
    def sharded_weights_problem(cls, options: MATOptions) -> str | None:
        return "per-sample gradients and per-head freezing slice whole lora_A/lora_B tensors, which each process holds only a shard of"

    @classmethod
    def engine_step_problem(cls, options: MATOptions) -> str | None:
        return "it freezes heads by masking p.grad and the optimizer state between backward and step, and DeepSpeed steps inside backward from its own gradient buffers"

    def __init__(self, options: MATOptions, *, generator: torch.Generator):
        super().__init__(options, generator=generator)
        self.modules: list[HeadModule] = []
        self.active: torch.Tensor | None = None
        self.lam: torch.Tensor | None = None
        self.history: list[dict[str, Any]] = []
        self._saved: list[tuple[Slice, torch.Tensor, dict[str, torch.Tensor]]] = []
        self._skipped: list[torch.nn.Parameter] = []
        self._seconds = 0.0

    @classmethod
    def neutral_options(cls) -> MATOptions:
        return MATOptions(warmup_steps=10**9, heatmap=False)

    def on_train_begin(self, ctx: Context) -> None:
        self.modules = head_modules(ctx.accelerator.unwrap_model(ctx.model))
        if self.active is None:
            self.active = torch.ones(len(self.modules), dtype=torch.bool)

    def _recompute_due(self, step: int) -> bool:
        o = self.options
        return step >= o.warmup_steps and (step - o.warmup_steps) % o.interval == 0

    def on_step_begin(self, ctx: Context) -> None:
        step = ctx.state.step
        if self._recompute_due(step):
            t0 = time.perf_counter()
            self._recompute(ctx)
            self._seconds += time.perf_counter() - t0
        self._set_skipping(ctx)

    def _recompute(self, ctx: Context) -> None:
        o = self.options
        model = ctx.accelerator.unwrap_model(ctx.model)
        if ctx.probe_blocks is None or len(ctx.probe_blocks) < o.probe_samples:
            raise PreflightError(
                f"callbacks.mat: probe_samples {o.probe_samples} exceeds the {0 if ctx.probe_blocks is None else len(ctx.probe_blocks)} training blocks"
            )
        params = list({id(s.param): s.param for m in self.modules for s in m.slices}.values())
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        was_training = model.training
        model.eval()  # no dropout: λmax of the function being trained, not of a random mask
        try:
            g = per_sample_grads(model, ctx.probe_blocks[: o.probe_samples].to(ctx.accelerator.device), params, o.grads)
        finally:
            model.train(was_training)
            for p, f in zip(params, flags):
                p.requires_grad_(f)
        lam = lambda_max(self.modules, {id(p): t for p, t in zip(params, g)}).cpu()
        active = active_set(lam, [m.kind for m in self.modules], o.mode, o.alpha)
        if o.stability_eps is not None and self.lam is not None:
            active &= (lam - self.lam).abs() >= o.stability_eps * self.lam.clamp(min=1e-30)
        self.lam, self.active = lam, active
        self.history.append({"step": ctx.state.step, "lambda": lam.tolist(), "active": active.tolist()})

    def _set_skipping(self, ctx: Context) -> None:
        """Stop computing gradients of tensors all of whose heads are frozen (single process only)."""
        for p in self._skipped:
            p.requires_grad_(True)
        self._skipped = []
        if ctx.accelerator.num_processes > 1 or self.active is None or bool(self.active.all()):
            return
        by_param: dict[int, list[bool]] = {}
        params: dict[int, torch.nn.Parameter] = {}
        for m, on in zip(self.modules, self.active.tolist()):
            for s in m.slices:
                by_param.setdefault(id(s.param), []).append(on)
                params[id(s.param)] = s.param
        self._skipped = [params[i] for i, flags in by_param.items() if not any(flags)]
        for p in self._skipped:
            p.requires_grad_(False)

    def _optimizer_state(self, ctx: Context) -> Mapping[torch.nn.Parameter, dict[str, Any]]:
        return getattr(ctx.optimizer, "optimizer", ctx.optimizer).state

    @torch.no_grad()
    def on_gradients(self, ctx: Context) -> None:
        self._saved = []
        if self.active is None or bool(self.active.all()):
            return
        state = self._optimizer_state(ctx)
        skipped = {id(p) for p in self._skipped if p.grad is None}  # a grad means someone re-enabled it: gate it the slow way
        for m, on in zip(self.modules, self.active.tolist()):
            if on:
                continue
            for s in m.slices:
                if id(s.param) in skipped:
                    continue
                if s.param.grad is not None:
                    s.of(s.param.grad).zero_()
                moments = {k: s.of(v).clone() for k, v in state.get(s.param, {}).items() if torch.is_tensor(v) and v.shape == s.param.shape}
                self._saved.append((s, s.of(s.param.data).clone(), moments))

    @torch.no_grad()
    def on_step_end(self, ctx: Context) -> dict[str, float]:
        state = self._optimizer_state(ctx)
        for s, value, moments in self._saved:
            s.of(s.param.data).copy_(value)
            st = state.get(s.param, {})
            for k, v in st.items():
                if not (torch.is_tensor(v) and v.shape == s.param.shape):
                    continue
                if k in moments:
                    s.of(v).copy_(moments[k])
                else:  # moments created by this very step: a frozen slice keeps them at their initial zero
                    s.of(v).zero_()
        self._saved = []
        out = {"active_fraction": float(self.active.float().mean()) if self.active is not None else 1.0}
        if self.active is not None and not bool(self.active.all()):
            skipped = {id(p) for p in self._skipped}
            gated = [
                (s.length * s.param.numel() / s.param.shape[s.dim], id(s.param) in skipped)
                for m, on in zip(self.modules, self.active.tolist())
                if not on
                for s in m.slices
            ]  # (elements, gradient not computed)
            out["grad_skipped"] = sum(n for n, off in gated if off) / max(sum(n for n, _ in gated), 1)
        if self.history and self.history[-1]["step"] == ctx.state.step - 1:
            lam = torch.tensor(self.history[-1]["lambda"])
            out |= {"lambda_mean": lam.mean().item(), "lambda_max": lam.max().item(), "lambda_min": lam.min().item(), "lambda_seconds": self._seconds}
        return out

    def on_train_end(self, ctx: Context) -> None:
        for p in self._skipped:
            p.requires_grad_(True)
        self._skipped = []
        if self.options.heatmap and self.history and ctx.accelerator.is_main_process:
            write_heatmap(self.history, self.modules, ctx.output_dir)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "active": None if self.active is None else self.active.clone(),
            "lam": None if self.lam is None else self.lam.clone(),
            "history": list(self.history),
            "seconds": self._seconds,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.active, self.lam, self.history, self._seconds = state["active"], state["lam"], list(state["history"]), state["seconds"]


def write_heatmap(history: list[dict[str, Any]], modules: list[HeadModule], out: Path) -> list[Path]:
    """``mat_lambda.json`` and (with matplotlib) ``mat_lambda.png``: λmax of query heads, layers × heads, per recomputation."""
    layers = 1 + max(m.layer for m in modules)
    heads = 1 + max(m.index for m in modules if m.kind == "q")
    grids = []
    for h in history:
        g = torch.full((layers, heads), float("nan"))
        for m, lam in zip(modules, h["lambda"]):
            if m.kind == "q":
                g[m.layer, m.index] = lam
        grids.append(g)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "mat_lambda.json"]
    files[0].write_text(json.dumps([{"step": h["step"], "q_lambda": g.tolist(), "active": h["active"]} for h, g in zip(history, grids)]))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return files
    n = len(grids)
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n + 1, 0.18 * layers + 1.5), squeeze=False)
    lo, hi = min(float(g.nan_to_num(float("inf")).min()) for g in grids), max(float(g.nan_to_num(float("-inf")).max()) for g in grids)
    for ax, h, g in zip(axes[0], history, grids):
        im = ax.imshow(g.numpy(), aspect="auto", cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_yticks(range(0, layers, max(1, layers // 8)))
        ax.set_xticks(range(0, heads, max(1, heads // 8)))
        ax.set_title(f"step {h['step']}", fontsize=8)
        ax.set_xlabel("head")
    axes[0][0].set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="λmax (query heads)")
    fig.savefig(out / "mat_lambda.png", dpi=110)
    plt.close(fig)
    return files + [out / "mat_lambda.png"]


CALLBACKS.register(MAT)

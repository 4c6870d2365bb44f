"""The post-pass driver: walk the decoder layers in order, calibrate, quantize and reconstruct each one.

Layer-sequential (as GPTQ/LQER pipelines do): capture the inputs of decoder layer 0 on the
calibration sequences, then for each layer run it once with statistics hooks on its target
Linears, replace every target by a ``QuantLinear`` (RTN weights + optional low-rank correction),
and run the *quantized* layer to produce the next layer's inputs (``propagate="quantized"``, the
default, so later layers calibrate on what they will really see), or pass on the float outputs
(``"float"``, which reproduces whole-model calibration exactly). Peak memory is the model plus one
layer's activations and statistics. Records per-layer telemetry.
"""

from __future__ import annotations

import math

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from tqdm.auto import tqdm

from qaft.trainer.config import SmoothingConfig
from qaft.core.errors import ConfigError

from .reconstructors import whiten as aser, l2qer, lqer  # noqa: F401  (register the reconstructors)
from .calibrate import LayerStats, collect
from .fakequant import QuantLinear
from .quantizers.gptq import SingularHessian
from .lowrank import RECONSTRUCTORS, LowRank, quantize_factors
from .grid import QuantizedWeight, quantize_weight
from .scheme import Granularity, QuantScheme, WeightFormat, WeightQuant
from .reconstructors.aser import factors, smoothed_stats


WeightQuantizer = Callable[[torch.Tensor, LayerStats, WeightQuant], QuantizedWeight]
"""``(weight, input statistics, spec) -> QuantizedWeight``: RTN ignores the statistics, GPTQ uses them."""


def rtn(w: torch.Tensor, stats: LayerStats, spec: WeightQuant) -> QuantizedWeight:
    return quantize_weight(w, spec)


class _Captured(Exception):
    """Stops the forward pass once layer 0's inputs are recorded."""


@dataclass(frozen=True)
class LayerReport:
    name: str
    shape: tuple[int, int]
    rank: int
    error_norm: float
    """``‖W − Q(W)‖_F``."""
    rel_output_error_rtn: float
    """``‖X Eᵀ‖_F / ‖X Wᵀ‖_F`` on the calibration inputs, before the correction."""
    rel_output_error: float
    """The same after the correction (equal to the RTN figure without one)."""
    kept_energy: float
    """Share of the (scaled/whitened) error energy the rank-k factors keep; 0 without a correction."""
    seconds: float
    """Quantize + reconstruct time of this Linear (no calibration forward, no telemetry)."""


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList of decoder blocks (``model.layers`` in Llama, ``model.decoder.layers`` in OPT)."""
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and name.endswith("layers") and len(mod) > 0:
            return name, mod
    raise ValueError("found no decoder layer list (a ModuleList named '*layers'); this architecture is not supported yet")


def target_linears(layer: torch.nn.Module, prefix: str, scheme: QuantScheme) -> dict[str, torch.nn.Linear]:
    """Linears of one decoder layer that the scheme quantizes, by name relative to the layer."""
    out = {}
    for name, mod in layer.named_modules():
        if isinstance(mod, torch.nn.Linear) and scheme.selects(f"{prefix}.{name}"):
            out[name] = mod
    return out


def check_scheme(model: torch.nn.Module, scheme: QuantScheme, rank: int) -> None:
    """Fail before any work if a layer cannot take the scheme or the rank: one line per kind of problem,
    naming the first layer, how many more there are, and a value that would fit them all."""
    prefix, layers = decoder_layers(model)
    needs_group = scheme.weight.format is WeightFormat.MXINT or scheme.weight.granularity is Granularity.GROUP
    g = scheme.weight.group_size
    bad_group: list[tuple[int, str]] = []  # (input width, layer)
    bad_rank: list[tuple[int, str]] = []  # (min(out, in), layer)
    for i, layer in enumerate(layers):
        for name, lin in target_linears(layer, f"{prefix}.{i}", scheme).items():
            if needs_group and lin.in_features % g:
                bad_group.append((lin.in_features, f"{prefix}.{i}.{name}"))
            if rank > min(lin.in_features, lin.out_features):
                bad_rank.append((min(lin.in_features, lin.out_features), f"{prefix}.{i}.{name}"))
    problems = []
    if bad_group:
        (w, first), widths = min(bad_group), sorted({w for w, _ in bad_group})
        fit = math.gcd(*widths)
        fits = max((d for d in (256, 128, 64, 32, 16, 8) if fit % d == 0), default=None)
        if scheme.weight.gguf_type is not None:  # the block is the type's: the fix is to keep those layers in float
            names = sorted({n.rpartition(".")[2] for _, n in bad_group})
            problems.append(f"quant.weight.gguf_type: {scheme.weight.gguf_type.value} blocks are 32 input channels wide, which does not divide the "
                            f"input width {w} of {first}{_more(bad_group)} (widths {', '.join(map(str, widths))}); keep them in float with "
                            f"quant.ignore=[lm_head, {', '.join(names)}] (llama.cpp stores such tensors as F16)")
        else:
            problems.append(f"quant.weight.group_size: {g} does not divide the input width {w} of {first}{_more(bad_group)} (widths {', '.join(map(str, widths))}); "
                            + (f"use a group size that divides them all, e.g. {fits}, " if fits else "")
                            + "or quant.weight.granularity=channel")
    if bad_rank:
        (m, first) = min(bad_rank)
        problems.append(f"postpass.rank: {rank} exceeds min(out, in) = {m} of {first}{_more(bad_rank)}; use postpass.rank <= {m}")
    if problems:
        raise ConfigError(problems)


def _more(found: list) -> str:
    return f" and {len(found) - 1} more targeted Linear layer(s)" if len(found) > 1 else ""


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


@torch.no_grad()
def smooth_layer(layer: torch.nn.Module, targets: dict[str, torch.nn.Linear], stats: dict[str, LayerStats],
                 sources: dict[str, tuple[int, str | None]], cfg: SmoothingConfig) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
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
    return explicit, extracted


@torch.no_grad()
def capture_inputs(model: torch.nn.Module, first_layer: torch.nn.Module, sequences: torch.Tensor) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """``(hidden_states, kwargs)`` entering ``first_layer`` for each calibration sequence (batch of 1)."""
    seen: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def hook(mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        seen.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Captured

    h = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for seq in sequences:
            try:
                model(input_ids=seq[None].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        h.remove()
    if len(seen) != len(sequences):
        raise RuntimeError(f"captured {len(seen)} layer inputs for {len(sequences)} sequences")
    return seen


def _out_norm(m: torch.Tensor, xtx32: torch.Tensor) -> float:
    """``‖X mᵀ‖_F`` from the statistics alone: ``sqrt(tr(m XᵀX mᵀ))`` (float32: telemetry, not maths)."""
    m = m.float()
    return (m @ xtx32 * m).sum().clamp(min=0).sqrt().item()


def _set(root: torch.nn.Module, dotted: str, new: torch.nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


@torch.no_grad()
def quantize_model(
    model: torch.nn.Module, calibration: torch.Tensor, scheme: QuantScheme, reconstructor: str | None, rank: int,
    *, randomized_svd: bool = False, energy: float | None = None, smoothing: SmoothingConfig | None = None,
    factor_bits: int | None = None, quantizer: WeightQuantizer = rtn, propagate: Literal["quantized", "float"] = "quantized",
    progress: bool = True,
) -> tuple[list[LayerReport], dict[str, LayerStats] | None]:
    """Quantize every target Linear of ``model`` in place. ``calibration``: ``[n, seq_len]`` token ids.

    ``factor_bits`` puts the low-rank factors on an int grid (``lowrank.quantize_factors``); the
    reports then measure the error of the factors as deployed. Returns the per-layer reports (and, when ``propagate == "float"``, the statistics, for tests).
    """
    if reconstructor is not None and reconstructor not in RECONSTRUCTORS:
        raise ValueError(f"unknown reconstructor {reconstructor!r}; known: {sorted(RECONSTRUCTORS)}")
    check_scheme(model, scheme, rank if reconstructor else 0)
    model.eval()
    prefix, layers = decoder_layers(model)
    inputs = capture_inputs(model, layers[0], calibration)
    reports, kept = [], {} if propagate == "float" else None
    lowrank = LowRank(rank, randomized=randomized_svd, energy=energy)
    for i, layer in enumerate(tqdm(layers, desc="post-pass (layers)", disable=not progress, leave=False)):
        targets = target_linears(layer, f"{prefix}.{i}", scheme)
        with collect(targets) as stats, input_sources(layer, targets) as sources:
            outputs = [layer(h, **kw) for h, kw in inputs]
        explicit, extracted = smooth_layer(layer, targets, stats, sources, smoothing) if smoothing is not None else ({}, {})
        for name, lin in targets.items():
            t0 = time.perf_counter()
            w = lin.weight.data
            to_quantize = w
            if name in extracted:  # reading (b): these columns are not quantized; the correction carries them whole
                to_quantize = w.clone()
                to_quantize[:, extracted[name]] = 0
            try:
                q = quantizer(to_quantize, stats[name], scheme.weight)
            except SingularHessian as e:
                raise ConfigError(f"postpass.gptq.damp: {prefix}.{i}.{name}: {e}; raise postpass.gptq.damp (e.g. 0.1) or calibrate on more tokens") from None
            err = w - q.dequant
            corr = RECONSTRUCTORS[reconstructor](err, stats[name], lowrank) if reconstructor else None
            if corr is not None and factor_bits is not None:
                corr = quantize_factors(corr, factor_bits)
            after = err if corr is None else err - corr.matrix().to(err.dtype)
            _set(layer, name, QuantLinear(q, lin.bias, scheme.activation, corr, explicit.get(name)))
            seconds = time.perf_counter() - t0
            xtx32 = stats[name].xtx.float()
            ref = max(_out_norm(w, xtx32), 1e-30)
            before_err = _out_norm(err, xtx32) / ref
            reports.append(LayerReport(
                f"{prefix}.{i}.{name}", tuple(w.shape), 0 if corr is None else corr.rank, err.norm().item(),
                before_err, before_err if corr is None else _out_norm(after, xtx32) / ref, 0.0 if corr is None else corr.kept_energy, seconds,
            ))
        if kept is not None:
            kept |= {f"{prefix}.{i}.{n}": s for n, s in stats.items()}
            inputs = [(o, kw) for o, (_, kw) in zip(outputs, inputs)]
        else:
            inputs = [(layer(h, **kw), kw) for h, kw in inputs]
    return reports, kept

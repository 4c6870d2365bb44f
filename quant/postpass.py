"""The post-pass driver: walk the decoder layers in order, calibrate, quantize and reconstruct each one.

Layer-sequential (as GPTQ/LQER pipelines do): capture the inputs of decoder layer 0 on the
calibration sequences, then for each layer run it once with statistics hooks on its target
Linears, let the reconstructor prepare the layer (ASER smooths it), replace every target by a
``QuantLinear`` (the quantizer's grid weights + the reconstructor's low-rank correction), and run the
*quantized* layer to produce the next layer's inputs (``propagate="quantized"``, the default, so
later layers calibrate on what they will really see), or pass on the float outputs (``"float"``,
which reproduces whole-model calibration exactly). Peak memory is the model plus one layer's
activations and statistics. Records per-layer telemetry.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from qaft.core.errors import ConfigError
from qaft.core.hardware import resolve_bf16
from qaft.core.modules import decoder_layers, hidden_states, set_submodule

from .calibrate import LayerStats, collect
from .config import PostpassConfig
from .fakequant import QuantLinear
from .grid import quantize_weight
from .lowrank import LowRank, quantize_factors
from .methods import Method, of_config
from .quantizers import QUANTIZERS
from .quantizers.base import Block, QuantizationFailed
from .reconstructors import RECONSTRUCTORS, Preparation
from .scheme import Granularity, QuantScheme, WeightFormat


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
    """Quantize + reconstruct time of this Linear (no calibration forward, no telemetry; a share of its block's refinement)."""
    rel_output_error_nearest: float | None = None
    """The output error round to nearest gives on the same grid: what a learned quantizer (GPTQ, SignRound) is measured against."""
    block_error: tuple[float, float] | None = None
    """``(before, after)`` the quantizer's block refinement: the decoder layer's relative squared output error against
    the float layer (on float inputs), with every Linear on the grid and no correction; None without one."""


def check_scheme(model: torch.nn.Module, scheme: QuantScheme, rank: int) -> None:
    """Fail before any work if a layer cannot take the scheme or the rank: one line per kind of problem,
    naming the first layer, how many more there are, and a value that would fit them all."""
    prefix, layers = decoder_layers(model)
    needs_group = scheme.weight.format is WeightFormat.MXINT or scheme.weight.granularity is Granularity.GROUP
    g = scheme.weight.group_size
    bad_group: list[tuple[int, str]] = []  # (input width, layer)
    bad_rank: list[tuple[int, str]] = []  # (min(out, in), layer)
    for i, layer in enumerate(layers):
        for name, lin in scheme.layer_linears(layer, f"{prefix}.{i}").items():
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
            problems.append(
                f"quant.weight.gguf_type: {scheme.weight.gguf_type.value} blocks are 32 input channels wide, which does not divide the "
                f"input width {w} of {first}{_more(bad_group)} (widths {', '.join(map(str, widths))}); keep them in float with "
                f"quant.ignore=[lm_head, {', '.join(names)}] (llama.cpp stores such tensors as F16)"
            )
        else:
            problems.append(
                f"quant.weight.group_size: {g} does not divide the input width {w} of {first}{_more(bad_group)} (widths {', '.join(map(str, widths))}); "
                + (f"use a group size that divides them all, e.g. {fits}, " if fits else "")
                + "or quant.weight.granularity=channel"
            )
    if bad_rank:
        (m, first) = min(bad_rank)
        problems.append(f"postpass.rank: {rank} exceeds min(out, in) = {m} of {first}{_more(bad_rank)}; use postpass.rank <= {m}")
    if problems:
        raise ConfigError(problems)


def _more(found: list) -> str:
    return f" and {len(found) - 1} more targeted Linear layer(s)" if len(found) > 1 else ""


@torch.no_grad()
def layer_input(model: torch.nn.Module, layer: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(hidden_states, kwargs)`` entering ``layer`` when ``model`` runs on ``input_ids``; the forward stops there."""
    seen: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def hook(mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        seen.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Captured

    h = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=input_ids, use_cache=False)
    except _Captured:
        pass
    finally:
        h.remove()
    if not seen:
        raise RuntimeError(f"the forward never reached {type(layer).__name__}")
    return seen[0]


def capture_inputs(model: torch.nn.Module, first_layer: torch.nn.Module, sequences: torch.Tensor) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """``(hidden_states, kwargs)`` entering ``first_layer`` for each calibration sequence (batch of 1)."""
    device = next(model.parameters()).device
    return [layer_input(model, first_layer, seq[None].to(device)) for seq in sequences]


def _out_norm(m: torch.Tensor, xtx32: torch.Tensor) -> float:
    """``‖X mᵀ‖_F`` from the statistics alone: ``sqrt(tr(m XᵀX mᵀ))`` (float32: telemetry, not maths)."""
    m = m.float()
    return (m @ xtx32 * m).sum().clamp(min=0).sqrt().item()


@torch.no_grad()
def quantize_model(
    model: torch.nn.Module,
    calibration: torch.Tensor,
    scheme: QuantScheme,
    postpass: PostpassConfig,
    *,
    method: Method | None = None,
    propagate: Literal["quantized", "float"] = "quantized",
    progress: bool = True,
) -> tuple[list[LayerReport], dict[str, LayerStats] | None]:
    """Quantize every target Linear of ``model`` in place. ``calibration``: ``[n, seq_len]`` token ids.

    ``method`` (default: the one ``postpass`` names) picks the quantizer and reconstructor; ``postpass``
    gives the rank, the SVD and ``factor_bits`` (factors on an int grid, ``lowrank.quantize_factors``;
    the reports then measure the factors as deployed). Returns the per-layer reports (and, when
    ``propagate == "float"``, the statistics, for tests).
    """
    method = method or of_config(postpass)
    quantizer = QUANTIZERS.create(method.quantizer)
    recon = None if method.reconstructor is None else RECONSTRUCTORS.create(method.reconstructor)
    check_scheme(model, scheme, postpass.rank if recon else 0)
    model.eval()
    prefix, layers = decoder_layers(model)
    inputs = capture_inputs(model, layers[0], calibration)
    float_inputs = inputs if quantizer.refines_blocks else None  # the block refinement's targets come from the float stream
    reports, kept = [], {} if propagate == "float" else None
    lowrank = LowRank(postpass.rank, randomized=postpass.randomized_svd, energy=postpass.energy)
    use_bf16, device = resolve_bf16(postpass.bf16)[0], next(model.parameters()).device

    def run(layer: torch.nn.Module, stream: list[tuple[torch.Tensor, dict[str, Any]]]) -> list[Any]:
        """The layer on each sequence of a stream; bf16 matmuls when ``postpass.bf16`` (the stream stays float32)."""
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            return [layer(h, **kw) for h, kw in stream]

    for i, layer in enumerate(tqdm(layers, desc="post-pass (layers)", disable=not progress, leave=False)):
        targets = scheme.layer_linears(layer, f"{prefix}.{i}")
        float_outputs = None if float_inputs is None else [hidden_states(y) for y in run(layer, float_inputs)]
        with collect(targets) as stats, recon.observe(layer, targets) if recon else contextlib.nullcontext() as observed:
            outputs = run(layer, inputs)
        prep = recon.prepare(layer, targets, stats, observed) if recon else Preparation()
        gridded, quantized, seconds = {}, {}, {}
        for name, lin in targets.items():
            t0 = time.perf_counter()
            gridded[name] = lin.weight.data
            if name in prep.extracted:  # ASER's reading (b): these columns are not quantized; the correction carries them whole
                gridded[name] = lin.weight.data.clone()
                gridded[name][:, prep.extracted[name]] = 0
            try:
                quantized[name] = quantizer.quantize(gridded[name], stats[name], scheme.weight)
            except QuantizationFailed as e:
                raise ConfigError(f"postpass.quantizer: {method.quantizer.name} on {prefix}.{i}.{name}: {e}") from None
            seconds[name] = time.perf_counter() - t0
        block, xtx32s = None, {}
        if float_outputs is not None:
            t0 = time.perf_counter()
            block = quantizer.refine_block(Block(layer, targets, gridded, inputs, float_outputs, scheme.weight, scheme.activation, prep.input_scales))
            quantized = block.weights
            seconds = {n: s + (time.perf_counter() - t0) / len(targets) for n, s in seconds.items()}
        for name, lin in targets.items():
            t0 = time.perf_counter()
            w, q = lin.weight.data, quantized[name]
            err = w - q.dequant
            corr = recon.reconstruct(err, stats[name], lowrank) if recon else None
            if corr is not None and postpass.factor_bits is not None:
                corr = quantize_factors(corr, postpass.factor_bits)
            after = err if corr is None else err - corr.matrix().to(err.dtype)
            set_submodule(layer, name, QuantLinear(q, lin.bias, scheme.activation, corr, prep.input_scales.get(name), spec=scheme.weight))
            if id(stats[name]) not in xtx32s:  # one per distinct input (calibrate.collect shares them)
                xtx32s[id(stats[name])] = stats[name].xtx.float()
            xtx32 = xtx32s[id(stats[name])]
            ref = max(_out_norm(w, xtx32), 1e-30)
            before_err = _out_norm(err, xtx32) / ref
            reports.append(
                LayerReport(
                    f"{prefix}.{i}.{name}",
                    tuple(w.shape),
                    0 if corr is None else corr.rank,
                    err.norm().item(),
                    before_err,
                    before_err if corr is None else _out_norm(after, xtx32) / ref,
                    0.0 if corr is None else corr.kept_energy,
                    seconds[name] + time.perf_counter() - t0,
                    _out_norm(w - quantize_weight(gridded[name], scheme.weight).dequant, xtx32) / ref,
                    None if block is None else (block.loss_start, block.loss),
                )
            )
        if kept is not None:
            kept |= {f"{prefix}.{i}.{n}": s for n, s in stats.items()}
            inputs = [(o, kw) for o, (_, kw) in zip(outputs, inputs)]
        else:
            inputs = [(y, kw) for y, (_, kw) in zip(run(layer, inputs), inputs)]
        if float_inputs is not None:
            float_inputs = [(y, kw) for y, (_, kw) in zip(float_outputs, float_inputs)]
    return reports, kept


@torch.no_grad()
def block_errors(model: torch.nn.Module, reference: torch.nn.Module, calibration: torch.Tensor) -> list[float]:
    """Per decoder block, ``‖y − y_ref‖ / ‖y_ref‖`` over the calibration tokens: ``model``'s block and the
    reference model's block on the same inputs, those ``model`` itself produces (quantized propagation).
    Any method can be compared this way (ASER's smoothing changes the Linears' weights, not a block's function)."""
    _, layers = decoder_layers(model)
    _, ref_layers = decoder_layers(reference)
    inputs = capture_inputs(model, layers[0], calibration)
    errors = []
    for layer, ref in zip(layers, ref_layers):
        outputs = [layer(h, **kw) for h, kw in inputs]
        num = den = 0.0
        for (h, kw), y in zip(inputs, outputs):
            y, y_ref = hidden_states(y), hidden_states(ref(h, **kw))
            num += (y - y_ref).float().pow(2).sum().item()
            den += y_ref.float().pow(2).sum().item()
        errors.append((num / max(den, 1e-30)) ** 0.5)
        inputs = [(hidden_states(y), kw) for y, (_, kw) in zip(outputs, inputs)]
    return errors

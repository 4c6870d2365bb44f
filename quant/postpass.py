"""The post-pass driver: walk the decoder layers in order, calibrate, quantize and reconstruct each one.

Layer-sequential (as GPTQ/LQER pipelines do): capture the inputs of decoder layer 0 on the
calibration sequences, then for each layer run it once with statistics hooks on its target
Linears, let the reconstructor prepare the layer (ASER smooths it), replace every target by a
``QuantLinear`` (the quantizer's grid weights + the reconstructor's low-rank correction), and run the
*quantized* layer to produce the next layer's inputs (``propagate="quantized"``, the default, so
later layers calibrate on what they will really see), or pass on the float outputs (``"float"``,
which reproduces whole-model calibration exactly). Peak memory is the model plus one layer's
activations and statistics. Records per-layer telemetry.

Several methods at once (``quantize_models``, what ``qaft eval`` calls): under float propagation the
statistics do not depend on the method, so one calibration forward per layer serves them all (the
copies are held together); a method that reads no statistics (RTN, LQER) skips calibration entirely
when no telemetry is asked for.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from qaft.core.errors import ConfigError
from qaft.core.hardware import resolve_bf16
from qaft.core.modules import decoder_layers, hidden_states, set_submodule

from .budget import Curve, allocate, output_error_curve, stored_bits
from .calibrate import LayerStats, collect
from .config import BudgetWeighting, PostpassConfig, Propagation
from .fakequant import QuantLinear
from .grid import QuantizedWeight, quantize_weight, working
from .lowrank import Correction, LowRank, quantize_factors
from .methods import Method, of_config
from .quantizers import QUANTIZERS
from .quantizers.base import Block, QuantizationFailed, WeightQuantizer
from .reconstructors import RECONSTRUCTORS, Preparation
from .reconstructors.base import Reconstructor
from .scheme import Granularity, QuantScheme, WeightFormat
from .sensitivity import output_sensitivity


class _Captured(Exception):
    """Stops the forward pass once layer 0's inputs are recorded."""


@dataclass(frozen=True)
class LayerReport:
    name: str
    shape: tuple[int, int]
    rank: int
    error_norm: float
    """``‖W − Q(W)‖_F``."""
    rel_output_error_rtn: float | None
    """``‖X Eᵀ‖_F / ‖X Wᵀ‖_F`` on the calibration inputs, before the correction (None: not calibrated, see ``telemetry``)."""
    rel_output_error: float | None
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
    curve: tuple[float, ...] | None = None
    """With ``postpass.budget_bpw``: the relative squared output error at rank 0 … ``postpass.rank`` (what the allocator read)."""
    output_energy: float | None = None
    """``‖X Wᵀ‖²`` on the calibration inputs (with ``budget_bpw``: the scale of ``curve``)."""
    weight_format: str | None = None
    """With ``postpass.budget_formats``: the label of the format the budget chose for this Linear."""
    stored_bpw: float | None = None
    """With ``postpass.budget_bpw``: this Linear's bits per weight as stored (codes, scales, factors at its rank)."""


def check_scheme(model: torch.nn.Module, scheme: QuantScheme, rank: int, key: str = "quant.weight") -> None:
    """Fail before any work if a layer cannot take the scheme or the rank: one line per kind of problem,
    naming the first layer, how many more there are, and a value that would fit them all. ``key``: where the
    weight format was set (``postpass.budget_formats[i]`` for a budget's extra formats)."""
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
                f"{key}.gguf_type: {scheme.weight.gguf_type.value} blocks are 32 input channels wide, which does not divide the "
                f"input width {w} of {first}{_more(bad_group)} (widths {', '.join(map(str, widths))}); keep them in float with "
                f"quant.ignore=[lm_head, {', '.join(names)}] (llama.cpp stores such tensors as F16)"
            )
        else:
            problems.append(
                f"{key}.group_size: {g} does not divide the input width {w} of {first}{_more(bad_group)} (widths {', '.join(map(str, widths))}); "
                + (f"use a group size that divides them all, e.g. {fits}, " if fits else "")
                + f"or {key}.granularity=channel"
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


def _curve(error: torch.Tensor, corr: Correction, xtx: torch.Tensor, ref: float) -> tuple[float, ...]:
    """The relative squared output error left at rank 0 … ``corr.rank`` (what the budget allocator reads)."""
    return tuple((output_error_curve(error, corr.A, corr.B, xtx) / ref**2).tolist())


def _out_norm(m: torch.Tensor, xtx32: torch.Tensor) -> float:
    """``‖X mᵀ‖_F`` from the statistics alone: ``sqrt(tr(m XᵀX mᵀ))`` (float32: telemetry, not maths)."""
    m = m.float()
    return (m @ xtx32 * m).sum().clamp(min=0).sqrt().item()


@dataclass(frozen=True)
class Solver:
    """One method's parts, created once per run: its quantizer and its reconstructor (or None)."""

    method: Method
    quantizer: WeightQuantizer
    recon: Reconstructor | None

    @classmethod
    def of(cls, method: Method) -> Solver:
        return cls(method, QUANTIZERS.create(method.quantizer), None if method.reconstructor is None else RECONSTRUCTORS.create(method.reconstructor))

    @property
    def reads_statistics(self) -> bool:
        """Whether anything it does depends on the calibration data (RTN, and LQER on RTN, do not)."""
        return self.quantizer.reads_statistics or self.quantizer.refines_blocks or (self.recon is not None and self.recon.reads_statistics)


@dataclass
class _Settings:
    """What every layer of one run shares."""

    scheme: QuantScheme
    postpass: PostpassConfig
    lowrank: LowRank
    bf16: bool
    alternatives: dict[QuantLinear, list[tuple[QuantLinear, tuple[float, ...]]]] | None = None
    """With ``postpass.budget_formats``: each placed Linear's other formats (quantized and corrected on the same
    statistics) with their curves, for ``apply_budget`` to choose among after the walk."""

    def run(self, layer: torch.nn.Module, stream: list[tuple[torch.Tensor, dict[str, Any]]]) -> list[Any]:
        """The layer on each sequence of a stream; bf16 matmuls when ``postpass.bf16`` (the stream stays float32)."""
        device = next(layer.parameters()).device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return [layer(h, **kw) for h, kw in stream]


def _quantize_layer(
    layer: torch.nn.Module,
    where: str,
    targets: dict[str, torch.nn.Linear],
    solver: Solver,
    stats: dict[str, LayerStats] | None,
    observed: Any,
    st: _Settings,
    refine: tuple[list[tuple[torch.Tensor, dict[str, Any]]], list[torch.Tensor]] | None,
) -> list[LayerReport]:
    """Replace each target of one decoder layer by its ``QuantLinear``. ``stats`` None: the solver reads none and
    no telemetry was asked for (the reports' output errors are then None). ``refine``: the block's (inputs, float
    outputs) for a quantizer that refines blocks."""
    quantizer, recon = solver.quantizer, solver.recon
    prep = recon.prepare(layer, targets, stats, observed) if recon else Preparation()  # type: ignore[arg-type]
    of = (lambda n: None) if stats is None else stats.__getitem__
    gridded, quantized, seconds = {}, {}, {}
    for name, lin in targets.items():
        t0 = time.perf_counter()
        gridded[name] = lin.weight.data
        if name in prep.extracted:  # ASER's reading (b): these columns are not quantized; the correction carries them whole
            gridded[name] = lin.weight.data.clone()
            gridded[name][:, prep.extracted[name]] = 0
        try:
            quantized[name] = quantizer.quantize(gridded[name], of(name), st.scheme.weight)
        except QuantizationFailed as e:
            raise ConfigError(f"postpass.quantizer: {solver.method.quantizer.name} on {where}.{name}: {e}") from None
        seconds[name] = time.perf_counter() - t0

    def correction(name: str, q: QuantizedWeight | None = None) -> Correction | None:
        """The correction of ``q`` (default: the quantizer's result for ``name``)."""
        err = targets[name].weight.data - (quantized[name] if q is None else q).dequant
        corr = recon.reconstruct(err, of(name), st.lowrank) if recon else None  # type: ignore[arg-type]
        return quantize_factors(corr, st.postpass.factor_bits) if corr is not None and st.postpass.factor_bits is not None else corr

    block, corrections = None, {}
    if refine is not None:
        t0 = time.perf_counter()
        # the correction is solved on the start's residual and held while the rounding learns around it: the
        # refinement then fits the layer as deployed, codes and factors together
        corrections = {n: correction(n) for n in targets}
        held = {n: c.matrix() for n, c in corrections.items() if c is not None}
        block = quantizer.refine_block(Block(layer, targets, gridded, refine[0], refine[1], st.scheme.weight, st.scheme.activation, prep.input_scales, held))
        quantized = block.weights
        seconds = {n: s + (time.perf_counter() - t0) / len(targets) for n, s in seconds.items()}
    reports, xtx32s = [], {}
    for name, lin in targets.items():
        t0 = time.perf_counter()
        w, q = lin.weight.data, quantized[name]
        err = w - q.dequant
        corr = corrections[name] if name in corrections else correction(name)
        after = err if corr is None else err - corr.matrix().to(err.dtype)
        placed = QuantLinear(q, lin.bias, st.scheme.activation, corr, prep.input_scales.get(name), spec=st.scheme.weight)
        set_submodule(layer, name, placed)
        errors: tuple[float | None, ...] = (None, None, None)
        curve = None

        if stats is not None:
            if id(stats[name]) not in xtx32s:  # one per distinct input (calibrate.collect shares them)
                xtx32s[id(stats[name])] = stats[name].xtx.float()
            xtx32 = xtx32s[id(stats[name])]
            ref = max(_out_norm(w, xtx32), 1e-30)
            before = _out_norm(err, xtx32) / ref
            nearest = _out_norm(w - quantize_weight(gridded[name], st.scheme.weight).dequant, xtx32) / ref
            errors = (before, before if corr is None else _out_norm(after, xtx32) / ref, nearest)
            if st.postpass.budget_bpw is not None and corr is not None:
                curve = _curve(err, corr, stats[name].xtx, ref)
            if st.alternatives is not None and corr is not None:  # the budget chooses among reconstructions only
                st.alternatives[placed] = []
                for spec in st.postpass.budget_formats:
                    alt = quantizer.quantize(gridded[name], of(name), spec)
                    alt_corr = correction(name, alt)
                    module = QuantLinear(alt, lin.bias, st.scheme.activation, alt_corr, prep.input_scales.get(name), spec=spec)
                    module.release_weight()  # codes only until the budget picks it: the menu's float copies were 1.5 GB on Gemma 3
                    st.alternatives[placed].append((module, _curve(w - alt.dequant, alt_corr, stats[name].xtx, ref)))  # type: ignore[arg-type]
        reports.append(
            LayerReport(
                f"{where}.{name}",
                tuple(w.shape),
                0 if corr is None else corr.rank,
                err.norm().item(),
                errors[0],
                errors[1],
                0.0 if corr is None else corr.kept_energy,
                seconds[name] + time.perf_counter() - t0,
                errors[2],
                None if block is None else (block.loss_start, block.loss),
                curve,
                None if curve is None else ref**2,
            )
        )
    return reports


@contextlib.contextmanager
def _observing(solvers: list[Solver], layer: torch.nn.Module, targets: dict[str, torch.nn.Linear]):
    """Each solver's reconstructor observes the same calibration forward; yields what each saw (None without one)."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(s.recon.observe(layer, targets)) if s.recon else None for s in solvers]


@torch.no_grad()
def quantize_models(
    models: list[torch.nn.Module],
    methods: list[Method],
    calibration: torch.Tensor,
    scheme: QuantScheme,
    postpass: PostpassConfig,
    *,
    propagate: Propagation | None = None,
    telemetry: bool = True,
    inputs: list[tuple[torch.Tensor, dict[str, Any]]] | None = None,
    keep_statistics: bool = False,
    progress: bool = True,
) -> tuple[list[list[LayerReport]], dict[str, LayerStats] | None]:
    """Quantize every target Linear of each ``models[k]`` in place with ``methods[k]`` (the models: copies of one
    float model). ``calibration``: ``[n, seq_len]`` token ids.

    With ``float`` propagation the statistics are the float model's, so they are computed once per layer (on the
    first model, before it is quantized) and every method reads them: one calibration forward per layer for all
    methods, at the cost of holding every copy at once. With ``quantized`` propagation each model calibrates on
    its own stream. ``telemetry`` False skips the calibration of a method that reads no statistics (RTN, LQER):
    no forward at all, the reports' output errors None. ``inputs``: layer 0's inputs on ``calibration`` when the
    caller already has them (they are the float model's for every copy). Returns the per-layer reports of each
    model and, with ``keep_statistics`` under ``float`` propagation, every layer's statistics as collected (for
    tests: they are the whole model's, hundreds of MB for a 135M model).
    """
    propagate = Propagation(propagate or postpass.propagate)
    solvers = [Solver.of(m) for m in methods]
    for model, solver in zip(models, solvers):
        check_scheme(model, scheme, postpass.rank if solver.recon else 0)
        for i, spec in enumerate(postpass.budget_formats):
            check_scheme(model, dataclasses.replace(scheme, weight=spec), 0, key=f"postpass.budget_formats[{i}]")
        model.eval()
    st = _Settings(scheme, postpass, LowRank(postpass.rank, randomized=postpass.randomized_svd, energy=postpass.energy), resolve_bf16(postpass.bf16)[0])
    st.alternatives = {} if postpass.budget_formats else None
    reports: list[list[LayerReport]] = [[] for _ in models]
    budgeted = postpass.budget_bpw is not None
    blind = [k for k, s in enumerate(solvers) if not telemetry and not s.reads_statistics and not (budgeted and s.recon)]
    for k in blind:  # no calibration forward at all
        prefix, layers = decoder_layers(models[k])
        for i, layer in enumerate(layers):
            reports[k] += _quantize_layer(layer, f"{prefix}.{i}", scheme.layer_linears(layer, f"{prefix}.{i}"), solvers[k], None, None, st, None)
    calibrated = [k for k in range(len(models)) if k not in blind]
    if not calibrated:
        return reports, None
    if inputs is None:
        inputs = capture_inputs(models[calibrated[0]], decoder_layers(models[calibrated[0]])[1][0], calibration)
    sensitivity = None
    if budgeted and postpass.budget_weighting is BudgetWeighting.FISHER and any(solvers[k].recon for k in calibrated):  # on the float model, before the walk
        sensitivity = output_sensitivity(
            models[calibrated[0]], scheme.linears(models[calibrated[0]]), calibration[: postpass.budget_sensitivity_samples], bf16=st.bf16
        )
    groups = [calibrated] if propagate is Propagation.FLOAT else [[k] for k in calibrated]  # the models that share one stream
    kept: dict[str, LayerStats] | None = {} if propagate is Propagation.FLOAT and keep_statistics else None
    for group in groups:
        _walk([models[k] for k in group], [solvers[k] for k in group], [reports[k] for k in group], inputs, st, propagate, kept, progress)
    if budgeted:
        # a method without a reconstructor (``rtn``: the base alone, as the eval table's comparison row) has no ranks to
        # allocate: it stays on the scheme's own format
        reports = [
            apply_budget(m, r, postpass.budget_bpw, postpass.budget_weighting, sensitivity, st.alternatives) if solver.recon else r
            for m, r, solver in zip(models, reports, solvers)
        ]
    return reports, kept


def apply_budget(
    model: torch.nn.Module,
    reports: list[LayerReport],
    budget_bpw: float,
    weighting: BudgetWeighting,
    sensitivity: dict[str, float] | None = None,
    alternatives: dict[QuantLinear, list[tuple[QuantLinear, tuple[float, ...]]]] | None = None,
) -> list[LayerReport]:
    """Choose each Linear's rank (and, with ``alternatives``, its format) within the budget from the curves the walk
    measured (``budget.allocate``), put the chosen format in place and truncate its factors; the reports then say
    the rank, format and output error each Linear is left with. ``sensitivity``: ``output_sensitivity`` of the
    float model, for ``fisher`` weighting.

    Under quantized propagation the later layers were calibrated on a stream whose earlier layers were on
    ``quant.weight`` with ``postpass.rank`` components: the allocation comes after the one walk, so the post-pass
    costs one extra ``E·XᵀX`` product per Linear and format, not a second walk."""
    weight = {
        BudgetWeighting.RELATIVE: lambda r: 1.0,
        BudgetWeighting.ABSOLUTE: lambda r: r.output_energy,
        BudgetWeighting.FISHER: lambda r: r.output_energy * sensitivity[r.name.removeprefix("base_model.model.")],  # type: ignore[index]  # scheme.linears' plain names
    }[weighting]
    placed = {r.name: model.get_submodule(r.name) for r in reports}
    options = {r.name: [(placed[r.name], r.curve), *(alternatives or {}).get(placed[r.name], [])] for r in reports}
    menus = [[Curve(r.name, tuple(e * weight(r) for e in curve), *stored_bits(m)) for m, curve in options[r.name]] for r in reports]  # type: ignore[union-attr, arg-type]
    out = []
    for r, (f, k) in zip(reports, allocate(menus, budget_bpw)):
        chosen, curve = options[r.name][f]
        if f:
            chosen.refresh_weight()
            set_submodule(model, r.name, chosen)
        chosen.truncate(k)
        label = chosen.spec.label if alternatives is not None else None
        bits = menus[len(out)][f]
        stored = (bits.base_bits + bits.bits_per_rank * k) / bits.weights
        out.append(dataclasses.replace(r, rank=k, rel_output_error=curve[k] ** 0.5, weight_format=label, stored_bpw=stored))  # type: ignore[index]
    return out


def _walk(
    models: list[torch.nn.Module],
    solvers: list[Solver],
    reports: list[list[LayerReport]],
    inputs: list[tuple[torch.Tensor, dict[str, Any]]],
    st: _Settings,
    propagate: Propagation,
    kept: dict[str, LayerStats] | None,
    progress: bool,
) -> None:
    """Layer by layer through models that share one stream of inputs (one model under quantized propagation, any
    number under float): one calibration forward of the first model's float layer per layer, then each model's
    layer quantized by its solver. The first model's layer is quantized last, after the others read its statistics."""
    walks = [decoder_layers(m) for m in models]
    prefix = walks[0][0]
    refines = any(s.quantizer.refines_blocks for s in solvers)
    float_inputs = inputs if refines and propagate is Propagation.QUANTIZED else None  # a refinement's targets come from the float stream
    for i, lead in enumerate(tqdm(walks[0][1], desc="post-pass (layers)", disable=not progress, leave=False)):
        where = f"{prefix}.{i}"
        targets = st.scheme.layer_linears(lead, where)
        float_outputs = None if float_inputs is None else [hidden_states(y) for y in st.run(lead, float_inputs)]
        with collect(targets) as stats, _observing(solvers, lead, targets) as observed:
            outputs = [hidden_states(y) for y in st.run(lead, inputs)]
        if propagate is Propagation.FLOAT:  # the stream is the float one: the layer's outputs are its own targets
            float_outputs = outputs
        if kept is not None:
            kept |= {f"{where}.{n}": s for n, s in copy.deepcopy(stats).items()}  # as collected, before any prepare edits them
        for k in reversed(range(len(models))):
            layer = walks[k][1][i]
            own = stats if k == 0 else copy.deepcopy(stats)  # prepare may edit statistics in place (ASER's smoothing)
            refine = (inputs, float_outputs) if solvers[k].quantizer.refines_blocks else None
            reports[k] += _quantize_layer(layer, where, st.scheme.layer_linears(layer, where), solvers[k], own, observed[k], st, refine)  # type: ignore[arg-type]
        if propagate is Propagation.FLOAT:
            inputs = [(y, kw) for y, (_, kw) in zip(outputs, inputs)]
        else:
            inputs = [(hidden_states(y), kw) for y, (_, kw) in zip(st.run(lead, inputs), inputs)]
        if float_inputs is not None:
            float_inputs = [(y, kw) for y, (_, kw) in zip(float_outputs, float_inputs)]  # type: ignore[arg-type]


@torch.no_grad()
def quantize_model(
    model: torch.nn.Module,
    calibration: torch.Tensor,
    scheme: QuantScheme,
    postpass: PostpassConfig,
    *,
    method: Method | None = None,
    propagate: Propagation | str | None = None,
    telemetry: bool = True,
    keep_statistics: bool = False,
    progress: bool = True,
) -> tuple[list[LayerReport], dict[str, LayerStats] | None]:
    """``quantize_models`` for one model: ``method`` defaults to the one ``postpass`` names, ``propagate`` to ``postpass.propagate``."""
    reports, kept = quantize_models(
        [model],
        [method or of_config(postpass)],
        calibration,
        scheme,
        postpass,
        propagate=propagate,  # type: ignore[arg-type]
        telemetry=telemetry,
        keep_statistics=keep_statistics,
        progress=progress,
    )
    return reports[0], kept


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
            num += working(y - y_ref).pow(2).sum().item()
            den += working(y_ref).pow(2).sum().item()
        errors.append((num / max(den, 1e-30)) ** 0.5)
        inputs = [(hidden_states(y), kw) for y, (_, kw) in zip(outputs, inputs)]
    return errors

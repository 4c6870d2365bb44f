"""``postpass.budget_bpw``: the allocator and the measured curves it reads (``quant/budget.py``)."""

from __future__ import annotations

import copy
import itertools
import math
import random
from pathlib import Path

import pytest
import torch
from test_export import python_blocks, run_snippet

from helpers import postpass
from qaft.core.errors import ConfigError
from qaft.core.model import ModelConfig, load_model_and_tokenizer
from qaft.quant.budget import Curve, allocate, bounds, model_bpw, output_error_curve, spent_bpw, stored_bits
from qaft.quant.calibrate import LayerStats
from qaft.quant.fakequant import QuantLinear
from qaft.quant.lowrank import LowRank
from qaft.quant.postpass import quantize_model
from qaft.quant.reconstructors import RECONSTRUCTORS
from qaft.quant.scheme import QuantScheme


def convex_curve(rng: random.Random, k: int) -> tuple[float, ...]:
    gains = sorted((rng.random() ** 2 for _ in range(k)), reverse=True)
    total = sum(gains) + rng.random()
    return tuple(total - sum(gains[:i]) for i in range(k + 1))


def brute_force(layers: list[list[Curve]], budget: float) -> float:
    best = float("inf")
    for choice in itertools.product(*([(f, k) for f, c in enumerate(menu) for k in range(len(c.errors))] for menu in layers)):
        if spent_bpw(layers, list(choice)) <= budget + 1e-12:
            best = min(best, error_of(layers, list(choice)))
    return best


def error_of(layers: list[list[Curve]], choices: list[tuple[int, int]]) -> float:
    return sum(menu[f].errors[k] for menu, (f, k) in zip(layers, choices))


def one_format(curves: list[Curve]) -> list[list[Curve]]:
    return [[c] for c in curves]


def assert_no_affordable_segment_is_left(layers: list[list[Curve]], budget: float, choices: list[tuple[int, int]]) -> None:
    """Maximality: each Linear's next segment on its lower hull, from the point it got, costs more than the bits left.
    The next hull point is found here from its definition (the option of steepest error drop per extra bit, the
    farthest of equally steep ones), not with the allocator's own hull."""
    left = budget * sum(menu[0].weights for menu in layers) - sum(menu[f].base_bits + menu[f].bits_per_rank * k for menu, (f, k) in zip(layers, choices))
    for menu, (f, k) in zip(layers, choices):
        b0, e0 = menu[f].base_bits + menu[f].bits_per_rank * k, menu[f].errors[k]
        dearer = [(c.base_bits + c.bits_per_rank * j, c.errors[j]) for c in menu for j in range(len(c.errors))]
        steps = [((e0 - e) / (b - b0), b - b0) for b, e in dearer if b > b0 and e < e0]
        if steps:
            steepest = max(steps)
            assert steepest[1] > left + 1e-9, f"{menu[0].name}: a segment of {steepest[1]} bits is left unbought with {left} bits unspent"


@pytest.mark.parametrize("seed", range(6))
def test_the_allocation_is_optimal_on_small_instances_and_within_the_budget(seed):
    """Layers of one shape (equal cost per component) with convex curves: greedy over the hull is the brute-force optimum."""
    rng = random.Random(seed)
    layers = one_format([Curve(f"l{i}", convex_curve(rng, 4), 4 * 64, 16 * 16, 64) for i in range(4)])
    low, high = bounds(layers)
    for budget in (low, low + 0.37 * (high - low), low + 0.81 * (high - low), high):
        choices = allocate(layers, budget)
        assert spent_bpw(layers, choices) <= budget + 1e-12
        assert error_of(layers, choices) == pytest.approx(brute_force(layers, budget), rel=1e-12), (budget, choices)
        assert_no_affordable_segment_is_left(layers, budget, choices)


def test_unequal_costs_stay_within_one_segment_of_the_optimum_and_the_budget():
    rng = random.Random(7)
    layers = one_format([Curve(f"l{i}", convex_curve(rng, 4), 4 * 64 * w, 16 * 8 * w, 64 * w) for i, w in enumerate((1, 2, 3, 1, 2))])
    low, high = bounds(layers)
    for frac in (0.2, 0.5, 0.9):
        budget = low + frac * (high - low)
        choices = allocate(layers, budget)
        worst_step = max(menu[0].errors[0] - menu[0].errors[1] for menu in layers)
        assert spent_bpw(layers, choices) <= budget + 1e-12 and error_of(layers, choices) <= brute_force(layers, budget) + worst_step
        assert_no_affordable_segment_is_left(layers, budget, choices)


def test_a_segment_that_does_not_fit_stops_only_its_own_linear_and_segments_are_bought_by_gain_per_bit():
    """Hand cases (budget 1000 bits above rank 0): ``c``'s one segment is the steepest but costs 2000 bits, so it is
    skipped and ``b`` buys all five of its ranks (a ``break`` there would leave the budget unspent); ``a`` gains more
    than any of ``b``'s steps but per bit less than all of them (buying by gain would take ``a``, error 2 instead of 1)."""
    b = Curve("b", (2.0, 1.5, 1.05, 0.65, 0.3, 0.0), 0, 200, 500)
    c = Curve("c", (10.0, 0.0), 0, 2000, 500)
    a = Curve("a", (1.0, 0.0), 0, 1000, 500)
    for first in (c, a):
        layers = [[first], [b]]
        assert allocate(layers, 1.0) == [(0, 0), (0, 5)]
        assert error_of(layers, [(0, 0), (0, 5)]) == brute_force(layers, 1.0)
        assert_no_affordable_segment_is_left(layers, 1.0, [(0, 0), (0, 5)])


def test_equal_curves_give_every_layer_the_same_rank():
    curve = (1.0, 0.5, 0.3, 0.2, 0.15)
    layers = one_format([Curve(f"l{i}", curve, 1000, 100, 250) for i in range(6)])
    for k in range(5):
        assert allocate(layers, spent_bpw(layers, [(0, k)] * 6)) == [(0, k)] * 6


def menu_of(rng: random.Random, name: str, weights: int) -> list[Curve]:
    """Three formats of one Linear: more bits per weight, less error at rank 0; factors cost the same in each."""
    first = rng.uniform(2.0, 4.0)
    return [Curve(name, tuple(e * first / bits**2 for e in convex_curve(rng, 3)), bits * weights, 16 * 8, weights) for bits in (3, 4, 8)]


@pytest.mark.parametrize("seed", range(4))
def test_formats_and_ranks_chosen_together_stay_within_the_budget_and_one_segment_of_the_optimum(seed):
    """A menu of formats per Linear: the greedy over the hull of every (format, rank) point against brute force."""
    rng = random.Random(seed)
    layers = [menu_of(rng, f"l{i}", 64 * w) for i, w in enumerate((1, 2, 1))]
    low, high = bounds(layers)
    assert low == pytest.approx(3.0) and high > 8.0
    for frac in (0.0, 0.15, 0.4, 0.7, 1.0):
        budget = low + frac * (high - low)
        choices = allocate(layers, budget)
        points = [(m.base_bits + m.bits_per_rank * k, m.errors[k]) for menu in layers for m in menu for k in range(len(m.errors))]
        worst_step = max(e1 - e2 for (b1, e1) in points for (b2, e2) in points if b2 > b1)
        assert spent_bpw(layers, choices) <= budget + 1e-12
        assert error_of(layers, choices) <= brute_force(layers, budget) + worst_step
        assert_no_affordable_segment_is_left(layers, budget, choices)


def test_a_format_that_costs_more_and_errs_more_is_never_chosen_and_a_dominant_one_always():
    cheap_bad = Curve("a", (5.0, 4.0), 4 * 64, 256, 64)
    dear_bad = Curve("a", (6.0, 5.0), 5 * 64, 256, 64)  # more bits, more error: never worth it
    good = Curve("a", (1.0, 0.5), 4 * 64, 256, 64)  # as cheap as cheap_bad, less error: always
    for budget in (4.0, 5.0, 9.0):
        assert allocate([[cheap_bad, dear_bad]], budget)[0][0] == 0
        assert allocate([[cheap_bad, good, dear_bad]], budget)[0][0] == 1


def test_the_bits_go_to_the_linear_whose_error_costs_most():
    """Two Linears with the same menu, one's errors ten times the other's: at a budget for one upgrade, it gets it."""
    menu = lambda scale: [Curve("x", (scale * 1.0,), 3 * 64, 256, 64), Curve("x", (scale * 0.1,), 8 * 64, 256, 64)]  # noqa: E731
    assert allocate([menu(1.0), menu(10.0)], (3 + 8) / 2) == [(0, 0), (1, 0)]
    assert allocate([menu(10.0), menu(1.0)], (3 + 8) / 2) == [(1, 0), (0, 0)]


def test_a_step_that_pays_only_with_the_next_one_is_bought_as_a_pair():
    """The hull: rank 1 of ``a`` gains little, rank 2 a lot; judged step by step ``b`` would take both ranks (error
    1.6); over the hull ``a``'s jump 0 → 2 is the better buy (1.1, the optimum). Same with formats: a 4-bit format
    that barely helps on the way to an 8-bit one."""
    a, b = Curve("a", (1.0, 0.95, 0.1), 1000, 100, 250), Curve("b", (1.0, 0.7, 0.6), 1000, 100, 250)
    budget = spent_bpw([[a], [b]], [(0, 2), (0, 0)])
    assert allocate([[a], [b]], budget) == [(0, 2), (0, 0)] and brute_force([[a], [b]], budget) == pytest.approx(1.1)
    fmt = lambda err, bits: Curve("x", (err,), bits * 64, 256, 64)  # noqa: E731
    menus = [[fmt(1.0, 3), fmt(0.95, 4), fmt(0.1, 5)], [fmt(1.0, 3), fmt(0.7, 4), fmt(0.6, 5)]]
    assert allocate(menus, (5 + 3) / 2) == [(2, 0), (0, 0)]


def test_a_budget_below_the_codes_and_scales_is_one_line_naming_the_minimum():
    layers = [[Curve("l0", (1.0, 0.5), 4 * 64 + 16 * 8, 256, 64)]]
    with pytest.raises(
        ConfigError, match=r"postpass\.budget_bpw: 4 bits per weight is below what the codes and scales alone take, 6\.000; use at least 6\.000"
    ):
        allocate(layers, 4.0)


def test_the_measured_curve_is_the_real_output_error_and_the_whitened_spectrum_tail():
    """For any factors the curve equals ``‖X (E − A_k B_k)ᵀ‖²`` computed directly; for whitening SVD it is the tail of
    the whitened singular values (the property the allocation relies on)."""
    torch.manual_seed(0)
    x = torch.randn(512, 48, dtype=torch.float64) * torch.linspace(0.1, 5, 48, dtype=torch.float64)
    e = torch.randn(32, 48, dtype=torch.float64) * 0.01
    stats = LayerStats(48)
    stats.update(x)
    corr = RECONSTRUCTORS.create(RECONSTRUCTORS.spec("whiten")).reconstruct(e, stats, LowRank(12))
    curve = output_error_curve(e, corr.A, corr.B, stats.xtx)
    direct = [((e - corr.A[:, :k] @ corr.B[:k]) @ x.T).pow(2).sum().item() for k in range(13)]
    assert curve.tolist() == pytest.approx(direct, rel=1e-6)  # XᵀX from float32 products (calibrate.LayerStats)
    m = e @ torch.linalg.cholesky(stats.xtx)  # ‖X Mᵀ‖² = ‖E L‖² with XᵀX = L Lᵀ
    s = torch.linalg.svdvals(m)
    tail = [(s[k:] ** 2).sum().item() for k in range(13)]
    assert curve.tolist() == pytest.approx(tail, rel=1e-6)


@pytest.fixture(scope="module")
def tiny():
    model, _ = load_model_and_tokenizer(ModelConfig(name_or_path="tiny-llama"))
    return model, torch.randint(0, 257, (6, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", ["whiten", "l2qer"])
def test_a_budgeted_post_pass_holds_the_budget_varies_ranks_and_beats_the_uniform_rank_at_its_bits(tiny, method):
    """On the tiny model: the stored bits equal what the allocator spent (at most the budget), ranks differ between
    Linears, and the summed relative output error (what ``relative`` weighting minimises) is below the uniform rank's."""
    model, calib = tiny
    uniform = copy.deepcopy(model)
    flat = quantize_model(uniform, calib, QuantScheme(), postpass(method, 4, bf16=False), progress=False)[0]
    budget = model_bpw(uniform)
    alloc = copy.deepcopy(model)
    got = quantize_model(alloc, calib, QuantScheme(), postpass(method, 16, bf16=False, budget_bpw=budget, budget_weighting="relative"), progress=False)[0]
    assert model_bpw(alloc) <= budget + 1e-9
    assert len({r.rank for r in got}) > 1 and max(r.rank for r in got) > 4
    assert [r.rank for r in got] == [0 if m.lora_A is None else m.lora_A.shape[0] for m in alloc.modules() if isinstance(m, QuantLinear)]
    assert sum(r.rel_output_error**2 for r in got) < sum(r.rel_output_error**2 for r in flat)


def test_the_doctor_range_counts_bits_as_the_quantized_model_stores_them():
    from qaft.quant.budget import shape_bits
    from qaft.quant.scheme import Granularity, WeightQuant

    model, _ = load_model_and_tokenizer(ModelConfig(name_or_path="tiny-llama"))
    for spec in (WeightQuant(), WeightQuant(bits=3, symmetric=False, granularity=Granularity.GROUP, group_size=16)):
        m = copy.deepcopy(model)
        quantize_model(m, torch.randint(0, 257, (2, 16)), QuantScheme(weight=spec), postpass("lqer", 2), progress=False)
        for lin in (x for x in m.modules() if isinstance(x, QuantLinear)):
            assert shape_bits(lin.out_features, lin.in_features, spec) == stored_bits(lin)


@pytest.mark.parametrize("t", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4"])
def test_gguf_types_cost_the_bits_llama_cpp_stores_them_in(t):
    """The budget counts a GGUF type as its block's bytes in ``gguf.GGML_QUANT_SIZES`` (what the export's size
    report and llama.cpp count): MXFP4's shared scale is an 8-bit exponent, 4.25 bits per weight, not 4.5."""
    import gguf

    from qaft.quant.budget import shape_bits
    from qaft.quant.scheme import GGUFType, WeightFormat, WeightQuant

    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]]
    base, _, weights = shape_bits(64, 128, WeightQuant(format=WeightFormat.GGUF, gguf_type=GGUFType(t)))
    assert base / weights == 8 * type_size / block


def test_budget_config_errors_are_one_line_each():
    with pytest.raises((ValueError, ConfigError), match="budget_bpw: allocates the correction's ranks; name a reconstructor"):
        postpass(None, 8, budget_bpw=5.0)
    with pytest.raises((ValueError, ConfigError), match="budget_bpw: cannot be combined with energy or factor_bits"):
        postpass("whiten", 8, budget_bpw=5.0, factor_bits=8)


def test_the_sensitivity_is_the_mean_squared_loss_gradient_at_each_output(tiny):
    """Checked against another route to the same gradient: a zero bias added to the Linear's output, whose gradient is it."""
    from qaft.quant.sensitivity import output_sensitivity

    model, calib = tiny
    model = copy.deepcopy(model).eval()
    names = ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    got = output_sensitivity(model, {n: model.get_submodule(n) for n in names}, calib[:2])
    assert all(p.grad is None for p in model.parameters()) and all(p.requires_grad for p in model.parameters())  # weights untouched, flags restored
    for name in names:
        lin, total, count = model.get_submodule(name), 0.0, 0
        for seq in calib[:2]:
            shift = torch.zeros(1, seq.numel(), lin.out_features, requires_grad=True)
            h = lin.register_forward_hook(lambda m, a, out, shift=shift: out + shift)
            model(input_ids=seq[None], labels=seq[None]).loss.backward()
            h.remove()
            total, count = total + shift.grad.double().pow(2).sum().item(), count + shift.numel()
        assert got[name] == pytest.approx(total / count, rel=1e-6)


def test_bf16_sensitivities_rank_the_layers_as_float32_ones_do(tiny):
    """``postpass.bf16`` runs the sensitivity pass under bf16 autocast: each value moves by a few percent at most (they
    only weigh layers against each other), the order of the layers is kept, and the switch is live."""
    from qaft.quant.sensitivity import output_sensitivity

    model, calib = tiny
    model = copy.deepcopy(model).eval()
    lins = QuantScheme().linears(model)
    fp32, bf16 = (output_sensitivity(model, lins, calib[:3], bf16=b) for b in (False, True))
    assert fp32 != bf16
    for name in lins:
        assert bf16[name] == pytest.approx(fp32[name], rel=0.05), name
    assert sorted(lins, key=fp32.get) == sorted(lins, key=bf16.get)
    spread = sorted(fp32.values())
    assert spread[-1] > 10 * spread[0]  # the layers differ by far more than bf16 moves them


def test_fisher_weighting_spends_nothing_where_the_loss_cannot_see_the_error(tiny):
    """With layer 0's attention output projection zeroed, its q/k/v outputs cannot reach the loss: ``fisher`` gives
    them rank 0 (their errors cost nothing), where ``absolute`` (blind to that) spends bits on them."""
    model, calib = tiny
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
    ranks = {}
    for weighting in ("fisher", "absolute"):
        m = copy.deepcopy(model)
        got = quantize_model(m, calib, QuantScheme(), postpass("whiten", 16, bf16=False, budget_bpw=6.0, budget_weighting=weighting), progress=False)[0]
        ranks[weighting] = {r.name.rsplit(".", 1)[1]: r.rank for r in got if r.name.startswith("model.layers.0.self_attn.")}
        assert model_bpw(m) <= 6.0 + 1e-9
    assert ranks["fisher"]["q_proj"] == ranks["fisher"]["k_proj"] == ranks["fisher"]["v_proj"] == 0
    assert ranks["absolute"]["v_proj"] > 0


def test_fisher_measures_the_sensitivities_on_the_first_budget_sensitivity_samples_sequences(tiny, monkeypatch):
    """The sensitivity pass costs one forward and backward per sequence it reads: ``budget_sensitivity_samples`` bounds
    that (the first ones; all of them when there are fewer, or by default), and the allocation weighs by exactly those
    sequences'."""
    import qaft.quant.postpass as pp
    from qaft.quant.sensitivity import output_sensitivity

    model, calib = tiny
    seen = []
    monkeypatch.setattr(pp, "output_sensitivity", lambda m, lins, seqs, **kw: seen.append(seqs.clone()) or output_sensitivity(m, lins, seqs, **kw))
    for samples, expect in ((2, calib[:2]), (len(calib) + 5, calib), (None, calib)):
        cfg = postpass("whiten", 8, bf16=False, budget_bpw=6.0, budget_weighting="fisher", budget_sensitivity_samples=samples)
        quantize_model(copy.deepcopy(model), calib, QuantScheme(), cfg, progress=False)
        assert torch.equal(seen.pop(), expect)


MENU = [{"bits": 2, "granularity": "group", "group_size": 32}, {"bits": 8}]


def budgeted(tiny, formats: list[dict]) -> tuple[torch.nn.Module, list]:
    """The tiny model after a post-pass at 5 bits per weight (whiten, cap 8), with ``formats`` as ``budget_formats``."""
    model, calib = tiny
    m = copy.deepcopy(model)
    return m, quantize_model(m, calib, QuantScheme(), postpass("whiten", 8, bf16=False, budget_bpw=5.0, budget_formats=formats), progress=False)[0]


def test_under_a_budget_with_formats_a_method_without_reconstructor_stays_on_the_schemes_own_format(tiny):
    """``qaft run``'s table has an ``rtn`` row beside the method: under a budget config it is the base alone on
    ``quant.weight`` (nothing to allocate without factors), while the method beside it is budgeted."""
    from qaft.eval.compare import evaluate_methods
    from qaft.eval.config import EvalConfig
    from qaft.quant.scheme import WeightQuant

    model, calib = tiny
    cfg = postpass("whiten", 8, bf16=False, budget_bpw=5.0, budget_formats=MENU)
    rows = evaluate_methods(model, calib.flatten(), calib, QuantScheme(), cfg, ["rtn", "whiten"], EvalConfig(path="x", windows=1, seq_len=16), False)
    rtn, whiten = rows["rtn"]["layers"], rows["whiten"]["layers"]
    assert {r["weight_format"] for r in rtn} <= {None, WeightQuant().label} and all(r["rank"] == 0 for r in rtn)
    assert len({r["weight_format"] for r in whiten}) > 1 and math.isfinite(rows["rtn"]["ppl"])


def test_formats_chosen_with_the_ranks_hold_the_budget_mix_formats_and_lower_the_error(tiny):
    """``budget_formats``: each Linear ends on one format of the menu (``quant.weight`` or another) at its rank, the
    stored bits stay within the budget, and the summed output error is below the ranks-only allocation's."""
    from qaft.quant.scheme import Granularity, WeightQuant

    runs = {"ranks": budgeted(tiny, []), "formats": budgeted(tiny, MENU)}
    m, got = runs["formats"]
    lins = {r.name: m.get_submodule(r.name) for r in got}
    assert model_bpw(m) <= 5.0 + 1e-9
    specs = {lin.spec for lin in lins.values()}
    assert specs <= {WeightQuant(), WeightQuant(bits=2, granularity=Granularity.GROUP, group_size=32), WeightQuant(bits=8)} and len(specs) > 1
    for r in got:
        assert r.weight_format == lins[r.name].spec.label and r.rank == (0 if lins[r.name].lora_A is None else lins[r.name].lora_A.shape[0])
    error = {k: sum(r.rel_output_error**2 * r.output_energy for r in reports) for k, (_, reports) in runs.items()}
    assert error["formats"] < error["ranks"]


def test_a_result_with_formats_per_linear_saves_and_reloads_to_the_same_logits(tiny, tmp_path):
    from qaft.quant.store import load_quantized, save_quantized

    model, _ = budgeted(tiny, MENU)
    _, tok = load_model_and_tokenizer(ModelConfig(name_or_path="tiny-llama"))
    loaded, _, meta = load_quantized(save_quantized(model, tok, tmp_path / "q", QuantScheme(), {}, overwrite=False))
    assert len(meta["layer_formats"]) == sum(m.spec != QuantScheme().weight for m in model.modules() if isinstance(m, QuantLinear)) > 0
    specs = lambda m: {n: q.spec for n, q in m.named_modules() if isinstance(q, QuantLinear)}  # noqa: E731
    assert specs(loaded) == specs(model) and model_bpw(loaded) == model_bpw(model)  # the bits as counted, not only the values
    ids = tiny[1][:2]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def saved_budget_result(model: torch.nn.Module, tmp_path) -> Path:
    """``model`` (a budgeted post-pass result) saved as ``qaft quantize`` saves it; returns the folder."""
    from qaft.quant.store import save_quantized

    _, tok = load_model_and_tokenizer(ModelConfig(name_or_path="tiny-llama"))
    meta = {"method": "rtn+whiten", "rank": 8, "source_model": "tiny-llama", "calibration": {"samples": 6, "seq_len": 32, "path": "random tokens"}}
    return save_quantized(model, tok, tmp_path / "q", QuantScheme(), meta, overwrite=False)


@pytest.mark.parametrize("symmetric", [True, False])
def test_a_compressed_tensors_export_holds_each_linears_own_int_format(tiny, tmp_path, symmetric, monkeypatch):
    """A budget over int formats exports to compressed-tensors as chosen: one config group per format (the scheme's
    targets ``Linear``, each other names its Linears), every Linear's codes packed at its own bits and unpacking to
    qaft's codes (and zero points), the bits counted from the files equal to what the budget counted, and the reload
    (parity enforced by the export: transformers + peft, and compressed-tensors' own decompression; transformers'
    compressed route cannot read asymmetric zero points, so those take only the latter) computing qaft's function,
    also through the card's snippet as written. Three formats in play: with layer 0's o_proj zeroed, ``fisher``
    puts that layer's q/k/v on the cheap W3 and spends on W8 elsewhere."""
    import json

    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    from qaft.export.config import ExportConfig
    from qaft.export.ctformat import stored_floats
    from qaft.export.exporter import export

    model, calib = tiny
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
    menu = [{"bits": 8}, {"bits": 3, "granularity": "group", "group_size": 32, "symmetric": symmetric}]
    cfg = postpass("whiten", 8, bf16=False, budget_bpw=5.0, budget_formats=menu, budget_weighting="fisher")
    quantize_model(model, calib, QuantScheme(), cfg, progress=False)
    chosen = {n: q.spec for n, q in model.named_modules() if isinstance(q, QuantLinear)}
    assert {spec.label for spec in chosen.values()} == {"W4 per-channel sym", "W8 per-channel sym", f"W3 g32 {'sym' if symmetric else 'asym'}"}
    src = saved_budget_result(model, tmp_path)
    out, m = export(src, tmp_path / "out", ExportConfig(evaluate=False), source=ModelConfig(name_or_path="tiny-llama"), protocol=None, overwrite=False)
    assert set(m["parity"]) == ({"transformers", "compressed-tensors"} if symmetric else {"compressed-tensors"})
    assert all(p["max_abs_diff"] <= ExportConfig().parity_atol and p["top1_agreement"] == 1.0 for p in m["parity"].values())
    [code] = python_blocks((out / "README.md").read_text())
    card_model = run_snippet(code, out, str(out / "README.md"), monkeypatch)["model"].eval()
    ids, ours = calib[:2], stored_floats(model, torch.bfloat16)  # float tensors as the files store them (export.float_dtype)
    with torch.no_grad():
        assert (card_model(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max() <= ExportConfig().parity_atol
    groups = json.loads((out / "base" / "config.json").read_text())["quantization_config"]["config_groups"]
    targets = {g["weights"]["num_bits"]: g["targets"] for g in groups.values()}
    assert len(groups) == 3 and targets[4] == ["Linear"]  # the scheme's format: every Linear not named elsewhere
    for bits in (3, 8):
        assert targets[bits] == sorted(n for n, spec in chosen.items() if spec.bits == bits)
    assert m["layer_formats"] == {n: spec.label for n, spec in chosen.items() if spec != QuantScheme().weight}
    base, store = load_file(str(out / "base" / "model.safetensors")), load_file(str(src / "model.safetensors"))
    for name, spec in chosen.items():
        offset = 0 if spec.symmetric else 2 ** (spec.bits - 1)  # asymmetric codes are stored signed (ctpack)
        codes = unpack_from_int32(base[f"{name}.weight_packed"], spec.bits, torch.Size(base[f"{name}.weight_shape"].tolist())).to(torch.int16)
        assert torch.equal(codes + offset, store[f"{name}.codes"].to(torch.int16)), name
        assert base[f"{name}.weight_packed"].numel() * 32 == spec.bits * codes.numel(), name  # packed at its own width
        if not spec.symmetric:
            zp = unpack_from_int32(base[f"{name}.weight_zero_point"], spec.bits, store[f"{name}.zero"].shape, packed_dim=0)
            assert torch.equal(zp.to(torch.int16) + offset, store[f"{name}.zero"].to(torch.int16)), name
        assert base[f"{name}.weight_scale"].dtype == torch.float16 and torch.equal(
            base[f"{name}.weight_scale"].float().flatten(), store[f"{name}.scale"].flatten()
        ), name
    # the files hold what the budget counted (fp16 scales), plus each Linear's int64 [2] weight_shape, exactly
    # (symmetric: no zero points, which are packed otherwise)
    layers = [q for q in model.modules() if isinstance(q, QuantLinear)]
    if symmetric:
        surplus = sum(2 * 64 for q in layers) / sum(q.weight.numel() for q in layers)
        assert m["sizes"]["bits_per_weight_with_adapter"] == pytest.approx(model_bpw(model) + surplus, rel=1e-12)


def test_an_export_that_cannot_write_a_chosen_format_is_refused_in_one_line(tiny, tmp_path):
    """compressed-tensors has no MX integer format: a menu that put Linears on MXINT is refused before anything is
    written, naming a Linear, the format and the fix."""
    from qaft.core.errors import ExportError
    from qaft.export.config import ExportConfig
    from qaft.export.exporter import export

    model, _ = budgeted(tiny, [{"format": "mxint", "bits": 8, "granularity": "group", "group_size": 32}])
    assert any(q.spec.label == "MXINT8 b32" for q in model.modules() if isinstance(q, QuantLinear))
    src = saved_budget_result(model, tmp_path)
    with pytest.raises(
        ExportError,
        match=r"^export\.format: compressed-tensors cannot write MXINT8 b32, where postpass\.budget_formats put model\.layers\.\S+ \(and \d+ more Linears\) "
        r"beside quant\.weight W4 per-channel sym; give postpass\.budget_formats int formats only \(e\.g\. \{bits: 8\}\)$",
    ):
        export(src, tmp_path / "out", ExportConfig(), source=ModelConfig(name_or_path="tiny-llama"), protocol=None, overwrite=False)
    assert not (tmp_path / "out").exists()


def test_the_report_plots_each_linears_rank_and_stored_bits_and_they_add_up_to_the_model(tiny, tmp_path):
    import dataclasses

    from qaft.pipeline import report

    model, got = budgeted(tiny, MENU)
    weights = [r.shape[0] * r.shape[1] for r in got]
    assert sum(r.stored_bpw * w for r, w in zip(got, weights)) / sum(weights) == pytest.approx(model_bpw(model), rel=1e-12)
    layers = [dataclasses.asdict(r) for r in got]
    assert report.budget_figure(report.Figures(tmp_path), {"layers": layers}).is_file()
    assert report.budget_figure(report.Figures(tmp_path), {"layers": [r | {"stored_bpw": None} for r in layers]}) is None


def test_a_menu_format_the_layers_cannot_take_is_one_line_naming_the_entry(tiny):
    model, calib = tiny
    cfg = postpass("whiten", 8, budget_bpw=5.0, budget_formats=[{"bits": 8}, {"bits": 3, "granularity": "group", "group_size": 48}])
    with pytest.raises(
        ConfigError,
        match=r"^postpass\.budget_formats\[1\]\.group_size: 48 does not divide the input width 64 .* or postpass\.budget_formats\[1\]\.granularity=channel$",
    ):
        quantize_model(copy.deepcopy(model), calib, QuantScheme(), cfg, progress=False)

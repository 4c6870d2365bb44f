"""``postpass.budget_bpw``: the allocator and the measured curves it reads (``quant/budget.py``)."""

from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch

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


def test_unequal_costs_stay_within_one_segment_of_the_optimum_and_the_budget():
    rng = random.Random(7)
    layers = one_format([Curve(f"l{i}", convex_curve(rng, 4), 4 * 64 * w, 16 * 8 * w, 64 * w) for i, w in enumerate((1, 2, 3, 1, 2))])
    low, high = bounds(layers)
    for frac in (0.2, 0.5, 0.9):
        budget = low + frac * (high - low)
        choices = allocate(layers, budget)
        worst_step = max(menu[0].errors[0] - menu[0].errors[1] for menu in layers)
        assert spent_bpw(layers, choices) <= budget + 1e-12 and error_of(layers, choices) <= brute_force(layers, budget) + worst_step


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

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


def brute_force(curves: list[Curve], budget: float) -> float:
    best = float("inf")
    for ranks in itertools.product(*(range(len(c.errors)) for c in curves)):
        if spent_bpw(curves, list(ranks)) <= budget + 1e-12:
            best = min(best, sum(c.errors[k] for c, k in zip(curves, ranks)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_allocation_is_optimal_on_small_instances_and_within_the_budget(seed):
    """Layers of one shape (equal cost per component) with convex curves: greedy over the hull is the brute-force optimum."""
    rng = random.Random(seed)
    curves = [Curve(f"l{i}", convex_curve(rng, 4), 4 * 64, 16 * 16, 64) for i in range(4)]
    low, high = bounds(curves)
    for budget in (low, low + 0.37 * (high - low), low + 0.81 * (high - low), high):
        ranks = allocate(curves, budget)
        assert spent_bpw(curves, ranks) <= budget + 1e-12
        assert sum(c.errors[k] for c, k in zip(curves, ranks)) == pytest.approx(brute_force(curves, budget), rel=1e-12), (budget, ranks)


def test_unequal_costs_stay_within_one_segment_of_the_optimum_and_the_budget():
    rng = random.Random(7)
    curves = [Curve(f"l{i}", convex_curve(rng, 4), 4 * 64 * w, 16 * 8 * w, 64 * w) for i, w in enumerate((1, 2, 3, 1, 2))]
    low, high = bounds(curves)
    for frac in (0.2, 0.5, 0.9):
        budget = low + frac * (high - low)
        ranks = allocate(curves, budget)
        got = sum(c.errors[k] for c, k in zip(curves, ranks))
        worst_step = max(c.errors[0] - c.errors[1] for c in curves)
        assert spent_bpw(curves, ranks) <= budget + 1e-12 and got <= brute_force(curves, budget) + worst_step


def test_equal_curves_give_every_layer_the_same_rank():
    curve = (1.0, 0.5, 0.3, 0.2, 0.15)
    curves = [Curve(f"l{i}", curve, 1000, 100, 250) for i in range(6)]
    for k in range(5):
        assert allocate(curves, spent_bpw(curves, [k] * 6)) == [k] * 6


def test_a_budget_below_the_codes_and_scales_is_one_line_naming_the_minimum():
    curves = [Curve("l0", (1.0, 0.5), 4 * 64 + 16 * 8, 256, 64)]
    with pytest.raises(
        ConfigError, match=r"postpass\.budget_bpw: 4 bits per weight is below what the codes and scales alone take, 6\.000; use at least 6\.000"
    ):
        allocate(curves, 4.0)


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

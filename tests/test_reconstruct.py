"""Low-rank reconstructors: the properties the papers rely on, on synthetic data."""

from __future__ import annotations

import math

import pytest
import torch

from qaft.quant.calibrate import LayerStats, collect
from qaft.quant.lowrank import Correction, LowRank, quantize_factors
from qaft.quant.reconstructors import RECONSTRUCTORS, l2qer

METHODS = RECONSTRUCTORS.names()
R = {name: RECONSTRUCTORS.create(name) for name in METHODS}  # default options; ASER's smoothing is its prepare step, tested in test_postpass
G = lambda s: torch.Generator().manual_seed(s)  # noqa: E731


def stats_for(x: torch.Tensor, batches: int = 4) -> LayerStats:
    st = LayerStats(x.shape[-1])
    for chunk in x.to(torch.float64).chunk(batches):
        st.update(chunk)
    return st


def outlier_inputs(n: int = 512, d: int = 48, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, d, generator=G(seed), dtype=torch.float64)
    x[:, [3, 17, 30]] *= 40  # a few channels carry large activations, as in LLMs
    return x


def test_registry_holds_the_four_methods():
    assert METHODS == ["aser", "l2qer", "lqer", "whiten"]


def test_plain_svd_error_is_the_tail_of_the_singular_values():
    e = torch.randn(40, 24, generator=G(1), dtype=torch.float64)
    s = torch.linalg.svdvals(e)
    for k in (0, 1, 5, 12, 24):
        c = R["lqer"].reconstruct(e, None, LowRank(k))
        assert c.rank == k
        assert c.kept_energy == pytest.approx(((s[:k] ** 2).sum() / (s**2).sum()).item(), rel=1e-9)
        assert torch.linalg.matrix_norm(e - c.matrix()) ** 2 == pytest.approx((s[k:] ** 2).sum().item(), rel=1e-9)


@pytest.mark.parametrize("randomized", [False, True], ids=["exact", "randomized"])
@pytest.mark.parametrize("name", METHODS)
def test_full_rank_is_exact_and_zero_error_gives_zero_factors(name, randomized):
    x = outlier_inputs()
    st = stats_for(x)
    low_rank_e = torch.randn(30, 6, generator=G(2), dtype=torch.float64) @ torch.randn(6, 48, generator=G(3), dtype=torch.float64)
    c = R[name].reconstruct(low_rank_e, st, LowRank(6, randomized=randomized, oversample=2))
    assert torch.allclose(c.matrix(), low_rank_e, atol=1e-8)
    z = R[name].reconstruct(torch.zeros(30, 48, dtype=torch.float64), st, LowRank(8, randomized=randomized))
    assert torch.equal(z.matrix(), torch.zeros(30, 48, dtype=torch.float64))
    assert R[name].reconstruct(low_rank_e, st, LowRank(0)).matrix().abs().sum() == 0  # rank 0 = plain RTN


def output_error(e: torch.Tensor, c, x: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(x @ (e - c.matrix()).T).item()


@pytest.mark.parametrize("name", METHODS)
def test_error_is_non_increasing_in_rank(name):
    x = outlier_inputs()
    st = stats_for(x)
    e = torch.randn(32, 48, generator=G(4), dtype=torch.float64)
    metric = {
        "lqer": lambda c: torch.linalg.matrix_norm(e - c.matrix()).item(),
        "l2qer": lambda c: torch.linalg.matrix_norm((e - c.matrix()) * l2qer.activation_scale(st)).item(),
        "whiten": lambda c: output_error(e, c, x),
        "aser": lambda c: output_error(e, c, x),  # the whitening SVD on (already smoothed) statistics
    }[name]
    errs = [metric(R[name].reconstruct(e, st, LowRank(k))) for k in range(0, 33, 4)]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errs, errs[1:])), errs


def test_equal_activation_scales_reduce_l2qer_to_lqer():
    st = stats_for(torch.ones(64, 20, dtype=torch.float64) * 3)
    e = torch.randn(16, 20, generator=G(5), dtype=torch.float64)
    assert torch.allclose(R["l2qer"].reconstruct(e, st, LowRank(5)).matrix(), R["lqer"].reconstruct(e, st, LowRank(5)).matrix(), atol=1e-10)


def test_whitening_beats_scaled_and_plain_svd_on_outlier_channels_at_every_rank():
    x = outlier_inputs()
    st = stats_for(x)
    e = torch.randn(32, 48, generator=G(6), dtype=torch.float64) * 0.01
    for k in range(1, 32):
        w, s, p = (output_error(e, R[m].reconstruct(e, st, LowRank(k)), x) for m in ("whiten", "l2qer", "lqer"))
        assert w <= s * (1 + 1e-9) and w <= p * (1 + 1e-9), (k, w, s, p)
        assert s < p  # and activation scaling beats plain SVD on such inputs
    assert output_error(e, R["whiten"].reconstruct(e, st, LowRank(8)), x) < 0.8 * output_error(e, R["lqer"].reconstruct(e, st, LowRank(8)), x)


def test_whitening_survives_a_singular_covariance():
    x = outlier_inputs(n=512)
    x[:, 5] = 0  # a dead channel: XᵀX is singular
    e = torch.randn(8, 48, generator=G(7), dtype=torch.float64)
    c = R["whiten"].reconstruct(e, stats_for(x), LowRank(4))
    assert torch.isfinite(c.A).all() and torch.isfinite(c.B).all()
    # and still the best rank 4 in the output space: ‖(E − AB) Xᵀ‖² is the tail of E Xᵀ's singular values (Eckart–Young;
    # X's dead channel takes nothing away, since every M Xᵀ lies in E Xᵀ's row space); zero factors leave all of it
    s = torch.linalg.svdvals(e @ x.T)
    achieved = torch.linalg.matrix_norm((e - c.matrix()) @ x.T) ** 2
    assert achieved.item() == pytest.approx((s[4:] ** 2).sum().item(), rel=1e-6)


def test_hook_statistics_match_a_direct_computation():
    lin = torch.nn.Linear(12, 5)
    batches = [torch.randn(3, 7, 12, generator=G(i)) for i in range(4)]
    with collect({"l": lin}) as stats:
        for b in batches:
            lin(b)
    st = stats["l"]
    flat = torch.cat([b.reshape(-1, 12) for b in batches]).double()
    assert st.n_tokens == 84
    assert torch.allclose(st.xtx, flat.T @ flat)
    assert torch.allclose(st.abs_max, flat.abs().amax(0))
    assert torch.allclose(st.abs_mean_max, torch.stack([b.reshape(-1, 12).double().abs().mean(0) for b in batches]).amax(0))
    assert lin._forward_pre_hooks == {}  # hooks removed


@pytest.mark.parametrize("name", METHODS)
def test_randomized_svd_is_close_to_exact_and_leaves_the_global_rng_alone(name):
    x = outlier_inputs()
    st = stats_for(x)
    u = torch.linalg.qr(torch.randn(64, 48, generator=G(8), dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(48, 48, generator=G(9), dtype=torch.float64))[0]
    e = u @ torch.diag(torch.logspace(0, -3, 48, dtype=torch.float64)) @ v.T  # decaying spectrum, like real errors
    rng = torch.get_rng_state()
    fast = R[name].reconstruct(e, st, LowRank(8, randomized=True))
    assert torch.equal(torch.get_rng_state(), rng)
    exact = R[name].reconstruct(e, st, LowRank(8))
    assert output_error(e, fast, x) <= output_error(e, exact, x) * 1.01


@pytest.mark.parametrize("randomized", [False, True], ids=["exact", "randomized"])
def test_energy_threshold_picks_the_smallest_rank_that_keeps_it(randomized):
    u = torch.linalg.qr(torch.randn(64, 48, generator=G(10), dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(48, 48, generator=G(11), dtype=torch.float64))[0]
    s = torch.logspace(0, -2, 48, dtype=torch.float64)
    e = u @ torch.diag(s) @ v.T
    share = torch.cumsum(s**2, 0) / (s**2).sum()
    for target in (0.5, 0.9, 0.99):
        want = int((share < target).sum()) + 1
        c = R["lqer"].reconstruct(e, None, LowRank(40, randomized=randomized, energy=target))
        assert c.rank == min(want, 40) and c.kept_energy >= target - 1e-9
    assert R["lqer"].reconstruct(e, None, LowRank(3, energy=0.99)).rank == 3  # the cap wins


def _low_rank_with_decay(seed: int = 0, out: int = 40, inp: int = 56, k: int = 12):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, k, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -3, k, dtype=torch.float64)  # three decades of σ: the case balancing is for
    return Correction(u * s, v.T)


def _stored_step(amax: float, codes: int, bits: int) -> float:
    """``amax / codes`` rounded to ``bits`` significant bits: to the nearest, or up where the nearest would put
    ``amax`` past the last code (``grid.stored_scale``, written out here)."""
    raw = amax / codes
    mantissa, exp = math.frexp(raw)  # raw = mantissa · 2^exp, mantissa in [0.5, 1)
    near, up = (f(mantissa * 2**bits) * 2.0 ** (exp - bits) for f in (round, math.ceil))
    return near if amax / near < codes + 0.5 else up


def test_int8_factors_sit_on_a_per_row_grid_and_keep_the_product():
    c = _low_rank_with_decay()
    q = quantize_factors(c, 8)
    for m in (q.A, q.B):  # the step: max|row| / 127 rounded to fp16's 11 significant bits less the codes' 7
        step = torch.tensor([[_stored_step(row.abs().max().item(), 127, 4)] for row in m])
        codes = m / step
        assert torch.allclose(codes, codes.round(), atol=1e-6) and codes.abs().max() <= 127 + 1e-6
    rel = lambda x: ((c.matrix() - x.matrix()).norm() / c.matrix().norm()).item()  # noqa: E731
    assert rel(q) < 1e-2
    assert rel(q) < rel(quantize_factors(c, 4))  # more bits, less error
    # balancing matters: quantizing the unbalanced A = UΣ row-wise loses the small components
    from qaft.quant.grid import quantize_weight
    from qaft.quant.scheme import Granularity, WeightQuant

    spec = WeightQuant(bits=8, granularity=Granularity.CHANNEL)
    naive = Correction(quantize_weight(c.A, spec).dequant, quantize_weight(c.B, spec).dequant)
    assert rel(q) < rel(naive)


def test_factor_quantization_passes_rank_zero_through():
    c = Correction(torch.zeros(5, 0), torch.zeros(0, 7))
    assert quantize_factors(c, 8) is c

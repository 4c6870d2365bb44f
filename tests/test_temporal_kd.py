"""Temporal distillation: Conv-LSTM shapes and gradients, snapshot ring and order, snapshot features, exact resume."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_resume_is_exact, events
from qaft.callbacks import CALLBACKS
from qaft.callbacks.convlstm import ConvLSTMForecaster
from qaft.callbacks.temporal_kd import energy, increments
from qaft.core.errors import ConfigError, PreflightError
from qaft.trainer.loop import fit, setup


def with_tkd(make_cfg, *overrides: str, **options):
    cfg = make_cfg("training.logging_steps=1", *overrides)
    spec = CALLBACKS.convert({"name": "temporal_kd", "phase_steps": 2, "review_every": 2, "layers": [0, -1], **options}, "callbacks", [])
    return cfg.__class__(**{**cfg.__dict__, "callbacks": (spec,)})


def test_convlstm_shapes_and_every_parameter_including_peepholes_gets_gradients():
    net = ConvLSTMForecaster(channels=2, hidden=5, kernel=3)
    seq = torch.rand(4, 3, 2, 17)  # [batch, time K, channels, tokens]
    out = net(seq)
    assert out.shape == (4, 2, 17) and (out >= 0).all()
    out.sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert {n for n, _ in net.named_parameters() if "peep" in n} == {f"{c}.peep_{g}" for c in ("encoder", "forecaster") for g in "ifo"}


def test_increments_are_consecutive_differences_oldest_first():
    a1, a2, a3, cur = (torch.full((1, 1, 4), v) for v in (1.0, 3.0, 8.0, 4.0))
    seq = increments([a1, a2, a3], cur)
    assert seq.shape == (1, 3, 1, 4)
    assert seq[0, :, 0, 0].tolist() == [2.0, 5.0, 4.0]  # |A1-A2|, |A2-A3|, |A3-Ac|
    assert increments([a1], cur)[0, :, 0, 0].tolist() == [3.0]


def test_energy_is_per_token_mean_square_normalised_per_sequence():
    h = torch.randn(2, 7, 16)
    e = energy(h)
    assert e.shape == (2, 7) and torch.allclose(e.norm(dim=-1), torch.ones(2))
    assert torch.allclose(e[0] / e[0, 0], h[0].pow(2).mean(-1) / h[0, 0].pow(2).mean())


def test_ring_keeps_exactly_k_snapshots_taken_at_phase_boundaries(make_cfg, tmp_path):
    cfg = with_tkd(make_cfg, "training.max_steps=9", "training.save_steps=0", f"training.output_dir={tmp_path}", history=2)
    s = setup(cfg)
    from qaft.trainer.loop import train
    from qaft.trainer.metrics import MetricsLogger

    log = MetricsLogger(s.ctx.accelerator, cfg.training.output_dir, start_step=0, total_steps=9, append=False)
    train(s.ctx, s.cfg, s.callbacks, s.loaders, s.scheduler, log)
    log.close()
    (cb,) = s.callbacks.callbacks
    assert [snap["__step__"] for snap in cb.ring] == [6, 8]  # boundaries 2, 4, 6, 8; the ring keeps the newest K=2, oldest first
    assert [r["temporal_kd/snapshots"] for r in events(tmp_path, "train")] == [0, 0, 1, 1, 2, 2, 2, 2, 2]


def test_history_features_are_those_of_a_model_holding_the_snapshots_adapter(make_cfg, tmp_path):
    cfg = with_tkd(make_cfg, "training.max_steps=1", f"training.output_dir={tmp_path}", history=1)
    s = setup(cfg)
    (cb,) = s.callbacks.callbacks
    cb.on_train_begin(s.ctx)
    model = s.ctx.accelerator.unwrap_model(s.ctx.model)
    snap = {n: torch.randn_like(p) * 0.05 for n, p in model.named_parameters() if p.requires_grad}
    cb.ring.append({**snap, "__step__": 2})
    ids = s.ctx.probe_blocks[:2]
    (hist,) = cb._history_features(s.ctx, ids)
    live = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    blocks = model.base_model.model.model.layers

    def layer_energies() -> torch.Tensor:  # decoder-layer outputs (before the final norm), by plain forward hooks
        seen = {}
        hooks = [blocks[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out[0] if isinstance(out, tuple) else out)) for i in (0, 1)]
        with torch.no_grad():
            model.eval()
            model(input_ids=ids)
            model.train()
        for h in hooks:
            h.remove()
        return torch.stack([energy(seen[0]), energy(seen[1])], dim=1)

    with torch.no_grad():  # the reference: a model that really holds the snapshot's adapter
        for n, p in model.named_parameters():
            if n in snap:
                p.copy_(snap[n])
    expect = layer_energies()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in live:
                p.copy_(live[n])
    assert torch.allclose(hist, expect, atol=1e-6)
    assert not torch.allclose(hist, layer_energies(), atol=1e-6)  # not the live adapter's features
    assert all(torch.equal(p, live[n]) for n, p in model.named_parameters() if n in live)
    cb.on_train_end(s.ctx)


def test_resume_with_temporal_kd_active_is_exact(make_cfg, monkeypatch, tmp_path):
    run = lambda out, *extra: with_tkd(make_cfg, "training.max_steps=8", "training.save_steps=4", f"training.output_dir={out}", *extra)  # noqa: E731
    rows = assert_resume_is_exact(run, monkeypatch, tmp_path, 4, volatile=("temporal_kd/extra_s",))
    assert any("loss/temporal_kd/mse" in r for r in rows) and all("loss/temporal_kd/kl" in r for r in rows)


def test_bad_inputs_are_clear_errors(make_cfg, smoke_raw):
    from qaft.pipeline.config import config_from_dict

    with pytest.raises(ConfigError, match=r"history: got 0"):
        config_from_dict({**smoke_raw, "callbacks": [{"name": "temporal_kd", "history": 0}]}, [])
    with pytest.raises(PreflightError, match=r"layers: \[5\] out of range for a model with 2 decoder layers"):
        fit(with_tkd(make_cfg, "training.max_steps=1", layers=[5]))


def test_a_teacher_needs_a_frozen_base():
    from qaft.callbacks import create
    from qaft.callbacks.temporal_kd import TemporalKDOptions
    from qaft.core.registry import Spec

    cb = create(Spec("temporal_kd", TemporalKDOptions()), seed=0, rank=0)
    plain = torch.nn.Linear(2, 2)
    ctx = type("Ctx", (), {"accelerator": type("Acc", (), {"unwrap_model": staticmethod(lambda m: m)})(), "model": plain})()
    with pytest.raises(PreflightError, match="teacher is the frozen base"):
        cb.on_train_begin(ctx)


def test_the_teacher_pass_leaves_requires_grad_flags_alone(make_cfg, tmp_path):
    from qaft.callbacks.temporal_kd import adapters_off

    s = setup(with_tkd(make_cfg, "training.max_steps=1", f"training.output_dir={tmp_path}"))
    model = s.ctx.accelerator.unwrap_model(s.ctx.model)
    frozen = next(p for n, p in model.named_parameters() if "lora_B" in n)
    frozen.requires_grad_(False)  # as MAT does for a fully gated tensor
    with adapters_off(model):
        pass
    assert not frozen.requires_grad  # peft's own re-enable would have set it back to True


def test_every_callback_together_trains_and_logs(make_cfg, tmp_path):
    cfg = make_cfg("training.max_steps=8", "training.save_steps=4", "training.logging_steps=1", f"training.output_dir={tmp_path}")
    specs = [
        {"name": "npft", "ratio": 0.01, "calib_windows": 2, "hessian_probes": 2},
        {"name": "mat", "warmup_steps": 2, "interval": 3, "probe_samples": 4},
        {"name": "temporal_kd", "phase_steps": 2, "review_every": 2},
        {"name": "telemetry", "every": 2},
    ]
    fit(cfg.__class__(**{**cfg.__dict__, "callbacks": tuple(CALLBACKS.convert(x, "callbacks", []) for x in specs)}))
    keys = set().union(*events(tmp_path, "train"))
    assert {"npft/hessian_trace_end", "mat/active_fraction", "loss/temporal_kd/mse", "telemetry/update_ratio"} <= keys


def test_the_forecast_loss_falls_as_the_conv_lstm_and_the_student_learn_the_gap(make_cfg, tmp_path):
    """Not only logged: over the review steps of a short run (every phase a review, one step per phase) the forecast
    term ``mse`` falls to under half its start, the Conv-LSTM and the student fitting the gap together."""
    cfg = with_tkd(
        make_cfg,
        "training.max_steps=16",
        "training.save_steps=0",
        f"training.output_dir={tmp_path / 'on'}",
        phase_steps=1,
        review_every=1,
        history=2,
        lr=1e-2,
        kl_weight=0.0,
    )
    fit(cfg)
    mse = [r["loss/temporal_kd/mse"] for r in events(tmp_path / "on", "train") if "loss/temporal_kd/mse" in r]
    assert len(mse) >= 12 and sum(mse[-4:]) < 0.5 * sum(mse[:4]), mse

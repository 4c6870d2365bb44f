"""MAT: λmax is the Gram top eigenvalue, head slices are exact under GQA, gated heads do not move at all, resume is exact."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_resume_is_exact, events
from qaft.callbacks import CALLBACKS
from qaft.callbacks.mat import Grads, head_modules, lambda_max, per_sample_grads
from qaft.core.errors import ConfigError, PreflightError
from qaft.core.model import ModelConfig, load_model_and_tokenizer
from qaft.trainer.config import LoraSection
from qaft.trainer.loop import fit, setup, train
from qaft.trainer.lora import attach_lora
from qaft.trainer.metrics import MetricsLogger


def lora_model(name: str = "tiny-llama"):
    model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=name))
    model = attach_lora(model, LoraSection(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():  # lora_B starts at zero: give it values so every gradient is informative
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    return model.eval()


def with_mat(make_cfg, *overrides: str, **options):
    cfg = make_cfg("training.logging_steps=1", *overrides)
    spec = CALLBACKS.convert({"name": "mat", "probe_samples": 4, "heatmap": False, **options}, "callbacks", [])
    return cfg.__class__(**{**cfg.__dict__, "callbacks": (spec,)})


def test_gqa_slices_touch_exactly_their_rows_and_columns():
    model = lora_model()
    mods = head_modules(model)
    c = model.config
    d = c.hidden_size // c.num_attention_heads
    assert [m.kind for m in mods].count("q") == c.num_hidden_layers * c.num_attention_heads
    assert [m.kind for m in mods].count("kv") == c.num_hidden_layers * c.num_key_value_heads
    for m in mods:
        for s in m.slices:
            probe = torch.zeros_like(s.param)
            s.of(probe).fill_(1)
            rows, cols = probe.nonzero(as_tuple=True)
            span = rows if s.dim == 0 else cols
            assert span.min() == m.index * d and span.max() == (m.index + 1) * d - 1 and probe.sum() == d * probe.shape[1 - s.dim]
    q = [m for m in mods if m.kind == "q" and m.layer == 0]
    assert {tuple(sorted(x.param.shape)) for x in q[0].slices} == {(4, 64)}  # q lora_B [64, 4] rows + o lora_A [4, 64] columns


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_lambda_max_is_the_top_eigenvalue_of_the_explicit_jacobian_product(name):
    model = lora_model(name)
    mods = head_modules(model)
    x = torch.randint(0, 257, (4, 16), generator=torch.Generator().manual_seed(0))
    params = list({id(s.param): s.param for m in mods for s in m.slices}.values())
    lam = lambda_max(mods, {id(p): g for p, g in zip(params, per_sample_grads(model, x, params, Grads.LOOP))})
    names = {id(p): n for n, p in model.named_parameters()}
    for i in (0, 5, len(mods) - 1):  # a query head, a kv group, the last module
        m = mods[i]
        own = list({id(s.param): s.param for s in m.slices}.values())

        def losses(*tensors, own=own):  # every probe sample's loss as a function of the module's whole tensors
            swap = {names[id(p)]: t for p, t in zip(own, tensors)}
            return torch.stack([torch.func.functional_call(model, swap, (), {"input_ids": xi[None], "labels": xi[None]}).loss for xi in x])

        jac = torch.autograd.functional.jacobian(losses, tuple(p.detach() for p in own))  # [n, *shape] per tensor
        blocks = []
        for s in m.slices:
            j = jac[next(k for k, p in enumerate(own) if p is s.param)]
            blocks.append((j[:, s.start : s.start + s.length, :] if s.dim == 0 else j[:, :, s.start : s.start + s.length]).reshape(len(x), -1))
        jm = torch.cat(blocks, 1).double()
        exact = torch.linalg.eigvalsh(jm @ jm.T)[-1]
        assert torch.allclose(lam[i], exact, rtol=1e-4, atol=1e-9), (i, lam[i], exact)


def test_loop_and_torch_func_per_sample_gradients_agree():
    model = lora_model()
    params = list({id(s.param): s.param for m in head_modules(model) for s in m.slices}.values())
    x = torch.randint(0, 257, (3, 12), generator=torch.Generator().manual_seed(1))
    for a, b in zip(per_sample_grads(model, x, params, Grads.LOOP), per_sample_grads(model, x, params, Grads.FUNC)):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_lambda_max_under_bf16_autocast_is_the_float32_one_within_bf16_precision():
    """Per-sample gradients run under the training forward's autocast (bf16 matmuls); the Gram matrix and its
    eigenvalue are float64. The head ranking MAT gates on must survive that: λmax within 3%."""
    model = lora_model()
    modules = head_modules(model)
    params = list({id(s.param): s.param for m in modules for s in m.slices}.values())
    x = torch.randint(0, 257, (4, 16), generator=torch.Generator().manual_seed(1))

    def lam(bf16: bool) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            g = per_sample_grads(model, x, params, Grads.LOOP)
        return lambda_max(modules, {id(p): t for p, t in zip(params, g)})

    fp32, bf16 = lam(False), lam(True)
    assert fp32.dtype == bf16.dtype == torch.float64
    torch.testing.assert_close(bf16, fp32, rtol=0.03, atol=0.0)
    assert not torch.equal(bf16, fp32)  # the autocast really ran in bf16


def test_gated_heads_parameters_and_adamw_moments_do_not_change(make_cfg):
    cfg = with_mat(
        make_cfg,
        "training.max_steps=1",
        "training.weight_decay=0.1",
        "training.save_steps=0",
        "training.eval_steps=null",
        "lora.lora_dropout=0.0",
        warmup_steps=0,
        interval=100,
        mode="quantile",
        alpha=0.5,
    )
    s = setup(cfg)
    (cb,) = s.callbacks.callbacks
    log = MetricsLogger(s.ctx.accelerator, cfg.training.output_dir, start_step=0, total_steps=3, append=False)
    train(s.ctx, s.cfg, s.callbacks, s.loaders, s.scheduler, log)  # step 1: gating decided at step 0, optimizer state born
    assert 0 < cb.active.sum() < len(cb.active)
    opt_state = getattr(s.ctx.optimizer, "optimizer", s.ctx.optimizer).state
    gated = [(m, sl) for m, on in zip(cb.modules, cb.active.tolist()) if not on for sl in m.slices]
    live = [(m, sl) for m, on in zip(cb.modules, cb.active.tolist()) if on for sl in m.slices]
    snap = lambda pairs: [
        (
            sl.of(sl.param.data).clone(),
            {
                k: sl.of(v).clone()
                for k, v in opt_state.get(sl.param, {}).items()  # noqa: E731
                if torch.is_tensor(v) and v.shape == sl.param.shape
            },
        )
        for _, sl in pairs
    ]
    before_gated, before_live = snap(gated), snap(live)
    s.ctx.state.max_steps = 3
    train(s.ctx, s.cfg, s.callbacks, s.loaders, s.scheduler, log)  # steps 2-3 with gating and live moments
    log.close()
    for (value, moments), (after_value, after_moments) in zip(before_gated, snap(gated)):
        assert torch.equal(value, after_value)
        assert moments.keys() == after_moments.keys() and all(torch.equal(moments[k], after_moments[k]) for k in moments)
    assert sum(not torch.equal(a[0], b[0]) for a, b in zip(before_live, snap(live))) > len(live) // 2


def test_resume_with_mat_active_is_exact(make_cfg, monkeypatch, tmp_path):
    opts = {"warmup_steps": 2, "interval": 3}
    run = lambda out, *extra: with_mat(make_cfg, "training.max_steps=8", "training.save_steps=4", f"training.output_dir={out}", *extra, **opts)  # noqa: E731
    rows = assert_resume_is_exact(run, monkeypatch, tmp_path, 4, volatile=("mat/lambda_seconds",))
    fractions = [r["mat/active_fraction"] for r in rows]
    assert fractions[:2] == [1.0, 1.0] and min(fractions) < 1.0


def test_heatmap_and_logs_are_written(make_cfg, tmp_path):
    pytest.importorskip("matplotlib")
    cfg = with_mat(make_cfg, "training.max_steps=6", "training.save_steps=0", f"training.output_dir={tmp_path}", warmup_steps=1, interval=2, heatmap=True)
    fit(cfg)
    rows = events(tmp_path, "train")
    assert all("mat/active_fraction" in r for r in rows) and any("mat/lambda_max" in r for r in rows)
    assert (tmp_path / "mat_lambda.png").stat().st_size > 1000 and (tmp_path / "mat_lambda.json").is_file()


def test_unsliceable_attention_is_refused_naming_the_class():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(PreflightError, match="GPT2Attention"):
        head_modules(model)


def test_bad_options_are_config_errors(smoke_raw):
    from qaft.pipeline.config import config_from_dict

    with pytest.raises(ConfigError, match=r"alpha: got 1.5, expected a quantile"):
        config_from_dict({**smoke_raw, "callbacks": [{"name": "mat", "mode": "quantile", "alpha": 1.5}]}, [])
    with pytest.raises(ConfigError, match=r"probe_samples"):
        config_from_dict({**smoke_raw, "callbacks": [{"name": "mat", "probe_samples": 1}]}, [])

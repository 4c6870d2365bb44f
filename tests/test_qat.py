"""QAT: the straight-through gradient, LoftQ against our grid, RTN of final/ = the trained forward, exact resume."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_resume_is_exact, events, postpass
from qaft.callbacks import CALLBACKS
from qaft.callbacks.qat import QAT, ste_activation
from qaft.core.errors import ConfigError
from qaft.core.model import ModelConfig, load_model_and_tokenizer
from qaft.quant.grid import fake_quant_activation, quantize_weight
from qaft.quant.loftq import loftq, loftq_base
from qaft.quant.postpass import quantize_model
from qaft.quant.scheme import ActQuant, GGUFType, Granularity, QuantScheme, WeightFormat, WeightQuant
from qaft.trainer.loop import fit

W4 = WeightQuant(bits=4)
SCHEMES = {
    "W4": [],
    "W3 g32 asym A8": [
        "quant.weight.bits=3",
        "quant.weight.granularity=group",
        "quant.weight.group_size=32",
        "quant.weight.symmetric=false",
        "quant.activation.bits=8",
    ],
    "MXINT4": ["quant.weight.format=mxint", "quant.weight.granularity=group", "quant.weight.group_size=16"],
    "GGUF Q4_1": ["quant.weight.format=gguf", "quant.weight.gguf_type=Q4_1"],
}


def with_qat(make_cfg, *overrides: str, **options):
    cfg = make_cfg("training.max_steps=6", "training.save_steps=3", "training.logging_steps=1", *overrides)
    spec = CALLBACKS.convert({"name": "qat", **options}, "callbacks", [])
    return cfg.__class__(**{**cfg.__dict__, "callbacks": (spec,)})


def lora_linear(out=24, inp=32, r=4, alpha=8, seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(inp, out))
    model = get_peft_model(net, LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], lora_dropout=0.0))
    layer = model.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)  # non-zero B: both factors get gradients
    return layer


@pytest.mark.parametrize("act_bits", [None, 8])
def test_adapter_gradient_is_the_straight_through_gradient_of_the_merged_weight(act_bits):
    """Our cheap gradient path equals autograd through ``W' + (Q(W') − W').detach()`` (identity STE)."""
    from qaft.callbacks.qat import _lora_forward

    layer = lora_linear()
    scheme = QuantScheme(activation=ActQuant(bits=act_bits))
    x = torch.randn(5, 7, 32)
    target = torch.randn(5, 7, 24)
    _, patched = _lora_forward(layer, scheme)
    F.mse_loss(patched(x), target).backward()
    ours = [layer.lora_A["default"].weight.grad.clone(), layer.lora_B["default"].weight.grad.clone()]
    for p in layer.parameters():
        p.grad = None

    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    merged = layer.base_layer.weight + s * (B @ A)
    wq = merged + (quantize_weight(merged.detach(), W4).dequant - merged).detach()
    xq = x if act_bits is None else x + (fake_quant_activation(x, ActQuant(bits=act_bits)) - x).detach()
    F.mse_loss(F.linear(xq, wq, layer.base_layer.bias), target).backward()
    torch.testing.assert_close(ours[0], A.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours[1], B.grad, rtol=1e-5, atol=1e-7)
    assert ours[0].abs().sum() > 0 and ours[1].abs().sum() > 0


def test_forward_is_the_rtn_layer_and_input_gradient_passes_straight_through():
    from qaft.callbacks.qat import _lora_forward

    layer = lora_linear()
    scheme = QuantScheme(activation=ActQuant(bits=8))
    x = torch.randn(3, 32, requires_grad=True)
    _, patched = _lora_forward(layer, scheme)
    y = patched(x)
    with torch.no_grad():
        merged = layer.base_layer.weight + layer.get_delta_weight("default")
        expect = F.linear(fake_quant_activation(x, scheme.activation), quantize_weight(merged, W4).dequant, layer.base_layer.bias)
    assert torch.equal(y, expect)
    assert not torch.equal(y, layer(x))  # peft's float forward differs: the layer really is quantized
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ quantize_weight(merged, W4).dequant)  # ∂Q_a/∂x = identity


def test_ste_activation_is_identity_in_the_backward_even_for_clipped_tokens():
    x = torch.tensor([[0.1, -3.0, 2.0, 0.0]], requires_grad=True)
    y = ste_activation(x, ActQuant(bits=2))  # 2 bits: one level each side, most values round away
    assert torch.equal(y.detach(), fake_quant_activation(x.detach(), ActQuant(bits=2)))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize(
    "spec",
    [
        W4,
        WeightQuant(bits=3, granularity=Granularity.GROUP, group_size=16, symmetric=False),
        WeightQuant(bits=4, format=WeightFormat.MXINT, granularity=Granularity.GROUP, group_size=16),
        WeightQuant(format=WeightFormat.GGUF, gguf_type=GGUFType.Q4_0),
    ],
    ids=["W4", "W3g16asym", "MXINT4", "GGUF-Q4_0"],
)
@pytest.mark.parametrize("scaling", [1.0, 2.0, 0.25])
def test_loftq_residual_is_below_rtn_every_iteration(spec, scaling):
    torch.manual_seed(0)
    w = torch.randn(48, 64) * torch.linspace(0.2, 3.0, 64)  # uneven column scales, like a real layer
    r = loftq(w, spec, rank=8, scaling=scaling, iters=4)
    assert len(r.residuals) == 4
    assert all(res < r.rtn_residual for res in r.residuals), (r.residuals, r.rtn_residual)
    assert torch.equal(loftq_base(w, spec, r.shift, scaling), r.base)  # what a resume rebuilds the base from
    if spec.format is WeightFormat.INT:
        # the base sits on its own grid (re-deriving an asymmetric scale/zero from grid points may move them by an ulp).
        # Not for MXINT: a block whose max rounds to code -2^(b-1) has |max| = 2X and re-quantizes one exponent up.
        torch.testing.assert_close(quantize_weight(r.base, spec).dequant, r.base, rtol=1e-6, atol=1e-6)
    final = torch.linalg.matrix_norm(w - r.base - scaling * (r.lora_B @ r.lora_A))
    assert final.item() == pytest.approx(r.residuals[-1], rel=1e-4)  # scaling is accounted for


def test_loftq_first_iteration_removes_the_top_singular_values_of_the_rtn_error():
    torch.manual_seed(1)
    w = torch.randn(40, 32)
    err = w - quantize_weight(w, W4).dequant
    S = torch.linalg.svdvals(err)
    r = loftq(w, W4, rank=5, scaling=2.0, iters=1)
    assert r.residuals[0] == pytest.approx(S[5:].square().sum().sqrt().item(), rel=1e-4)
    assert r.rtn_residual == pytest.approx(S.square().sum().sqrt().item(), rel=1e-5)


def test_loftq_factors_match_peft_split_when_scaling_is_one():
    """peft's LoftQ needs bitsandbytes + CUDA; the part it shares with ours (the √S split of the SVD) must agree."""
    from peft.utils.loftq_utils import _low_rank_decomposition

    torch.manual_seed(2)
    w = torch.randn(32, 24)
    r = loftq(w, W4, rank=6, scaling=1.0, iters=1)
    peft = _low_rank_decomposition(w - quantize_weight(w, W4).dequant, reduced_rank=6)
    torch.testing.assert_close(r.lora_B, peft["L"][:, :6], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r.lora_A, peft["R"][:6], rtol=1e-5, atol=1e-6)


def _record_qat_logits(monkeypatch, ids: torch.Tensor) -> dict:
    """Logits of the model as trained (QAT forward still on), taken just before QAT restores the float forwards."""
    seen = {}
    original = QAT.on_train_end

    def spy(self, ctx):
        model = ctx.accelerator.unwrap_model(ctx.model)
        model.eval()
        with torch.no_grad():
            seen["qat"] = model(input_ids=ids).logits
            with model.disable_adapter():
                seen["float_base"] = model(input_ids=ids).logits
        original(self, ctx)

    monkeypatch.setattr(QAT, "on_train_end", spy)
    return seen


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("init", ["zero", "loftq"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_rtn_of_final_reproduces_the_training_time_quantized_logits(make_cfg, monkeypatch, tmp_path, scheme, init, bf16):
    """Bit for bit, in float32 and under bf16 autocast alike: the grid QAT trains against is the float32 merge's
    (B·A under autocast would be bf16 and move weights across rounding boundaries), only the matmuls are bf16."""
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    seen = _record_qat_logits(monkeypatch, ids)
    cfg = with_qat(make_cfg, f"training.output_dir={tmp_path}", f"training.bf16={str(bf16).lower()}", *SCHEMES[scheme], init=init, iters=2)
    final = fit(cfg)
    model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(final)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        float_final = model(input_ids=ids).logits.float()
        quantize_model(model, ids[:1], cfg.quant, postpass(None, 0), progress=False)
        rtn_final = model(input_ids=ids).logits.float()  # accelerate hands the trained forward's logits back in float32
    assert torch.equal(rtn_final, seen["qat"])
    assert not torch.allclose(float_final, seen["qat"], atol=1e-4)  # the trained forward was quantized
    if init == "zero":
        assert not torch.allclose(seen["float_base"], seen["qat"], atol=1e-4)  # adapters off = the float original


def test_qat_trains_toward_what_survives_rounding(make_cfg, tmp_path):
    """The eval loss reported during QAT is the quantized model's: the last one equals the loss of the RTN model
    rebuilt from ``final/`` with the post-pass's own code, and it falls over training (W3 g32 asym A8, tiny model;
    that QAT then beats plain LoRA after rounding is measured on SmolLM2 in docs/methods/qat.md, not claimed here)."""
    from qaft.trainer.loop import evaluate, setup

    scheme = SCHEMES["W3 g32 asym A8"]
    common = (
        "training.max_steps=12",
        "training.eval_steps=6",
        "training.eval_on_start=true",
        "training.learning_rate=1e-2",
        "training.bf16=false",
        *scheme,
    )  # evaluate() below is float32
    cfg = with_qat(make_cfg, f"training.output_dir={tmp_path / 'qat'}", *common)
    fit(cfg)
    evals = [r["eval_loss"] for r in events(tmp_path / "qat", "eval")]
    assert evals[-1] < evals[0]
    model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(tmp_path / "qat" / "final")))
    plain = make_cfg(f"training.output_dir={tmp_path / 'eval'}", "callbacks=[]", *scheme)  # the same data, for its eval blocks
    s = setup(plain)
    quantize_model(model, s.loaders.train.dataset.blocks[:2], cfg.quant, postpass(None, 0), progress=False)
    rtn = evaluate(dataclasses.replace(s.ctx, model=model), s.loaders.eval)["eval_loss"]
    assert rtn == pytest.approx(evals[-1], rel=1e-4)  # what QAT logged is the deployed (RTN) model's loss


def test_start_step_trains_plain_lora_until_then(make_cfg, tmp_path):
    plain = make_cfg("training.max_steps=4", "training.logging_steps=1", "training.save_steps=0", f"training.output_dir={tmp_path / 'plain'}", "callbacks=[]")
    fit(plain)
    fit(with_qat(make_cfg, "training.max_steps=4", "training.save_steps=0", f"training.output_dir={tmp_path / 'qat'}", start_step=2))
    p, q = events(tmp_path / "plain", "train"), events(tmp_path / "qat", "train")
    assert [r["qat/active"] for r in q] == [0.0, 0.0, 1.0, 1.0]
    assert [r["loss"] for r in p[:2]] == [r["loss"] for r in q[:2]]
    assert p[2]["loss"] != q[2]["loss"]


@pytest.mark.parametrize("init", ["zero", "loftq"])
def test_resume_with_qat_is_exact(make_cfg, monkeypatch, tmp_path, init):
    run = lambda out, *extra: with_qat(make_cfg, "training.max_steps=6", "training.save_steps=3", f"training.output_dir={out}", *extra, init=init)  # noqa: E731
    rows = assert_resume_is_exact(run, monkeypatch, tmp_path, 3)
    if init == "loftq":
        assert 0 < rows[0]["qat/loftq_residual_vs_rtn_iter1"] < 1


def test_loftq_init_starts_near_the_original_model(make_cfg, tmp_path):
    """At step 0 the float merged model is W_b + s·B₀A₀ ≈ W: closer to the original logits than RTN."""
    from qaft.trainer.loop import setup

    cfg = with_qat(make_cfg, f"training.output_dir={tmp_path}", init="loftq", iters=3)
    s = setup(cfg)
    model = s.ctx.accelerator.unwrap_model(s.ctx.model)
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        original = model(input_ids=ids).logits
        (cb,) = s.callbacks.callbacks
        cb.modules = cb._targets(s.ctx)
        cb._loftq(s.ctx)
        loftq_merged = model(input_ids=ids).logits  # forward not patched yet: peft's float base + adapter
    rtn_model, _ = load_model_and_tokenizer(cfg.model)
    with torch.no_grad():
        quantize_model(rtn_model, ids[:1], cfg.quant, postpass(None, 0), progress=False)
        rtn_logits = rtn_model(input_ids=ids).logits
    assert (loftq_merged - original).norm() < (rtn_logits - original).norm()


def test_qat_with_npft_is_refused(make_cfg):
    with pytest.raises(ConfigError, match=r"callbacks: qat cannot be combined with npft: both redefine the base weight"):
        make_cfg("callbacks=[{name: qat}, {name: npft}]")
    with pytest.raises(ConfigError, match=r"cannot be combined"):
        make_cfg("callbacks=[{name: npft}, {name: qat}]")


def test_unknown_init_is_a_config_error(make_cfg):
    with pytest.raises(ConfigError, match=r"init: got 'gptq'"):
        make_cfg("callbacks=[{name: qat, init: gptq}]")

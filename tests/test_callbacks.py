"""The callback protocol: a contract suite run over every registered callback, plus event order and effects."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from helpers import adapter_tensors, assert_same_tensors
from qaft import callbacks as cbs
from qaft.callbacks import CALLBACKS, create
from qaft.callbacks.base import Callback
from qaft.core.errors import CheckpointError, ConfigError
from qaft.core.registry import Spec
from qaft.core.typed import to_plain
from qaft.trainer.loop import fit

BUILTIN = CALLBACKS.names()  # captured before any test registers a helper callback


def with_callbacks(make_cfg, specs: list[dict], *overrides: str):
    cfg = make_cfg("training.max_steps=6", "training.save_steps=3", "training.logging_steps=1", *overrides)
    return cfg.__class__(**{**cfg.__dict__, "callbacks": tuple(CALLBACKS.convert(s, "callbacks", []) for s in specs)})


# ---- contract suite: every registered callback -------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN)
def test_neutral_options_leave_training_bit_identical(make_cfg, tmp_path, name):
    cls = CALLBACKS.get(name)
    spec = {"name": name, **to_plain(cls.neutral_options())}
    plain = with_callbacks(make_cfg, [], f"training.output_dir={tmp_path / 'plain'}")
    withcb = with_callbacks(make_cfg, [spec], f"training.output_dir={tmp_path / 'with'}")
    fit(plain)
    fit(withcb)
    assert_same_tensors(adapter_tensors(tmp_path / "plain"), adapter_tensors(tmp_path / "with"))


@pytest.mark.parametrize("name", BUILTIN)
def test_state_round_trip_restores_the_generator_and_everything_else(name):
    cls = CALLBACKS.get(name)
    a = create(Spec(name, cls.neutral_options()), seed=3, rank=0)
    torch.rand(5, generator=a.generator)
    state = a.state_dict()
    expect = torch.rand(5, generator=a.generator)
    b = create(Spec(name, cls.neutral_options()), seed=99, rank=1)
    b.load_state_dict(state)
    restored = b.state_dict()
    assert type(restored) is dict and same_state(restored, state)  # every value, not only the keys
    assert torch.equal(torch.rand(5, generator=b.generator), expect)


def same_state(a, b) -> bool:
    """Equal values, recursively: tensors by ``torch.equal``, everything else by ``==``."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("name", BUILTIN)
def test_generators_are_seeded_per_run_rank_and_name(name):
    opts = CALLBACKS.get(name).neutral_options()
    draw = lambda **kw: torch.rand(4, generator=create(Spec(name, opts), **kw).generator)  # noqa: E731
    assert torch.equal(draw(seed=1, rank=0), draw(seed=1, rank=0))
    assert not torch.equal(draw(seed=1, rank=0), draw(seed=1, rank=1))
    assert not torch.equal(draw(seed=1, rank=0), draw(seed=2, rank=0))


@pytest.mark.parametrize("name", BUILTIN)
def test_metrics_are_finite_floats(make_cfg, name):
    cls = CALLBACKS.get(name)
    cfg = with_callbacks(make_cfg, [{"name": name, **to_plain(cls.neutral_options())}])
    fit(cfg)
    rows = [json.loads(line) for line in (Path(cfg.training.output_dir) / "metrics.jsonl").read_text().splitlines()]
    values = [v for r in rows for k, v in r.items() if k.startswith(f"{name}/")]
    assert values, f"{name} logged nothing"  # every built-in callback reports something every step
    assert all(isinstance(v, float) and torch.isfinite(torch.tensor(v)) for v in values)


# ---- protocol behaviour, with helper callbacks registered for one test -------------------------


@dataclass(frozen=True, kw_only=True)
class RecorderOptions:
    weight: float = 0.0
    zero_grads: bool = False


class Recorder(Callback):
    name = "recorder"
    Options = RecorderOptions
    log: list[str] = []

    def on_train_begin(self, ctx):
        self.log.append("train_begin")

    def on_step_begin(self, ctx):
        self.log.append(f"step_begin:{ctx.state.step}")

    def loss_terms(self, ctx, batch, outputs):
        self.log.append("loss_terms")
        return {"l2": self.options.weight * sum((p**2).sum() for p in ctx.model.parameters() if p.requires_grad)}

    def on_gradients(self, ctx):
        self.log.append("gradients")
        if self.options.zero_grads:
            for p in ctx.model.parameters():
                if p.grad is not None:
                    p.grad.zero_()

    def on_step_end(self, ctx):
        self.log.append(f"step_end:{ctx.state.step}")
        return {"draw": torch.rand((), generator=self.generator).item()}

    def on_evaluate(self, ctx, metrics):
        self.log.append("evaluate")
        return {"seen_eval_loss": metrics["eval_loss"]}

    def on_train_end(self, ctx):
        self.log.append("train_end")


class Second(Recorder):
    name = "second"

    def on_step_begin(self, ctx):
        self.log.append("second_step_begin")


@pytest.fixture
def recorder():
    Recorder.log = []
    with CALLBACKS.registered(Recorder), CALLBACKS.registered(Second):
        yield Recorder


def test_event_order_with_accumulation_eval_and_config_order(make_cfg, recorder):
    cfg = with_callbacks(make_cfg, [{"name": "recorder"}, {"name": "second"}], "training.max_steps=2", "training.eval_steps=2")
    fit(cfg)
    log = [e for e in recorder.log if e != "loss_terms"]
    per_step = lambda s: [f"step_begin:{s}", "second_step_begin", "gradients", "gradients", f"step_end:{s + 1}", f"step_end:{s + 1}"]  # noqa: E731
    assert log == ["train_begin", "train_begin", *per_step(0), *per_step(1), "evaluate", "evaluate", "train_end", "train_end"]
    assert recorder.log.count("loss_terms") == 2 * 2 * 2  # steps x accumulation x callbacks


def test_loss_terms_are_added_and_logged_per_term(make_cfg, recorder, tmp_path):
    heavy = with_callbacks(make_cfg, [{"name": "recorder", "weight": 1.0}], f"training.output_dir={tmp_path / 'h'}")
    fit(heavy)
    rows = [json.loads(x) for x in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["event"] == "train"]
    assert all(r["loss/recorder/l2"] > 0 for r in train)
    zero = with_callbacks(make_cfg, [{"name": "recorder", "weight": 0.0}], f"training.output_dir={tmp_path / 'z'}")
    fit(zero)
    norm = lambda d: sum((t**2).sum().item() for k, t in adapter_tensors(d).items() if "lora_B" in k)  # noqa: E731
    assert norm(tmp_path / "h") < norm(tmp_path / "z")  # the L2 term really entered the gradient
    assert [r for r in rows if r["event"] == "eval"][-1]["recorder/seen_eval_loss"] > 0


def test_gradient_edits_in_on_gradients_take_effect(make_cfg, recorder, tmp_path):
    cfg = with_callbacks(make_cfg, [{"name": "recorder", "zero_grads": True}], "training.weight_decay=0.0", "training.save_steps=0")
    fit(cfg)
    b = [t for k, t in adapter_tensors(Path(cfg.training.output_dir)).items() if "lora_B" in k]
    assert all((t == 0).all() for t in b)  # lora_B starts at zero and never received a gradient


def test_callback_state_is_checkpointed_and_checked_on_resume(make_cfg, recorder, tmp_path):
    cfg = with_callbacks(make_cfg, [{"name": "recorder"}])
    fit(cfg)
    out = Path(cfg.training.output_dir)
    saved = torch.load(out / "checkpoint-3" / "callbacks" / "rank0.pt", weights_only=False)
    assert set(saved) == {"recorder"} and "generator" in saved["recorder"]
    import shutil

    shutil.rmtree(out / "final")
    other = with_callbacks(make_cfg, [{"name": "second"}], "training.resume_from_checkpoint=true")
    with pytest.raises(CheckpointError, match=r"checkpoint-6 was made with a different config \(callbacks\)"):
        fit(other)
    second = cbs.CallbackList([create(Spec("second", RecorderOptions()), seed=0, rank=0)])
    with pytest.raises(CheckpointError, match=r"holds callback states \['recorder'\] but the config lists \['second'\]"):
        second.load_state_dict(saved)


def test_registry_rejects_duplicates_and_unknown_names():
    class Impostor(Callback):
        name = "telemetry"

    with pytest.raises(ValueError, match="registered twice"):
        CALLBACKS.register(Impostor)
    with pytest.raises(ConfigError, match=r"unknown callback 'telemtry' \(did you mean 'telemetry'\?\)"):
        CALLBACKS.get("telemtry")

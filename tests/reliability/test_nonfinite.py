"""NaN/Inf guard: a step whose gradient norm is not finite changes nothing and is counted; past
``training.max_nonfinite_steps`` the run stops with one line and its newest checkpoint intact."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import events
from qaft.callbacks import CallbackList
from qaft.pipeline.cli import main
from qaft.pipeline.config import config_from_dict
from qaft.trainer.checkpoint import check_resumable


def poison(monkeypatch, attempts: set[int] | None = None, from_step: int | None = None) -> list[int]:
    """Make the loss NaN on chosen step attempts (counted from 0, skipped ones included); returns the
    attempt log. ``loss * nan`` so the NaN reaches every gradient, as a real blow-up does."""
    seen: list[int] = []
    real_begin, real_terms = CallbackList.on_step_begin, CallbackList.loss_terms

    def on_step_begin(self, ctx):
        seen.append(ctx.state.step)
        return real_begin(self, ctx)

    def loss_terms(self, ctx, batch, outputs):
        terms = real_terms(self, ctx, batch, outputs)
        n = len(seen) - 1
        if (attempts is not None and n in attempts) or (from_step is not None and ctx.state.step >= from_step):
            terms["poison"] = outputs.loss * float("nan")
        return terms

    monkeypatch.setattr(CallbackList, "on_step_begin", on_step_begin)
    monkeypatch.setattr(CallbackList, "loss_terms", loss_terms)
    return seen


def write(smoke_raw, tmp_path, name, **training) -> tuple[Path, Path]:
    import yaml

    out = tmp_path / name
    raw = smoke_raw | {
        "callbacks": [],
        "training": smoke_raw["training"]
        | {"max_steps": 8, "save_steps": 2, "logging_steps": 1, "eval_steps": None, "save_total_limit": None, "output_dir": str(out)}
        | training,
    }
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    return cfg, out


def raw_accumulation(cfg: Path) -> int:
    import yaml

    return yaml.safe_load(cfg.read_text())["training"]["gradient_accumulation_steps"]


def test_a_few_nonfinite_steps_are_skipped_without_touching_weights_or_schedule(smoke_raw, tmp_path, monkeypatch):
    clean_cfg, clean = write(smoke_raw, tmp_path, "clean")
    assert main(["train", str(clean_cfg)]) == 0
    cfg, out = write(smoke_raw, tmp_path, "poisoned")
    snapshots: dict[int, list[dict]] = {}
    positions: list[int] = []
    real_begin = CallbackList.on_step_begin

    def snapshot(self, ctx):  # the adapter at the start of every attempt, keyed by the optimizer step count
        snapshots.setdefault(ctx.state.step, []).append({n: p.detach().clone() for n, p in ctx.model.named_parameters() if p.requires_grad})
        positions.append(ctx.state.micro_batches)
        return real_begin(self, ctx)

    monkeypatch.setattr(CallbackList, "on_step_begin", snapshot)
    seen = poison(monkeypatch, attempts={2, 5})
    assert main(["train", str(cfg)]) == 0
    assert seen == [0, 1, 2, 2, 3, 4, 4, 5, 6, 7]  # attempts 2 and 5 did not advance the step count
    accumulation = raw_accumulation(cfg)
    assert positions == [i * accumulation for i in range(10)]  # but the data moved on: no batch is seen twice
    for step in (2, 4):  # the attempt after a skip starts from exactly the weights the skipped one saw
        before, after = snapshots[step]
        assert all(torch.equal(before[k], after[k]) for k in before)
    bad = events(out, "nonfinite")
    assert [(r["step"], r["skipped_steps"]) for r in bad] == [(3, 1), (5, 2)] and all(math.isnan(r["grad_norm"]) for r in bad)
    rows, clean_rows = events(out, "train"), events(clean, "train")
    assert [r["step"] for r in rows] == list(range(1, 9)) and rows[-1]["skipped_steps"] == 2
    assert [r["lr"] for r in rows] == [r["lr"] for r in clean_rows]  # the schedule did not move on a skip
    assert all(math.isfinite(r["loss"]) for r in rows)  # the poisoned losses are not averaged into the log
    assert all(v.isfinite().all() for v in load_file(str(out / "final/adapter/adapter_model.safetensors")).values())


def test_too_many_stop_the_run_with_one_line_and_the_last_checkpoint_intact(smoke_raw, tmp_path, monkeypatch, capsys):
    cfg, out = write(smoke_raw, tmp_path, "diverged", max_nonfinite_steps=2)
    poison(monkeypatch, from_step=4)
    assert main(["train", str(cfg)]) == 2
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("qaft: error")]  # the rest is the training log
    assert len(err) == 1 and "non-finite gradient norm" in err[0] and "more than training.max_nonfinite_steps=2" in err[0], err
    assert "checkpoint-4" in err[0] and "Traceback" not in stderr
    assert not (out / "final").exists() and not list(out.glob(".tmp-*"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    check_resumable(out / "checkpoint-4", config_from_dict(__import__("yaml").safe_load(cfg.read_text()), []))
    assert all(v.isfinite().all() for v in load_file(str(out / "checkpoint-4/adapter/adapter_model.safetensors")).values())
    assert len(events(out, "nonfinite")) == 3
    monkeypatch.undo()  # the cause is gone: raise the limit and resume (a resumable change)
    assert main(["train", str(cfg), "training.resume_from_checkpoint=true", "training.max_nonfinite_steps=5"]) == 0
    assert (out / "final").exists() and events(out, "train")[-1]["step"] == 8


@pytest.mark.parametrize("value", ["-1", "1.5", "many"])
def test_the_limit_is_validated(smoke_raw, tmp_path, value, capsys):
    cfg, _ = write(smoke_raw, tmp_path, "v")
    assert main(["train", str(cfg), f"training.max_nonfinite_steps={value}"]) == 2
    assert "training.max_nonfinite_steps" in capsys.readouterr().err

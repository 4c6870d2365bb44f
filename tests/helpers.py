"""Assertions shared by test modules (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

SMALL_POSTPASS = ("postpass.calibration_samples=4", "postpass.calibration_seq_len=32", "postpass.rank=4", "export.evaluate=false")
"""Overrides for a post-pass that takes a fraction of a second on the tiny models."""


def adapter_tensors(run_dir: Path, sub: str = "final/adapter") -> dict:
    from safetensors.torch import load_file

    return load_file(Path(run_dir) / sub / "adapter_model.safetensors")


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert (a[k] == b[k]).all(), f"{k} differs by {(a[k] - b[k]).abs().max().item():.3e}"


def events(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["event"] == kind]


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "s_per_step")} for r in rows]


class Killed(Exception):
    """Stands in for a SIGKILL right after a checkpoint landed."""


def kill_after_checkpoint(monkeypatch, step: int) -> None:
    import qaft.trainer.loop as loop

    real = loop.save_checkpoint

    def save_then_die(ctx, *args, **kwargs):
        path = real(ctx, *args, **kwargs)
        if ctx.state.step == step:
            raise Killed
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)


def assert_resume_is_exact(run, monkeypatch, tmp_path: Path, kill_at: int, volatile: tuple[str, ...] = ()) -> list[dict]:
    """``run(out_dir, *extra_overrides) -> Config``: train straight through, and again killed right after
    checkpoint ``kill_at`` then resumed; the adapters and the logged train rows (minus timings and the
    ``volatile`` keys, which measure wall time) must be identical. Returns the straight run's rows.
    Under bf16 autocast on every host (``training.bf16: auto`` picks it where the CPU has bf16 units; forced
    here so that hosts without them test the same path, only slower)."""
    from qaft.trainer.loop import fit

    bf16 = "training.bf16=true"
    fit(run(tmp_path / "a", bf16))
    kill_after_checkpoint(monkeypatch, kill_at)
    try:
        fit(run(tmp_path / "b", bf16))
        raise AssertionError("the run was not killed")
    except Killed:
        pass
    monkeypatch.undo()
    fit(run(tmp_path / "b", bf16, "training.resume_from_checkpoint=true"))
    assert_same_tensors(adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b"))
    drop = lambda rows: [{k: v for k, v in r.items() if k not in volatile} for r in without_timing(rows)]  # noqa: E731
    rows = drop(events(tmp_path / "a", "train"))
    assert rows == drop(events(tmp_path / "b", "train"))
    return rows


def postpass(reconstructor=None, rank: int = 0, **fields):
    """A ``PostpassConfig`` parsed exactly as YAML would be: ``postpass("aser", 8, quantizer={"name": "gptq", "damp": 0.0})``."""
    from qaft.core.typed import parse
    from qaft.quant.config import PostpassConfig

    return parse(PostpassConfig, {"reconstructor": reconstructor or "none", "rank": rank, **fields}, "postpass")


def tiny_model_and_calibration():
    """The tiny random Llama and 6 × 32 calibration token ids (fixed seed): the pipeline tests of the weight quantizers."""
    import torch

    from qaft.core.model import ModelConfig, load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(ModelConfig(name_or_path="tiny-llama"))
    return model, torch.randint(0, 257, (6, 32), generator=torch.Generator().manual_seed(1))


def run_launch(cmd: list[str], *, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` for a multi-process launch: the launcher and its ranks in their own process group.

    On timeout every process of the group first gets SIGUSR1 (the qaft CLI prints its threads' Python stacks: where
    the ranks wait) and then SIGKILL, and the test fails with those stacks. ``subprocess.run`` would kill only the
    launcher and leave its ranks running, holding the output folder's lock and whatever they were waiting for, so
    that every later launch in the session failed in their shadow."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGUSR1)
            time.sleep(3)
            os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(
            f"{' '.join(map(str, cmd))}: no exit within {timeout:.0f} s; stdout tail:\n{out[-2000:]}\nstderr (stacks) tail:\n{err[-8000:]}"
        ) from None
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)

"""Assertions shared by test modules (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path


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

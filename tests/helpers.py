"""Assertions shared by test modules (pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path


def adapter_tensors(run_dir: Path, sub: str = "final/adapter") -> dict:
    from safetensors.torch import load_file

    return load_file(Path(run_dir) / sub / "adapter_model.safetensors")


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert (a[k] == b[k]).all(), f"{k} differs by {(a[k] - b[k]).abs().max().item():.3e}"

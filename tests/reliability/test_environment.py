"""Faults from the machine, not the user: a full disk during a checkpoint, final/ or a post-pass save. Each must end
with exit 3, one line (what was being written, free space, the newest complete checkpoint, the fix), no traceback,
no temp folder left, every complete checkpoint intact and resumable; rotation never deletes an old checkpoint
before the new one is published.

Two ways to fill the disk: a real tmpfs the size of ~2.5 checkpoints (needs ``mount``; skipped with the reason
otherwise), and a patched ``publish`` that raises ``OSError(ENOSPC)`` for a chosen folder (always runs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from qaft.core.io import folder_size
from qaft.pipeline.config import config_from_dict
from qaft.trainer.checkpoint import check_resumable, list_checkpoints

pytestmark = pytest.mark.multiprocess

# qaft's CLI; with QAFT_TEST_ENOSPC=<folder name> publishing that folder fails as a full disk does.
RUNNER = """
import errno, os, sys
import qaft.core.io as io, qaft.trainer.checkpoint as c
name = os.environ.get("QAFT_TEST_ENOSPC")
if name:
    real = io.publish
    def publish(tmp, final):
        if final.name == name:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
        return real(tmp, final)
    io.publish = c.publish = publish
from qaft.pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


def qaft(*argv: str, enospc: str | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"} | ({"QAFT_TEST_ENOSPC": enospc} if enospc else {})
    return subprocess.run([sys.executable, "-c", RUNNER, *argv], env=env, capture_output=True, text=True, timeout=300)


def config(smoke_raw: dict, folder: Path, out: Path, **training) -> Path:
    raw = smoke_raw | {
        "training": smoke_raw["training"] | {"max_steps": 6, "save_steps": 2, "eval_steps": None, "save_total_limit": 2, "output_dir": str(out)} | training
    }
    path = folder / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("qaft:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def assert_resumable(out: Path, cfg: Path) -> None:
    c = config_from_dict(yaml.safe_load(cfg.read_text()), [])
    assert list_checkpoints(out)
    for ckpt in list_checkpoints(out):
        check_resumable(ckpt, c)
    assert not list(out.glob(".tmp-*"))


@pytest.mark.parametrize("where", ["checkpoint-4", "final"])
def test_a_full_disk_while_publishing_exits_3_with_one_line_and_keeps_every_complete_checkpoint(smoke_raw, tmp_path, where):
    out = tmp_path / "run"
    cfg = config(smoke_raw, tmp_path, out, save_total_limit=1)  # rotation would delete checkpoint-2 if it ran before the publish
    r = qaft("train", str(cfg), enospc=where)
    assert r.returncode == 3, r.stderr[-3000:]
    line = one_line(r.stderr)
    assert f"writing {where if where != 'final' else 'final/'} in {out} failed: the disk is full (" in line, line
    newest = "checkpoint-2" if where == "checkpoint-4" else "checkpoint-6"
    assert f"the newest complete checkpoint, {newest}, is intact" in line and line.endswith("free space there (or write elsewhere) and run the command again")
    assert [p.name for p in list_checkpoints(out)] == [newest]
    assert_resumable(out, cfg)
    if where == "final":  # room again: the run finishes from there (the real-tmpfs test resumes after a failed checkpoint)
        r = qaft("train", str(cfg), "training.resume_from_checkpoint=true")
        assert r.returncode == 0 and (out / "final" / "adapter").is_dir(), r.stderr[-3000:]


def test_a_full_disk_during_the_post_pass_save_leaves_no_half_written_folder(smoke_raw, tmp_path):
    out = tmp_path / "run"
    cfg = config(smoke_raw, tmp_path, out)
    r = qaft("quantize", str(cfg), f"postpass.output_dir={tmp_path / 'pp'}", "postpass.rank=4", enospc="pp")
    assert r.returncode == 3, r.stderr[-3000:]
    assert f"writing pp in {tmp_path} failed: the disk is full" in one_line(r.stderr)
    assert not (tmp_path / "pp").exists() and not list(tmp_path.glob(".tmp-*"))


def _tmpfs(folder: Path, size: int) -> str | None:
    """Mount a tmpfs of ``size`` bytes at ``folder``; the reason it cannot be done, else None."""
    folder.mkdir()
    if shutil.which("mount") is None:
        return "no mount command"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"qaft-test-{uuid.uuid4().hex[:6]}", str(folder)], capture_output=True, text=True)
    return None if r.returncode == 0 else f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); the patched-ENOSPC tests cover the logic"


def test_a_really_full_disk_during_a_checkpoint_save(smoke_raw, tmp_path):
    """The real thing: ``training.output_dir`` on a tmpfs with room for two checkpoints and a half; the third save
    (torch's and safetensors' writers fail in their own ways) ends in the same one line, nothing partial left."""
    probe = tmp_path / "probe"
    assert qaft("train", str(config(smoke_raw, tmp_path, probe, max_steps=2)), enospc=None).returncode == 0
    size = folder_size(probe / "checkpoint-2")
    small = tmp_path / "small"
    why = _tmpfs(small, int(2.5 * size) + 64 * 1024)
    if why:
        pytest.skip(why)
    try:
        out = small / "run"
        cfg = config(smoke_raw, tmp_path, out, save_total_limit=3)
        r = qaft("train", str(cfg))
        assert r.returncode == 3, r.stderr[-3000:]
        line = one_line(r.stderr)
        assert "failed: the disk is full" in line and "free" in line, line
        assert not list(out.glob(".tmp-*"))
        moved = tmp_path / "moved"  # the user frees space (here: moves the run) and resumes
        shutil.copytree(out, moved)
        cfg2 = config(smoke_raw, tmp_path, moved, save_total_limit=3)
        assert_resumable(moved, cfg2)
        r = qaft("train", str(cfg2), "training.resume_from_checkpoint=true")
        assert r.returncode == 0, r.stderr[-3000:]
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)

"""Faults from the machine, not the user: a full disk during a checkpoint, final/ or a post-pass save. Each must end
with exit 3, one line (what was being written, free space, the newest complete checkpoint, the fix), no traceback,
no temp folder left, every complete checkpoint intact and resumable; rotation never deletes an old checkpoint
before the new one is published.

Two ways to fill the disk: a real tmpfs the size of ~2.5 checkpoints (needs ``mount``; skipped with the reason
otherwise, a failure under CI=true), and a patched ``publish`` that fails for a chosen folder the way the machine
would (always runs): each errno qaft names, the OS's words without an errno, torch's zip writer's RuntimeError; at a
checkpoint, ``final/``, the post-pass result, the tuned result, the export and the report."""

from __future__ import annotations

import errno
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


def fail_publish(where: str, kind: str) -> None:
    """From now on, publishing the folder whose path ends in ``where`` fails as the machine would: an ``OSError``
    with the errno ``kind`` (ENOSPC, EDQUOT, EROFS, EACCES), the OS's words without an errno (what safetensors' Rust
    writer raises: ``message``), or torch's zip writer's bare ``RuntimeError`` on a full disk (``torchzip``)."""
    import qaft.core.io as io
    import qaft.trainer.checkpoint as c

    real = io.publish

    def publish(tmp: Path, final: Path) -> None:
        if str(final).endswith(where):
            if kind == "message":
                raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')
            if kind == "torchzip":
                io.free_bytes = lambda path: 4096  # the disk is full, so the writer's failure is the disk's
                raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file data/0: file write failed")
            code = getattr(errno, kind)
            raise OSError(code, os.strerror(code), str(tmp))
        real(tmp, final)

    io.publish = c.publish = publish


# qaft's CLI in a process of its own; with QAFT_TEST_FAULT=<where>:<kind>, ``fail_publish(where, kind)`` first.
RUNNER = f"""
import os, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
if os.environ.get("QAFT_TEST_FAULT"):
    from test_environment import fail_publish
    fail_publish(*os.environ["QAFT_TEST_FAULT"].split(":"))
from qaft.pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


def qaft(*argv: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"} | ({"QAFT_TEST_FAULT": fault} if fault else {})
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
    r = qaft("train", str(cfg), fault=f"{where}:ENOSPC")
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
    r = qaft("quantize", str(cfg), f"postpass.output_dir={tmp_path / 'pp'}", "postpass.rank=4", fault="pp:ENOSPC")
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
    assert qaft("train", str(config(smoke_raw, tmp_path, probe, max_steps=2))).returncode == 0
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


FAULTS = {  # kind → (the cause qaft names, the fix it gives)
    "EDQUOT": ("the disk quota is exceeded", "free space within your quota (or write elsewhere) and run the command again"),
    "EROFS": ("the filesystem is read-only", "choose a writable folder"),
    "EACCES": ("permission denied", "choose a folder you can write to, or fix its permissions"),
    "message": ("the disk is full", "free space there (or write elsewhere) and run the command again"),
    "torchzip": ("the disk is full", "free space there (or write elsewhere) and run the command again"),
}


@pytest.mark.parametrize("kind", FAULTS)
def test_each_kind_of_refused_write_is_named_with_its_fix_and_the_checkpoints_stay(smoke_raw, tmp_path, kind, monkeypatch, capsys):
    """A quota, a read-only or forbidden folder, a full disk said only in the OS's words (no errno), torch's zip writer
    failing on a full disk: each is exit 3 and one line with its own cause and fix; checkpoint-2 stays resumable."""
    import qaft.core.io as io
    import qaft.trainer.checkpoint as c
    from qaft.pipeline.cli import main

    out = tmp_path / "run"
    cfg = config(smoke_raw, tmp_path, out)
    for module, name in ((io, "publish"), (c, "publish"), (io, "free_bytes")):  # in this process: put back after the test
        monkeypatch.setattr(module, name, getattr(module, name))
    fail_publish("checkpoint-4", kind)
    assert main(["train", str(cfg)]) == 3
    line = one_line(capsys.readouterr().err)
    cause, fix = FAULTS[kind]
    assert f"writing checkpoint-4 in {out} failed: {cause}" in line and line.endswith(fix), line
    assert "the newest complete checkpoint, checkpoint-2, is intact" in line
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert_resumable(out, cfg)


def test_a_full_disk_in_the_tune_export_or_report_stage_is_one_line_and_the_rerun_goes_on_from_that_stage(smoke_raw, tmp_path):
    """``qaft run`` on a disk that fills while the tuned result, then the export, then the report is published: exit 3
    and one line naming that folder each time, no temp folder left, the finished stages never redone; with room again
    the run completes."""
    out = tmp_path / "run"
    (tmp_path / "eval.txt").write_text("The quick brown fox jumps over the lazy dog. " * 200)
    raw = smoke_raw | {
        "training": smoke_raw["training"] | {"max_steps": 2, "save_steps": 2, "eval_steps": None, "output_dir": str(out)},
        "postpass": {"rank": 4, "calibration_samples": 4, "calibration_seq_len": 32},
        "tune": {"steps": 2, "seq_len": 32, "save_steps": 2, "max_eval_blocks": 1},
        "eval": {"path": str(tmp_path / "eval.txt"), "windows": 2, "seq_len": 32},
    }
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    records: dict[str, int] = {}
    for where, folder in (("tune/final", out / "tune"), ("export", out), ("report", out)):
        r = qaft("run", str(cfg), fault=f"{where}:ENOSPC")
        assert r.returncode == 3, r.stderr[-3000:]
        name = where.split("/")[-1]
        assert f"writing {name}{'/' if name == 'final' else ''} in {folder} failed: the disk is full" in one_line(r.stderr)
        assert not list(out.rglob(".tmp-*")) and not (folder / name).exists()
        done = {p.stem: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")}
        assert all(done[s] == t for s, t in records.items()), "a finished stage was redone"
        records = done
    assert set(records) >= {"train", "quantize", "tune", "export", "eval"}
    r = qaft("run", str(cfg))
    assert r.returncode == 0 and (out / "report" / "index.html").is_file(), r.stderr[-3000:]

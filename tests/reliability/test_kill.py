"""SIGKILL ``qaft train`` (a real subprocess) mid-step and mid-checkpoint, resume, and compare with an
uninterrupted run: the adapter must be bit-identical and every checkpoint folder either complete or absent.
SIGTERM / SIGINT (preemption) the same way, mid-step, mid-save and mid-eval: the run saves the step it was in
(exit 143 / 130, no step lost) and the resume is bit-identical too.

Kills mid-checkpoint are made deterministic by a wrapper that pauses inside ``save_checkpoint`` at a
chosen point (after the optimizer state, before the adapter; or after everything, before the atomic
rename): the test kills the process while it sleeps there. Mid-step kills land at a seeded random
moment after a seeded random step."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from helpers import assert_same_tensors
from qaft.pipeline.config import config_from_dict
from qaft.trainer.checkpoint import check_resumable, list_checkpoints

pytestmark = pytest.mark.multiprocess

STEPS, SAVE_EVERY = 12, 3
# Runs qaft's CLI, pausing inside the save of one checkpoint when QAFT_TEST_PAUSE=adapter:N or publish:N, or inside
# the eval at step N (eval:N), for 60 s or QAFT_TEST_PAUSE_S; it touches QAFT_TEST_PAUSE_MARK when the pause begins.
RUNNER = """
import os, pathlib, sys, time
import qaft.trainer.checkpoint as c, qaft.trainer.loop as loop
if os.environ.get("QAFT_TEST_PAUSE"):
    where, step = os.environ["QAFT_TEST_PAUSE"].split(":")
    module, name = {"adapter": (c, "save_adapter"), "publish": (c, "publish"), "eval": (loop, "evaluate")}[where]
    real = getattr(module, name)
    def paused(*a, **k):
        if any(f"checkpoint-{step}" in str(x) for x in a) or (where == "eval" and a[0].state.step == int(step)):
            pathlib.Path(os.environ["QAFT_TEST_PAUSE_MARK"]).touch()
            time.sleep(float(os.environ.get("QAFT_TEST_PAUSE_S", 60)))  # the test signals us in here
        return real(*a, **k)
    setattr(module, name, paused)
from qaft.pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


def config(smoke_raw, tmp_path: Path, name: str, **training) -> tuple[Path, Path]:
    out = tmp_path / name
    raw = smoke_raw | {
        "training": smoke_raw["training"]
        | {"max_steps": STEPS, "save_steps": SAVE_EVERY, "logging_steps": 1, "eval_steps": None, "save_total_limit": 2, "output_dir": str(out)}
        | training
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, out


def start(cfg: Path, *extra: str, pause: str | None = None, pause_s: float = 60.0) -> subprocess.Popen:
    mark = cfg.parent / f"{cfg.stem}.paused"
    env = (
        os.environ
        | {"OMP_NUM_THREADS": "1"}
        | ({"QAFT_TEST_PAUSE": pause, "QAFT_TEST_PAUSE_S": str(pause_s), "QAFT_TEST_PAUSE_MARK": str(mark)} if pause else {})
    )
    return subprocess.Popen([sys.executable, "-c", RUNNER, "train", str(cfg), *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, f"the run ended before the kill point: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() - t0 < timeout, "kill point never reached"
        time.sleep(0.005)


def logged_steps(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum('"event": "train"' in ln for ln in lines)


def assert_every_checkpoint_complete(out: Path, cfg: Path) -> None:
    """Each ``checkpoint-*`` folder passes the resume check and its adapter loads; temp folders are the only partial ones."""
    c = config_from_dict(yaml.safe_load(cfg.read_text()), [])
    for ckpt in list_checkpoints(out):
        check_resumable(ckpt, c)
        assert load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
        assert (ckpt / "accelerate" / "optimizer.bin").stat().st_size > 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml").read_text())
    raw["data"]["path"] = str(corpus)
    tmp = tmp_path_factory.mktemp("kill")
    cfg, out = config(raw, tmp, "straight")
    p = start(cfg)
    assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    return raw, load_file(str(out / "final" / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("scenario", ["step-0", "step-1", "save-adapter-0", "save-publish-1"])
def test_sigkill_then_resume_gives_the_uninterrupted_adapter(reference, tmp_path, scenario):
    raw, straight = reference
    kind, seed = scenario.rsplit("-", 1)
    rng = random.Random(int(seed))
    cfg, out = config(raw, tmp_path, "killed")
    if kind == "step":
        target = rng.randint(SAVE_EVERY + 1, STEPS - 1)  # after the first checkpoint, before the end
        p = start(cfg)
        wait_for(p, lambda: logged_steps(out) >= target)
        time.sleep(rng.uniform(0.0, 0.05))  # somewhere inside one of the next steps
    else:
        save = rng.choice([2, 3]) * SAVE_EVERY  # the second or third checkpoint (one complete one exists already)
        p = start(cfg, pause=f"{kind.split('-')[1]}:{save}")
        wait_for(p, lambda: (out / f".tmp-checkpoint-{save}").exists())
        time.sleep(0.3)  # inside the pause
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL, "the run finished before the kill"  # it really was interrupted
    assert not (out / "final").exists() and logged_steps(out) < STEPS
    if kind != "step":
        assert (out / f".tmp-checkpoint-{save}").exists() and not (out / f"checkpoint-{save}").exists()  # killed mid-save
    assert list_checkpoints(out), "no checkpoint to resume from"
    assert_every_checkpoint_complete(out, cfg)
    p = start(cfg, "training.resume_from_checkpoint=true")
    assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    assert not list(out.glob(".tmp-*"))  # the stray temp folder was cleared
    assert_same_tensors(straight, load_file(str(out / "final" / "adapter" / "adapter_model.safetensors")))


def events(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["event"] == kind]


@pytest.mark.parametrize("scenario", ["SIGTERM-step-0", "SIGTERM-step-1", "SIGTERM-step-2", "SIGTERM-save-4", "SIGINT-eval-5"])
def test_a_preemption_signal_saves_the_step_in_flight_and_the_resume_is_exact(reference, tmp_path, scenario):
    """SIGTERM / SIGINT at a seeded random moment of a step, inside a checkpoint save, inside an eval: the step in
    flight finishes, a checkpoint of it is written (no step lost), a ``preempted`` event is logged, exit 143 / 130
    with one line; resuming gives the uninterrupted run's adapter bit for bit."""
    raw, straight = reference
    name, kind, seed = scenario.split("-")
    sig, rng = getattr(signal, name), random.Random(int(seed))
    if kind == "step":
        cfg, out = config(raw, tmp_path, "preempted")
        target = rng.randint(1, STEPS - 2)
        p = start(cfg)
        wait_for(p, lambda: logged_steps(out) >= target)
        time.sleep(rng.uniform(0.0, 0.05))
    else:  # inside the save of checkpoint-6 / the eval after step 4 (evaluation never changes training)
        cfg, out = config(raw, tmp_path, "preempted", **({"eval_steps": 4} if kind == "eval" else {}))
        p = start(cfg, pause="publish:6" if kind == "save" else "eval:4", pause_s=2.0)
        wait_for(p, lambda: (tmp_path / "preempted.paused").exists())
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("qaft:")]
    assert len(lines) == 1 and f"stopped by {name} after step" in lines[0] and "Traceback" not in err, err[-2000:]
    done = logged_steps(out)
    assert 0 < done < STEPS and not (out / "final").exists()
    assert list_checkpoints(out)[-1].name == f"checkpoint-{done}"  # the step in flight was saved: none lost
    assert events(out, "preempted") == [{"event": "preempted", "step": done, "signal": name, "checkpoint": f"checkpoint-{done}"}]
    if kind != "step":
        assert done == {"save": 6, "eval": 4}[kind]
    assert_every_checkpoint_complete(out, cfg)
    p = start(cfg, "training.resume_from_checkpoint=true")
    assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    assert_same_tensors(straight, load_file(str(out / "final" / "adapter" / "adapter_model.safetensors")))


def test_a_second_writer_is_refused_and_a_killed_holders_lock_is_taken_over(reference, tmp_path, capsys):
    """One writer per output folder: while a run holds it (paused in a save), a second ``qaft train`` on it exits 3
    naming the holder's pid and command, touching nothing; once the holder is ``kill -9``ed, the next run proceeds."""
    from qaft.pipeline.cli import main

    raw, straight = reference
    cfg, out = config(raw, tmp_path, "held")
    p = start(cfg, pause="publish:6")
    wait_for(p, lambda: (tmp_path / "held.paused").exists())
    before = sorted(x.name for x in out.iterdir())
    assert main(["train", str(cfg), "training.resume_from_checkpoint=true"]) == 3
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("qaft:")]
    assert len(err) == 1 and f"is in use by another qaft process, pid {p.pid} (qaft train {cfg}" in err[0], err
    assert sorted(x.name for x in out.iterdir()) == before
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert main(["train", str(cfg), "training.resume_from_checkpoint=true"]) == 0  # the dead holder's lock is free
    assert_same_tensors(straight, load_file(str(out / "final" / "adapter" / "adapter_model.safetensors")))


def test_a_second_sigint_stops_at_once_and_the_resume_is_still_exact(reference, tmp_path):
    """Ctrl-C while the run is saving the step the first Ctrl-C asked for: the default action at once (a user at a
    terminal can always force a stop), the save under way left as a temp folder; the resume clears it and is exact."""
    raw, straight = reference
    cfg, out = config(raw, tmp_path, "forced")
    p = start(cfg, pause="publish:6", pause_s=60.0)
    wait_for(p, lambda: (tmp_path / "forced.paused").exists())
    p.send_signal(signal.SIGINT)  # noted: the save in flight would finish, then stop with 130
    time.sleep(0.5)
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=30)
    assert p.returncode == -signal.SIGINT and time.monotonic() - t0 < 20  # killed by the signal, not after the 60 s pause
    assert (out / ".tmp-checkpoint-6").exists() and [c.name for c in list_checkpoints(out)] == ["checkpoint-3"]
    assert_every_checkpoint_complete(out, cfg)
    p = start(cfg, "training.resume_from_checkpoint=true")
    assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    assert not list(out.glob(".tmp-*"))
    assert_same_tensors(straight, load_file(str(out / "final" / "adapter" / "adapter_model.safetensors")))


def test_without_save_on_signal_sigterm_kills_at_once_and_only_the_last_checkpoint_remains(reference, tmp_path):
    """``training.save_on_signal: false``: no handler, SIGTERM's default action mid-step (exit by the signal, no
    checkpoint of the step in flight, no ``preempted`` event); the newest periodic checkpoint resumes exactly."""
    raw, straight = reference
    cfg, out = config(raw, tmp_path, "unsaved", save_on_signal=False)
    p = start(cfg)
    wait_for(p, lambda: logged_steps(out) >= SAVE_EVERY + 1)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGTERM
    done = logged_steps(out)
    saved = [int(c.name.split("-")[1]) for c in list_checkpoints(out)]
    assert saved and all(s % SAVE_EVERY == 0 for s in saved) and max(saved) <= done and not events(out, "preempted")  # periodic ones only
    assert_every_checkpoint_complete(out, cfg)
    p = start(cfg, "training.resume_from_checkpoint=true")
    assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    assert_same_tensors(straight, load_file(str(out / "final" / "adapter" / "adapter_model.safetensors")))


@pytest.mark.parametrize("command", ["quantize", "tune", "export", "run"])
def test_every_writing_command_is_refused_while_another_process_holds_the_run_folder(reference, tmp_path, capsys, command):
    """The lock is not train's alone: ``quantize``, ``tune``, ``export`` and ``run`` on a run folder another process
    holds exit 3 with one line naming the holder, and write nothing."""
    from qaft.pipeline.cli import main

    raw, _ = reference
    cfg, out = config(raw, tmp_path, "held")
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from qaft.core.lock import output_lock\nwith output_lock(sys.argv[1], 'x'):\n print('held', flush=True); time.sleep(120)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(p.name for p in tmp_path.rglob("*"))
        assert main([command, str(cfg), "tune.steps=2"]) == 3
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("qaft:")]
        assert len(err) == 1 and f"training.output_dir: {out} is in use by another qaft process, pid {holder.pid} (" in err[0], err
        assert sorted(p.name for p in tmp_path.rglob("*")) == before
    finally:
        holder.kill()
        holder.wait()

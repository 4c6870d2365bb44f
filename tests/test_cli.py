"""The CLI: the real console script end to end, and the exit-code contract (0 ok, 2 user error, 1 bug)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import qaft.trainer.loop as loop
from qaft.pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]


def qaft_exe() -> str:
    exe = Path(sys.executable).with_name("qaft")
    return str(exe) if exe.exists() else shutil.which("qaft")


@pytest.mark.multiprocess  # the installed console script, in a subprocess (~18 s)
def test_the_console_script_trains_and_writes_the_documented_tree(corpus, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run(
        [
            qaft_exe(),
            "train",
            str(ROOT / "configs" / "smoke.yaml"),
            f"data.path={corpus}",
            f"training.output_dir={out}",
            "training.max_steps=4",
            "training.save_steps=2",
            "training.report_to=[tensorboard]",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OMP_WAIT_POLICY=PASSIVE" in r.stderr  # the CLI sets it before torch loads, and says so
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    for f in [
        "metrics.jsonl",
        "final/config.json",
        "final/model.safetensors",
        "final/tokenizer.json",
        "final/config.yaml",
        "final/adapter/adapter_config.json",
        "final/adapter/adapter_model.safetensors",
        "checkpoint-4/trainer_state.json",
    ]:
        assert f in files, f
    assert any(f.startswith("runs/") and "tfevents" in f for f in files), "tensorboard tracker wrote nothing"
    again = subprocess.run(
        [qaft_exe(), "train", str(ROOT / "configs" / "smoke.yaml"), f"data.path={corpus}", f"training.output_dir={out}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.strip().splitlines()[-1].startswith("qaft: error: training.output_dir:")


def test_config_errors_exit_2_with_one_line_each_and_touch_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    rc = main(["train", str(ROOT / "configs" / "smoke.yaml"), f"training.output_dir={out}", "lora.rr=3", "training.max_step=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [
        "qaft: error: lora.rr: unknown key (did you mean 'r'?)",
        "qaft: error: training.max_step: unknown key (did you mean 'max_steps'?)",
    ]
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "missing.yaml"], r"^qaft: error: config file 'missing\.yaml' does not exist"),
        (["train", "SMOKE", "data.path=missing.txt"], r"^qaft: error: data\.path: file 'missing\.txt' does not exist"),
        (
            ["train", "SMOKE", "model.name_or_path=tiny-lama"],
            r"^qaft: error: model\.name_or_path: unknown tiny model 'tiny-lama' \(did you mean 'tiny-llama'\?\)",
        ),
        (["run", "SMOKE", "--from", "report", "lora.r=0"], r"^qaft: error: lora\.r: got 0, expected"),
    ],
)
def test_user_errors_exit_2(argv, message, tmp_path, capsys):
    argv = [str(ROOT / "configs" / "smoke.yaml") if a == "SMOKE" else a for a in argv]
    rc = main([*argv, f"training.output_dir={tmp_path / 'out'}"] if argv[0] == "train" else argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    import re

    assert re.match(message, err.strip()), err


def test_flags_may_sit_between_overrides_and_unknown_flags_are_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "x.yaml", "--overwirte", "a=1"])
    assert e.value.code == 2 and "unrecognized arguments: --overwirte" in capsys.readouterr().err
    rc = main(["train", str(ROOT / "configs" / "smoke.yaml"), "lora.rr=1", "--overwrite", "training.max_step=1"])
    assert rc == 2 and len(capsys.readouterr().err.strip().splitlines()) == 2  # both overrides reached the config


def test_a_bug_exits_1_with_a_traceback(monkeypatch, capsys, tmp_path):
    def broken(cfg, overwrite=False):
        raise RuntimeError("boom")

    monkeypatch.setattr(loop, "fit", broken)
    rc = main(["train", str(ROOT / "configs" / "smoke.yaml"), f"training.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" in err and "RuntimeError: boom" in err and "internal error" in err


def test_sigusr1_prints_where_every_thread_waits_and_the_run_goes_on():
    """``kill -USR1`` on a run that seems stuck (a process group that never forms) shows each thread's Python stack on
    stderr, and does not stop the run: the way to see where a hung rank waits."""
    import signal
    import textwrap

    code = textwrap.dedent(
        """
        import sys, time
        from qaft.pipeline import cli
        def waiting_for_a_peer(args):
            print("ready", flush=True)
            time.sleep(3)
            print("finished", flush=True)
            return 0
        cli._doctor = waiting_for_a_peer
        sys.exit(cli.main(["doctor", "any.yaml"]))
        """
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGUSR1)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and "finished" in out, (p.returncode, err[-2000:])
    assert "most recent call first" in err and "in waiting_for_a_peer" in err, err[-2000:]


def test_an_error_reaches_stderr_in_one_write_of_whole_lines(monkeypatch):
    """Every rank of a launch reports on one stream: a line written apart from its newline (``print``) lets another
    rank's line run into it (seen: two ranks' "stopped by SIGTERM" lines on one line). One write, whole lines."""
    from qaft.core.errors import QaftError
    from qaft.pipeline import cli

    writes: list[str] = []
    monkeypatch.setattr(sys, "stderr", type("Recorder", (), {"write": lambda self, s: writes.append(s), "flush": lambda self: None})())
    assert cli._report(QaftError("first problem\nsecond problem")) == QaftError.exit_code
    assert writes == ["qaft: error: first problem\nqaft: error: second problem\n"]

"""DeepSpeed ZeRO-2 and ZeRO-3, executed for real: 2 CPU processes (gloo) under launch/train.sh.

ZeRO-3 runs with ``stage3_param_persistence_threshold: 0`` so that even the tiny model's LoRA
factors are sharded (by default DeepSpeed keeps tensors under 1e5 elements whole, which would hide
an ungathered save: the empty-adapter bug)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from helpers import run_launch

if importlib.util.find_spec("deepspeed") is None:  # installed by the dev extra: a missing one must not turn these proofs into skips
    pytest.fail("deepspeed is not installed; `pip install -e '.[dev]'` (or '.[deepspeed]') installs it", pytrace=False)
pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = "final/adapter/adapter_model.safetensors"


def launch_file(tmp: Path, stage: int) -> Path:
    """launch/zero2.yaml as shipped; for ZeRO-3 the same with every parameter sharded."""
    if stage == 2:
        return ROOT / "launch" / "zero2.yaml"
    ds = {
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }
    (tmp / "ds3.json").write_text(json.dumps(ds))
    raw = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "DEEPSPEED",
        "num_machines": 1,
        "num_processes": 2,
        "main_process_port": 0,  # as the shipped files
        "deepspeed_config": {"deepspeed_config_file": str(tmp / "ds3.json"), "zero3_init_flag": False},
    }
    (tmp / "launch-zero3.yaml").write_text(yaml.safe_dump(raw))
    return tmp / "launch-zero3.yaml"


def write_config(raw: dict, tmp: Path, name: str, per_device: int, callbacks: list | None = None, **training) -> Path:
    raw = raw | {
        "lora": raw["lora"] | {"lora_dropout": 0.0},  # dropout draws differ per rank
        "callbacks": callbacks or [],
        "training": raw["training"]
        | {
            "per_device_train_batch_size": per_device,
            "gradient_accumulation_steps": 1,
            "bf16": False,  # equality with one process to float32 tolerance; bf16 sums in another order differ by ~1e-2
            "max_steps": 4,
            "lr_scheduler_type": "constant",
            "warmup_ratio": 0.0,
            "save_steps": 2,
            "eval_steps": None,
            "logging_steps": 1,
            "max_grad_norm": 0.5,
            "output_dir": str(tmp / name),
        }
        | training,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def extensions_dir(config: Path) -> Path:
    """Where torch would JIT-build C++ extensions for the runs of this module (a fresh folder, as on a new machine)."""
    return config.parent / "torch_extensions"


def train(config: Path, launch: str | Path, *overrides: str, expect: int = 0) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(extensions_dir(config))}
    r = run_launch(["bash", str(ROOT / "launch" / "train.sh"), str(launch), str(config), *overrides], cwd=ROOT, env=env)
    assert r.returncode == expect, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def run_dir(config: Path) -> Path:
    return Path(yaml.safe_load(config.read_text())["training"]["output_dir"])


class Runs:
    """The smoke config, a 1-process reference run with the global batch (4) the 2-process runs use, and
    the 2-process ZeRO runs, each trained once for the whole module."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.raw = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
        self._done: dict[str, Path] = {}

    def config(self, name: str, per_device: int = 2, **kw) -> Path:
        return write_config(self.raw, self.tmp, name, per_device, **kw)

    def launch(self, stage: int) -> Path:
        return launch_file(self.tmp, stage)

    def trained(self, name: str, launch: str | Path, per_device: int = 2) -> Path:
        if name not in self._done:
            cfg = self.config(name, per_device)
            r = train(cfg, launch)
            processes = 1 if launch == "single" else 2
            assert f"{processes} process(es) on cpu" in r.stderr, r.stderr[-2000:]  # the ranks see each other
            self._done[name] = run_dir(cfg)
        return self._done[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("ds"))


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_training_equals_one_process_and_saves_whole_tensors(runs, stage):
    single, out = runs.trained("single", "single", per_device=4), runs.trained(f"zero{stage}", runs.launch(stage))
    built = extensions_dir(runs.tmp / "x.yaml")
    assert not built.exists() or not any(built.iterdir()), list(built.iterdir())  # no compiler at launch (DeepSpeed's shm all-reduce)
    ref, got = load_file(str(single / ADAPTER)), load_file(str(out / ADAPTER))
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()} and len(ref) > 0
    assert all(v.dim() == 2 and v.numel() > 0 for v in got.values())  # never the empty shard
    moved = max(v.abs().max().item() for k, v in ref.items() if "lora_B" in k)
    assert moved > 1e-3 and max_diff(ref, got) < 1e-5, (moved, max_diff(ref, got))
    merged_ref, merged = load_file(str(single / "final/model.safetensors")), load_file(str(out / "final/model.safetensors"))
    assert merged.keys() == merged_ref.keys() and max_diff(merged_ref, merged) < 1e-5
    # checkpoints hold the adapter and optimizer partitions, not a copy of the frozen base per save
    engine = sum(f.stat().st_size for f in (out / "checkpoint-4" / "accelerate").rglob("*model_states.pt"))
    assert 0 < engine < (out / "final/model.safetensors").stat().st_size / 2, engine
    adapter = load_file(str(out / "checkpoint-4/adapter/adapter_model.safetensors"))
    assert {k: v.shape for k, v in adapter.items()} == {k: v.shape for k, v in ref.items()}


def test_zero3_resume_continues_exactly(runs):
    """4 steps straight == 2 steps, stop, resume to 4, under ZeRO-3 with sharded LoRA factors."""
    straight = runs.trained("zero3", runs.launch(3))
    cut = runs.config("z3-resumed", max_steps=2)
    train(cut, runs.launch(3))
    train(cut, runs.launch(3), "training.max_steps=4", "training.resume_from_checkpoint=true")
    a, b = load_file(str(straight / ADAPTER)), load_file(str(run_dir(cut) / ADAPTER))
    assert a.keys() == b.keys() and max_diff(a, b) == 0.0


def test_callbacks_train_the_same_under_zero2_as_under_ddp(runs):
    """NPFT (Fisher scoring by autograd.grad beside the engine's gradient hooks), temporal distillation and
    telemetry read and write nothing DeepSpeed hides: the same 2 ranks give the same adapter either way."""
    callbacks = [
        {"name": "npft", "ratio": 0.05, "calib_windows": 2, "hessian_probes": 0, "rounds": 2},
        {"name": "temporal_kd", "phase_steps": 1, "review_every": 1, "layers": [0, -1], "history": 2},
        {"name": "telemetry", "every": 1},
    ]
    ddp, zero = runs.config("cb-ddp", callbacks=callbacks), runs.config("cb-zero2", callbacks=callbacks)
    train(ddp, "ddp-cpu")
    train(zero, runs.launch(2))
    a, b = load_file(str(run_dir(ddp) / ADAPTER)), load_file(str(run_dir(zero) / ADAPTER))
    assert max_diff(a, b) < 1e-5, max_diff(a, b)
    logged = [json.loads(line) for line in (run_dir(zero) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in logged if r["event"] == "train"]
    assert any("npft/round" in r for r in rows) and any(k.startswith("loss/temporal_kd/") for r in rows for k in r)
    assert all("telemetry/update_ratio" in r and "telemetry/grad_norm/lora_A" not in r for r in rows)  # no p.grad under DeepSpeed


def test_a_callback_deepspeed_rules_out_stops_before_training(runs):
    """MAT masks p.grad between backward and step, a point DeepSpeed does not have: refused with one line,
    by the doctor inside train.sh and by `qaft train` itself when launched directly."""
    cfg = runs.config("mat-zero2", callbacks=[{"name": "mat"}])
    r = train(cfg, runs.launch(2), expect=2)
    assert "callbacks: mat under DeepSpeed" in r.stdout
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    direct = run_launch(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(runs.launch(2)), "-m", "qaft.pipeline.cli", "train", str(cfg)],
        cwd=ROOT,
        env=env,
    )
    assert direct.returncode != 0 and "callbacks: mat under DeepSpeed" in direct.stderr, direct.stderr[-3000:]
    assert "internal error" not in direct.stderr
    assert not (run_dir(cfg) / "final").exists()


def test_without_the_gather_a_zero3_save_is_refused_not_written_empty(runs, tmp_path):
    """The negative control of the gather: the same ZeRO-3 run with ``gathered`` switched off in the saving code
    (a ``sitecustomize`` in the ranks' path) must stop at the first save with the "not gathered" error. So the
    factors really are sharded in these runs and the gather is what makes every saved adapter whole."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text("import contextlib\nimport qaft.trainer.checkpoint as c\nc.gathered = lambda *a, **k: contextlib.nullcontext()\n")
    cfg = runs.config("z3-ungathered", max_steps=2)
    env = os.environ | {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(hook)}
    r = run_launch(["bash", str(ROOT / "launch" / "train.sh"), str(runs.launch(3)), str(cfg)], cwd=ROOT, env=env)
    assert r.returncode != 0 and "is sharded across processes and was not gathered" in r.stderr, r.stderr[-3000:]
    assert not (run_dir(cfg) / "checkpoint-2").exists() and not (run_dir(cfg) / "final").exists()

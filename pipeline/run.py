"""``qaft run CONFIG``: doctor → train → quantize → export → eval → report, resumable by stage.

``training.output_dir`` is the run's folder and ``qaft run`` owns it::

    stages/run.yaml          the resolved config the run was started with
    stages/<stage>.json      written (atomically) when a stage has published all its outputs
    checkpoint-N/ final/     train          (``qaft train`` with resume on: a kill loses ≤ save_steps steps)
    quantized/               quantize       (``qaft quantize`` on final/)
    tune/                    tune           (``qaft tune``: checkpoints, metrics, final/ = the tuned result; skipped while tune.steps is 0)
    export/                  export         (``qaft export``: packed base + PEFT adapter, parity, manifest)
    eval.json                eval           (perplexity table: original and fine-tuned, fp / RTN / the method / the export)
    report/                  report         (index.html with embedded images, report.md, the PNGs)

A rerun skips every stage with a record and continues with the first without one; each stage's
outputs are written to a temp name and renamed when complete, so a kill leaves either the whole
output or none. ``--from STAGE`` drops the records from that stage on and redoes them. If the config
changed since a stage finished, the run stops and names the changed keys and the first stage that
reads them (rerun with ``--from`` that stage, or ``--overwrite`` to start over).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from qaft.core import memory
from qaft.core.configfile import diff_configs, read_yaml
from qaft.core.errors import CheckpointError, PreflightError
from qaft.core.io import atomic_write_text
from qaft.core.model import ModelConfig
from qaft.core.typed import to_plain
from qaft.trainer.checkpoint import list_checkpoints
from qaft.trainer.loop import fit
from qaft.trainer.outputs import OWNED as TRAIN_OWNED
from qaft.trainer.outputs import prepare_output_dir

from . import STAGES
from .commands import export_run, held_folders, quantize_and_save, tune_job, tune_run
from .config import NO_EFFECT_KEYS, Config, load_config, stage_of
from .doctor import blocking, diagnose, render
from .evaluation import evaluate_run
from .report import write_report

OWNED = ("stages", "quantized", "tune", "export", "eval.json", "report")


@dataclass
class Pipeline:
    cfg: Config
    out: Path
    progress: bool = True

    @property
    def stages_dir(self) -> Path:
        return self.out / "stages"

    def record_path(self, stage: str) -> Path:
        return self.stages_dir / f"{stage}.json"

    def done(self, stage: str) -> bool:
        return self.record_path(stage).is_file()

    def finish(self, stage: str, summary: dict[str, Any]) -> None:
        atomic_write_text(self.record_path(stage), json.dumps({"stage": stage, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **summary}, indent=2))

    @property
    def final(self) -> Path:
        return self.out / "final"

    def tuned(self) -> Config:
        """The config with the fine-tuned model as the source: what quantize, export and eval read."""
        model = ModelConfig(name_or_path=str(self.final), dtype=self.cfg.model.dtype)
        return dataclasses.replace(self.cfg, model=model)


# -- the stages


def stage_train(p: Pipeline) -> dict[str, Any]:
    cfg = dataclasses.replace(p.cfg, training=dataclasses.replace(p.cfg.training, resume_from_checkpoint=True))
    if not _finished_training(p):  # killed after final/ was published but before this stage's record: keep it
        fit(cfg)
    state = json.loads((p.final / "trainer_state.json").read_text())
    return {"steps": state["step"], "final": str(p.final)}


def _finished_training(p: Pipeline) -> bool:
    saved = p.final / "config.yaml"
    if not (p.final / "trainer_state.json").is_file() or not saved.is_file():
        return False
    changed = [k for k in diff_configs(read_yaml(saved), p.cfg.training_part()) if k not in NO_EFFECT_KEYS]
    return not changed


def stage_quantize(p: Pipeline) -> dict[str, Any]:
    out = quantize_and_save(p.tuned(), overwrite=True, progress=p.progress)
    meta = json.loads((out / "qaft_quant.json").read_text())
    return {"dir": str(out), "method": meta["method"], "quantize_seconds": meta["seconds"]}


def stage_tune(p: Pipeline) -> dict[str, Any]:
    cfg = p.tuned()
    if cfg.tune.steps == 0:
        return {"skipped": "tune.steps is 0"}
    final = cfg.tune_dir / "final"
    if not _tuned(final, cfg):  # killed after final/ was published but before this stage's record: keep it
        tune_run(cfg, overwrite=False, resume=True)
    state = json.loads((final / "trainer_state.json").read_text())
    return {"steps": state["step"], "final": str(final)}


def _tuned(final: Path, cfg: Config) -> bool:
    """``final/`` holds a finished tuning of this config from this post-pass result (the run's record matches)."""
    saved = final / "config.yaml"
    if not (final / "trainer_state.json").is_file() or not saved.is_file():
        return False
    changed = [k for k in diff_configs(read_yaml(saved), tune_job(cfg).training_part()) if k not in NO_EFFECT_KEYS and not k.startswith("training.")]
    return not changed


def stage_export(p: Pipeline) -> dict[str, Any]:
    out, manifest = export_run(p.tuned(), overwrite=True, progress=p.progress)
    return {"dir": str(out), "parity": manifest["parity"], "sizes": manifest["sizes"]}


def stage_eval(p: Pipeline) -> dict[str, Any]:
    report = evaluate_run(p.cfg, p.tuned(), p.out, progress=p.progress)
    atomic_write_text(p.out / "eval.json", json.dumps(report, indent=2))
    return {"rows": len(report["rows"])}


def stage_report(p: Pipeline) -> dict[str, Any]:
    folder = write_report(p.out)
    return {"dir": str(folder)}


RUNNERS: dict[str, Callable[[Pipeline], dict[str, Any]]] = {
    "train": stage_train,
    "quantize": stage_quantize,
    "tune": stage_tune,
    "export": stage_export,
    "eval": stage_eval,
    "report": stage_report,
}


# -- bookkeeping


def first_invalid_stage(saved: dict[str, Any], current: dict[str, Any]) -> tuple[str, list[str]] | None:
    """The earliest stage whose inputs changed between the saved and the current config, with the keys."""
    changed = [k for k in diff_configs(saved, current) if k not in NO_EFFECT_KEYS]
    for stage in STAGES:
        keys = [k for k in changed if stage_of(k.split(".")[0]) == stage]
        if keys:
            return stage, keys
    return None


def prepare(cfg: Config, *, overwrite: bool, start: str | None) -> Pipeline:
    """Check the folder against the run's own record; clear or trim it as asked. Read-only unless asked."""
    p = Pipeline(cfg, Path(cfg.training.output_dir))
    saved_file = p.stages_dir / "run.yaml"
    ours = saved_file.is_file()
    foreign = [n for n in (*TRAIN_OWNED, *OWNED) if (p.out / n).exists()] + [c.name for c in list_checkpoints(p.out)]
    if overwrite:  # qaft train's own clean-up (checkpoints, final/, metrics, temps), then the later stages' outputs
        prepare_output_dir(dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, resume_from_checkpoint=None)), overwrite=True, clear=True)
        for name in OWNED:
            path = p.out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        ours = False
    elif not ours and foreign:
        raise CheckpointError(
            f"training.output_dir: {p.out} holds outputs not written by `qaft run` ({', '.join(sorted(foreign)[:4])}); "
            "pass --overwrite to replace them or choose another output_dir"
        )
    if ours:
        saved = read_yaml(saved_file)
        bad = first_invalid_stage(saved, to_plain(cfg))
        if bad is not None:
            stage, keys = bad
            already = [s for s in STAGES[STAGES.index(stage) :] if p.done(s)]
            redo_from = start is not None and STAGES.index(start) <= STAGES.index(stage)
            if already and not redo_from:
                raise CheckpointError(
                    f"config changed since stage {stage!r} finished ({', '.join(keys[:4])}); "
                    f"rerun with --from {stage} to redo it and what follows, or --overwrite to start over"
                )
    if start is not None:
        if start == "train" and ours:
            raise CheckpointError("--from train: retraining replaces the checkpoints and final/; use --overwrite for that")
        for s in STAGES[STAGES.index(start) :]:
            p.record_path(s).unlink(missing_ok=True)
    p.stages_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved_file, yaml.safe_dump(to_plain(cfg), sort_keys=False))
    return p


def run(
    config: str | Path, overrides: list[str], *, overwrite: bool = False, start: str | None = None, launch: Any = None, echo: Callable[[str], None] = print
) -> Pipeline:
    """``qaft run``: the doctor first (exit 2 on a blocking problem), then every stage not yet done."""
    cfg = load_config(config, overrides)
    if start is not None and start not in STAGES:
        raise PreflightError(f"--from: got {start!r}, expected one of {', '.join(STAGES)}")
    rows = diagnose(config, overrides, launch)
    bad = blocking(rows)
    if bad:
        raise PreflightError("qaft doctor found blocking problems:\n" + render(bad))
    with held_folders(cfg, (cfg.quantized_dir, "postpass.output_dir"), (cfg.tune_dir, "tune.output_dir"), (cfg.export_dir, "export.dir")):
        p = prepare(cfg, overwrite=overwrite, start=start)
        for stage in STAGES:
            if p.done(stage):
                echo(f"qaft run: {stage}: done earlier, skipped")
                continue
            echo(f"qaft run: {stage} ...")
            t0 = time.perf_counter()
            with memory.Peak() as peak:
                summary = RUNNERS[stage](p)
            took = {"seconds": time.perf_counter() - t0, **peak.reading()}
            p.finish(stage, {**summary, **took})
            echo(f"qaft run: {stage}: done in {took['seconds']:.0f} s, peak RSS {took['peak_rss_gib']:.2f} GiB")
    echo(f"qaft run: report in {p.out / 'report' / 'index.html'}")
    return p

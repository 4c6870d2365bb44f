"""The bodies of ``qaft quantize``, ``qaft export`` and ``qaft eval``: the root config resolved into the
arguments of the packages that do the work (defaults that read other sections live here, in ``Config``)."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from qaft.core import text
from qaft.core.errors import CheckpointError, ConfigError, DataError, PreflightError
from qaft.core.hardware import precision
from qaft.core.io import ensure_writable
from qaft.core.lock import output_locks
from qaft.core.model import load_model_and_tokenizer
from qaft.core.typed import to_plain
from qaft.eval.compare import evaluate_methods, needs_calibration
from qaft.eval.perplexity import perplexity
from qaft.export.exporter import check_destination, export, load_export
from qaft.export.formats import of_folder
from qaft.quant.calibrate import calibration_ids, calibration_record
from qaft.quant.methods import of_config, resolve
from qaft.quant.postpass import quantize_model
from qaft.quant.store import META, save_quantized
from qaft.trainer.checkpoint import check_resumable, latest_checkpoint
from qaft.trainer.config import DataConfig, TrainingConfig
from qaft.trainer.loop import fit
from qaft.trainer.tune import Distill, TuneJob

from .config import Config


def held_folders(cfg: Config, *own: tuple[Path, str]) -> contextlib.AbstractContextManager[None]:
    """The output-folder locks a writing command holds: the run folder (``training.output_dir``; one qaft command
    per run folder at a time) and each of its own folders (``(path, config key)``) that lies outside it."""
    run_dir = Path(cfg.training.output_dir).absolute()
    outside = [(f, k) for f, k in own if run_dir not in Path(f).absolute().parents and Path(f).absolute() != run_dir]
    return output_locks([(run_dir, "training.output_dir"), *outside])


def calibration_of(cfg: Config, tokenizer: Any) -> torch.Tensor:
    """The calibration windows the config names (``postpass.calibration_*``, text defaulting to ``data.path``)."""
    p = cfg.postpass
    return calibration_ids(cfg.calibration_path, tokenizer, p.calibration_samples, p.calibration_seq_len)


def run_method(model: torch.nn.Module, calib: torch.Tensor, cfg: Config, method: str, progress: bool = True) -> list:
    """Quantize ``model`` in place with the ``--methods`` name ``method`` under the config's scheme and post-pass settings."""
    return quantize_model(model, calib, cfg.quant, cfg.postpass, method=resolve(method, cfg.postpass), progress=progress)[0]


def quantize_and_save(cfg: Config, *, overwrite: bool, progress: bool = True) -> Path:
    """``qaft quantize``: the configured post-pass on ``model.name_or_path``, saved with ``store.save_quantized``."""
    p, out = cfg.postpass, cfg.quantized_dir
    ensure_writable(out, overwrite, key="postpass.output_dir")  # before the model load; save_quantized checks again
    model, tok = load_model_and_tokenizer(cfg.model)
    calib = calibration_of(cfg, tok)
    t0 = time.perf_counter()
    reports, _ = quantize_model(model, calib, cfg.quant, p, progress=progress)
    meta = {
        **postpass_settings(cfg),
        "calibration": calibration_record(cfg.calibration_path, calib),
        "seconds": time.perf_counter() - t0,
        "layers": [asdict(r) for r in reports],
    }
    return save_quantized(model, tok, out, cfg.quant, meta, overwrite=overwrite)


def describe_result(cfg: Config, layers: list[dict[str, Any]]) -> str:
    """One line for ``qaft quantize``: the scheme and method, and what the bits budget chose (ranks, formats)."""
    p = cfg.postpass
    line = f"{cfg.quant.label}, {p.quantizer.name} + {p.reconstructor.name if p.reconstructor else 'none'}"
    if p.budget_bpw is None:
        return f"{line} (rank {p.rank if p.reconstructor else 0})"
    weights = [r["shape"][0] * r["shape"][1] for r in layers]
    spent = sum(r["stored_bpw"] * w for r, w in zip(layers, weights)) / sum(weights)
    ranks = sorted(r["rank"] for r in layers)
    line += f", {spent:.3f} bits/weight within the budget {p.budget_bpw:g}: ranks {ranks[0]}–{ranks[-1]} (median {ranks[len(ranks) // 2]})"
    if p.budget_formats:
        counts = Counter(r["weight_format"] for r in layers)
        line += ", formats " + ", ".join(f"{label} × {n}" for label, n in sorted(counts.items()))
    return line


def postpass_settings(cfg: Config) -> dict[str, Any]:
    """What a post-pass result records of the settings that made it, beside its scheme and calibration tokens."""
    p, method = cfg.postpass, of_config(cfg.postpass)
    return {
        "method": method.label,
        "rank": p.rank if method.reconstructor else 0,
        "factor_bits": p.factor_bits if method.reconstructor else None,
        "quantizer": to_plain(method.quantizer),
        "reconstructor": to_plain(method.reconstructor),
        "source_model": cfg.model.name_or_path,
        "randomized_svd": p.randomized_svd,
    }


def check_export_destination(cfg: Config, overwrite: bool) -> None:
    """``qaft quantize --export`` fails before the post-pass, not after it."""
    check_destination(cfg.export, cfg.quant, cfg.export_dir, overwrite)


def export_run(cfg: Config, *, overwrite: bool, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """``qaft export``: the tuned result (``tune.steps`` > 0) or the post-pass result → ``export.dir``."""
    src = cfg.export_source
    if cfg.tune.steps and not (src / META).is_file():
        raise CheckpointError(
            f"export: tune.steps is {cfg.tune.steps} but there is no tuned result at {src}; run `qaft tune CONFIG` first, "
            "or export the post-pass result as solved with tune.steps=0"
        )
    return export(src, cfg.export_dir, cfg.export, source=cfg.model, protocol=cfg.eval, overwrite=overwrite, progress=progress)


def tune_job(cfg: Config) -> TuneJob:
    """The root config resolved into one tuning run: the teacher is ``model``, the text ``tune.data`` (default:
    the calibration text), the loop's folder ``tune.output_dir``, the start ``postpass.output_dir``."""
    t = cfg.tune
    text_path = t.data or cfg.calibration_path
    if cfg.eval.path and text.same_source(text_path, cfg.eval.path):
        raise ConfigError(f"tune.data: {text_path} is the evaluation text; tune on other text (e.g. WikiText-2 validation, the calibration text)")
    training = TrainingConfig(
        output_dir=str(cfg.tune_dir),
        per_device_train_batch_size=t.batch_size,
        # one held-out block at a time: evaluation holds the student's and the teacher's full-vocabulary logits at
        # once, which for block tuning (whose steps hold none) would be the run's peak memory
        per_device_eval_batch_size=1,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        max_steps=max(t.steps, 1),
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_ratio=t.warmup_ratio,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        eval_steps=t.eval_steps,
        eval_on_start=True,
        save_steps=t.save_steps,
        save_total_limit=1,
        seed=cfg.training.seed,
        bf16=t.bf16,  # resolved by the loop, which says why in its header
        gradient_checkpointing=t.gradient_checkpointing,
        resume_from_checkpoint=cfg.training.resume_from_checkpoint,
    )
    data = DataConfig(path=text_path, text_column=cfg.data.text_column, block_size=t.seq_len, eval_fraction=t.eval_fraction, max_eval_blocks=t.max_eval_blocks)
    return TuneJob(
        model=cfg.model, data=data, training=training, quant=cfg.quant, callbacks=t.callbacks, tune=t, source=str(cfg.quantized_dir), rank=cfg.postpass.rank
    )


def tune_run(cfg: Config, *, overwrite: bool, resume: bool = False) -> Path:
    """``qaft tune``: the post-pass result's factors trained against the float model; returns the tuned folder.

    ``resume`` (``qaft run``'s stage, which owns the folder): continue from the newest checkpoint when it
    is this job's, and start over when it was made with another config or from another post-pass result."""
    if cfg.tune.steps == 0:
        raise ConfigError("tune.steps: 0 means no tuning; set the number of steps, e.g. tune.steps=200")
    job = tune_job(cfg)
    task = Distill(job)
    if resume:
        last = latest_checkpoint(cfg.tune_dir)
        try:
            if last is not None:
                check_resumable(last, job, task.trainable)
            job = dataclasses.replace(job, training=dataclasses.replace(job.training, resume_from_checkpoint=True))
        except CheckpointError:
            overwrite = True
    return fit(job, overwrite=overwrite, task=task)


def check_eval_inputs(cfg: Config) -> str:
    """The evaluation text exists and is not the calibration text; returns it."""
    if cfg.eval.path is None:
        raise ConfigError("eval.path: not set; give the evaluation text, e.g. eval.path=wikitext-2-raw/wiki.test.raw")
    if not text.is_builtin(cfg.eval.path) and not Path(cfg.eval.path).is_file():
        raise DataError(f"eval.path: file {cfg.eval.path!r} does not exist")
    if text.same_source(cfg.calibration_path, cfg.eval.path):
        raise ConfigError("postpass.calibration_path: the calibration text is the evaluation text; calibrate on other data (e.g. WikiText-2 validation)")
    return cfg.eval.path


def export_rows(folder: str | Path, cfg: Config, progress: bool, runtime: str | None = None) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """Perplexity of an export folder (hashes checked first) reloaded by its Python reader: ``export-base`` (factors off)
    and ``export``; with ``runtime`` (``llama.cpp``) also run by that program on the same token ids."""
    fmt = of_folder(Path(folder))
    if runtime is not None and fmt.runtime != runtime:
        raise ConfigError(f"--runtime {runtime}: {folder} is a {fmt.name} export, which {runtime} does not read; export with export.format=gguf")
    why = fmt.runtime_missing() if runtime else None
    if why:
        raise PreflightError(f"--runtime {runtime}: {why}")
    exported, tok, record = load_export(folder)
    ids = text.token_stream(cfg.eval.path, tok, key="eval.path")
    rows = {"export-base": True, "export": False} if hasattr(exported, "disable_adapter") else {"export": False}
    results = {}
    for name, factors_off in rows.items():
        with exported.disable_adapter() if factors_off else contextlib.nullcontext():
            r = perplexity(exported, ids, cfg.eval.seq_len, cfg.eval.windows, progress=progress)
        results[name] = {"ppl": r.ppl, "seconds": r.seconds, "eval_seconds": r.seconds, "manifest_verified": True, "layers": []}
    info = {"path": str(folder), "scheme": record["scheme_label"], "method": record["method"], "manifest_verified": True}
    if runtime is not None:
        check = fmt.runtime_check(Path(folder), text.windows_of(ids, cfg.eval.seq_len, cfg.eval.windows), (exported, tok))
        for name, row in check.pop("rows").items():
            results[name] = row | {"eval_seconds": row["seconds"], "manifest_verified": True, "layers": []}
        info["runtime_check"] = check
    return results, info, ids


def compare(cfg: Config, methods: list[str], *, export: str | Path | None = None, runtime: str | None = None, progress: bool = True) -> dict[str, Any]:
    """``qaft eval``: perplexity of each method on the model (and of an export folder, also run by ``runtime``), on one protocol."""
    eval_path = check_eval_inputs(cfg)
    if runtime is not None and export is None:
        raise ConfigError(f"--runtime {runtime}: runs an export's files; give the folder with --export DIR")
    results: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    ids = None
    if export is not None:
        results, extra["export"], ids = export_rows(export, cfg, progress, runtime)
    if methods:
        model, tok = load_model_and_tokenizer(cfg.model)
        ids = text.token_stream(eval_path, tok, key="eval.path")
        calib = calibration_of(cfg, tok) if needs_calibration(methods) else None
        results |= evaluate_methods(model, ids, calib, cfg.quant, cfg.postpass, methods, cfg.eval, progress)
    return {"protocol": protocol_of(cfg, eval_path, ids), "results": results, **extra}


def protocol_of(cfg: Config, eval_path: str, ids: torch.Tensor) -> dict[str, Any]:
    """The record of what a perplexity table was measured on (windows actually taken from ``ids``, the scheme, the calibration)."""
    r = text.windows_of(ids, cfg.eval.seq_len, cfg.eval.windows)
    p = cfg.postpass
    protocol = {
        "model": cfg.model.name_or_path,
        "eval_path": str(eval_path),
        "windows": r.shape[0],
        "seq_len": r.shape[1],
        "tokens": r.shape[0] * (r.shape[1] - 1),
        "bos": text.bos_first(ids),
        "scheme": cfg.quant.label,
        "rank": p.rank,
        "energy": p.energy,
        "factor_bits": p.factor_bits,
        "svd": "randomized" if p.randomized_svd else "exact",
        "calibration": {
            "path": cfg.calibration_path,
            "samples": p.calibration_samples,
            "seq_len": p.calibration_seq_len,
            "propagation": p.propagate.value,  # quantized: each method's later layers on its own stream; float: statistics shared
            "forwards": precision(p.bf16),
        },
        "quantizer": to_plain(p.quantizer),
        "reconstructor": to_plain(p.reconstructor),  # the options every method of the same name used
    }
    return protocol

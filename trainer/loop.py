"""The training loop: ``build_*`` helpers, then one ``train`` function you can read top to bottom.

Logging, evaluation and saving are visible ``if``s in ``train``; any other behaviour arrives as a
callback. One optimizer step = ``gradient_accumulation_steps`` micro-batches on every process,
so ``max_steps`` means the same thing on one CPU or eight GPUs. The scheduler is stepped by us
once per optimizer step (accelerate's wrapper would step it once per process).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs, set_seed

from qaft.callbacks import CallbackList, Context, TrainState, create
from qaft.core import memory
from qaft.core.errors import DivergedError, Preempted, PreflightError
from qaft.core.hardware import precision, resolve_bf16
from qaft.core.logits import head_of, next_token_losses

from .checkpoint import install_adapter_only_hooks, latest_checkpoint, load_checkpoint, save_checkpoint, save_final
from .config import TrainConfig, TrainingConfig
from .data import build_blocks, eval_loader, load_documents, train_loader
from .metrics import MetricsLogger, Throughput
from .outputs import prepare_output_dir
from .parallel import FSDP_REFUSED, check_launch, fill_deepspeed_config, launched_with, skip_inference_comm_build, zero_stage
from .preempt import StopRequests
from .task import FineTune, Task


@dataclass
class Loaders:
    train: Any
    eval: Any | None


def build_accelerator(t: TrainingConfig) -> Any:
    for tracker in t.report_to:
        if tracker == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise PreflightError("training.report_to: tensorboard is not installed; run `pip install 'qaft[tensorboard]'` or drop it from report_to")
    if launched_with("FSDP"):
        raise PreflightError(FSDP_REFUSED)
    plugin = GradientAccumulationPlugin(num_steps=t.gradient_accumulation_steps, sync_with_dataloader=False)
    # One process may run several stages, each with its own precision (`qaft run`: train in float32, then tune in
    # bf16); accelerate keeps one global state and refuses a second precision, so drop it. The process group
    # (PartialState) stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    if launched_with("DEEPSPEED"):
        skip_inference_comm_build()
    try:
        acc = Accelerator(
            gradient_accumulation_plugin=plugin,
            mixed_precision="bf16" if resolve_bf16(t.bf16)[0] else "no",
            kwargs_handlers=process_group_kwargs(),
            log_with=list(t.report_to) or None,
            project_dir=str(Path(t.output_dir) / "runs"),  # trackers write under runs/
        )
    except (ValueError, ImportError) as e:  # accelerate's verdict on the launch configuration (DeepSpeed/FSDP plugin checks)
        raise PreflightError(f"launch: accelerate refuses this launch configuration: {' '.join(str(e).split())[:400]}") from None
    fill_deepspeed_config(acc, t.max_grad_norm, t.gradient_accumulation_steps)
    install_adapter_only_hooks(acc)
    return acc


def process_group_kwargs() -> list:
    """gloo for DeepSpeed on a machine without GPUs: accelerate picks no backend there, and every rank
    would believe it is alone while DeepSpeed's own world has them all (its batch check then fails)."""
    if launched_with("DEEPSPEED") and not torch.cuda.is_available():
        return [InitProcessGroupKwargs(backend="gloo")]
    return []


def build_optimizer(groups: list[dict[str, Any]], t: TrainingConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=t.learning_rate, weight_decay=t.weight_decay)


def total_steps(t: TrainingConfig, micro_batches_per_epoch: int) -> int:
    if t.max_steps > 0:
        return t.max_steps
    return max(1, math.ceil(t.num_train_epochs * micro_batches_per_epoch / t.gradient_accumulation_steps))


def micro_batches(acc: Any, loader: Any, start: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Endless ``(epoch, batch)`` stream for this process, starting after ``start`` consumed micro-batches."""
    epoch, skip = divmod(start, len(loader))
    while True:
        it = acc.skip_first_batches(loader, skip) if skip else loader
        it.set_epoch(epoch)
        for batch in it:
            yield epoch, batch
        epoch, skip = epoch + 1, 0


def evaluate_and_log(ctx: Context, callbacks: CallbackList, loader: Any, log: MetricsLogger, task: Task) -> None:
    """Eval metrics plus whatever the task and the callbacks add, logged as one ``eval`` event at the current step.

    Under a forked CPU RNG: iterating a DataLoader draws a seed from the global generator, so without the fork an
    eval would change the dropout masks of every later step, and the trained adapter would depend on ``eval_steps``."""
    memory.release()  # what training freed, before evaluation's logits
    with torch.random.fork_rng(devices=[]):
        metrics = evaluate(ctx, loader, task)
        extra = callbacks.on_evaluate(ctx, metrics)
    memory.release()  # and what evaluation freed, before the next steps
    log.log("eval", ctx.state.step, metrics | extra)


@torch.no_grad()
def evaluate(ctx: Context, loader: Any, task: Task | None = None) -> dict[str, float]:
    """Mean next-token NLL over every eval token (all processes), its perplexity, and the task's own metrics."""
    ctx.model.eval()
    values: dict[str, list[torch.Tensor]] = {}
    for batch in loader:
        ids = batch["input_ids"]
        head = head_of(ctx.model, ids)  # the next-token loss in chunks of positions, not from the whole logits
        for k, v in {"eval_loss": head.chunks(next_token_losses, ids[:, 1:]).mean(1), **(task.eval_terms(batch, head) if task else {})}.items():
            values.setdefault(k, []).append(ctx.accelerator.gather_for_metrics(v))
    means = {k: torch.cat(v).mean().item() for k, v in values.items()}
    return {**means, **{f"{k.removesuffix('_loss')}_ppl": math.exp(min(v, 50.0)) for k, v in means.items() if k.endswith("_loss")}}


def train(
    ctx: Context, cfg: TrainConfig, callbacks: CallbackList, loaders: Loaders, scheduler: Any, log: MetricsLogger, task: Task | None = None
) -> TrainState:
    """Run optimizer steps until ``ctx.state.max_steps``; returns the final state."""
    acc, model, opt, st, t = ctx.accelerator, ctx.model, ctx.optimizer, ctx.state, cfg.training
    task = task or FineTune()
    params = [p for p in model.parameters() if p.requires_grad]
    batches = micro_batches(acc, loaders.train, st.micro_batches)
    meter, sums, latest = Throughput(), {}, {}  # sums: loss terms, latest: callback metrics, since the last log event
    callbacks.on_train_begin(ctx)
    if loaders.eval is not None and t.eval_on_start and st.step == 0:
        evaluate_and_log(ctx, callbacks, loaders.eval, log, task)
    with StopRequests(t.save_on_signal) as stops:
        while st.step < st.max_steps:
            model.train()
            callbacks.on_step_begin(ctx)
            step_sums: dict[str, Any] = {}
            for _ in range(t.gradient_accumulation_steps):
                st.epoch, batch = next(batches)
                with acc.accumulate(model):
                    out = task.forward(model, batch, st.step)
                    terms = {"loss": task.loss(batch, out), **callbacks.loss_terms(ctx, batch, out)}
                    acc.backward(sum(terms.values()))  # accelerate divides by the accumulation steps
                for k, v in terms.items():  # detached tensors: no device sync per micro-batch
                    step_sums[k] = step_sums.get(k, 0.0) + v.detach().float() / t.gradient_accumulation_steps
                del out, terms  # the logits: not held through the optimizer step, an eval, or the next forward
                st.micro_batches += 1
            callbacks.on_gradients(ctx)
            grad_norm = acc.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else math.inf)  # inf: measure only
            if grad_norm is not None and not math.isfinite(float(grad_norm)):
                skip_nonfinite_step(ctx, t, log, float(grad_norm))
                continue
            for k, v in step_sums.items():
                sums[k] = sums.get(k, 0.0) + v
            opt.step()
            scheduler.step()
            opt.zero_grad(set_to_none=True)
            tokens = t.gradient_accumulation_steps * batch["input_ids"].numel() * acc.num_processes
            st.step, st.tokens_seen = st.step + 1, st.tokens_seen + tokens
            meter.add(tokens)
            latest |= callbacks.on_step_end(ctx)
            log.progress(st.step)
            if st.step % t.logging_steps == 0 or st.step == st.max_steps:
                timing = meter.lap()
                n = timing.pop("steps")  # steps in this window: fewer than logging_steps right after a resume
                row = {k if k == "loss" else f"loss/{k}": (v / n).item() for k, v in sums.items()}
                row |= {"lr": scheduler.get_last_lr()[0], "epoch": st.epoch, "tokens_seen": st.tokens_seen, **timing, **latest}
                if grad_norm is not None:
                    row["grad_norm"] = float(grad_norm)
                if st.skipped_steps:
                    row["skipped_steps"] = st.skipped_steps
                log.log("train", st.step, row)
                log.progress(st.step, loss=row["loss"], lr=row["lr"], tok_s=row["tokens_per_s"])
                sums, latest = {}, {}
            if loaders.eval is not None and ((t.eval_steps and st.step % t.eval_steps == 0) or st.step == st.max_steps):
                evaluate_and_log(ctx, callbacks, loaders.eval, log, task)
            saved = bool(t.save_steps) and st.step % t.save_steps == 0
            if saved:
                save_checkpoint(ctx, callbacks, cfg, t.save_total_limit, task.trainable)
            signum = stops.agreed(acc)
            if signum is not None:
                stop_on_signal(ctx, cfg, callbacks, log, task, signum, saved)
    callbacks.on_train_end(ctx)
    return st


def stop_on_signal(ctx: Context, cfg: TrainConfig, callbacks: CallbackList, log: MetricsLogger, task: Task, signum: int, saved: bool) -> None:
    """The step is done: checkpoint it (unless this step just did), log ``preempted``, stop with 128 + ``signum``."""
    st, name = ctx.state, signal.Signals(signum).name
    path = Path(cfg.training.output_dir) / f"checkpoint-{st.step}"
    if not saved:
        path = save_checkpoint(ctx, callbacks, cfg, cfg.training.save_total_limit, task.trainable)
    log.log("preempted", st.step, {"signal": name, "checkpoint": path.name})
    raise Preempted(
        f"stopped by {name} after step {st.step} of {st.max_steps}; {path} holds every step so far: resume with training.resume_from_checkpoint=true",
        signum,
    )


def skip_nonfinite_step(ctx: Context, t: TrainingConfig, log: MetricsLogger, grad_norm: float) -> None:
    """Drop this step's gradients (no update, no scheduler step, ``step`` not advanced; the data moves on),
    count it, and stop the run past ``training.max_nonfinite_steps``. Decided on the global gradient norm,
    which every rank shares, so ranks never disagree on skipping. Under DeepSpeed the engine stepped
    inside backward already: the weights may hold the bad update, so the first one stops the run."""
    acc, st = ctx.accelerator, ctx.state
    ctx.optimizer.zero_grad(set_to_none=True)
    st.skipped_steps += 1
    log.log("nonfinite", st.step + 1, {"grad_norm": grad_norm, "skipped_steps": st.skipped_steps})
    engine = zero_stage(acc) is not None
    if engine or st.skipped_steps > t.max_nonfinite_steps:
        last = latest_checkpoint(t.output_dir)
        why = (
            "under DeepSpeed the engine applied that update before it could be checked"
            if engine
            else f"{st.skipped_steps} steps skipped, more than training.max_nonfinite_steps={t.max_nonfinite_steps}"
        )
        raise DivergedError(
            f"training: non-finite gradient norm ({grad_norm}) at step {st.step + 1}; {why}. Newest checkpoint, intact: "
            f"{last or 'none'}. Lower training.learning_rate or training.max_grad_norm and start again"
            + ("" if engine else ", or raise the limit and resume (training.resume_from_checkpoint=true)")
        )


@dataclass
class Session:
    """Everything ``train`` needs, built once (benchmarks and ``qaft run`` reuse it)."""

    ctx: Context
    cfg: TrainConfig
    task: Task
    callbacks: CallbackList
    loaders: Loaders
    scheduler: Any
    tokenizer: Any
    resume_from: Path | None
    summary: str


def setup(cfg: TrainConfig, *, overwrite: bool = False, task: Task | None = None) -> Session:
    """Validate outputs, load data, build the task's model, prepare with accelerate, restore a checkpoint."""
    task = task or FineTune()
    t = cfg.training
    resume_from = prepare_output_dir(cfg, overwrite=overwrite, clear=False)  # read-only checks first
    documents = load_documents(cfg.data)  # before the model: a bad path should fail in a second, not after a model load
    acc = build_accelerator(t)
    check_launch(cfg.callbacks, acc)  # before the model load: a refused callback should fail in seconds
    task.check(cfg, acc)
    set_seed(t.seed)
    model, tokenizer = task.build(cfg)
    memory.release()  # loading's temporaries
    blocks = build_blocks(cfg.data, tokenizer, documents)
    train_dl = train_loader(blocks.train, t.per_device_train_batch_size, t.seed)
    eval_dl = eval_loader(blocks.eval, t.per_device_eval_batch_size) if len(blocks.eval) else None
    opt = build_optimizer(task.param_groups(model, t), t)
    model, opt, train_dl = acc.prepare(model, opt, train_dl)
    eval_dl = acc.prepare(eval_dl) if eval_dl is not None else None
    task.ready(acc)
    if len(train_dl) == 0:
        raise PreflightError(
            f"data: {len(blocks.train)} training blocks fill no batch of {t.per_device_train_batch_size} x {acc.num_processes} processes; "
            "lower training.per_device_train_batch_size or data.block_size"
        )
    state = TrainState(max_steps=total_steps(t, len(train_dl)))
    scheduler = task.scheduler(opt, t, state.max_steps)
    acc.register_for_checkpointing(scheduler)
    callbacks = CallbackList([create(spec, seed=t.seed, rank=acc.process_index) for spec in cfg.callbacks])
    ctx = Context(
        accelerator=acc, model=model, optimizer=opt, scheme=cfg.quant, seed=t.seed, output_dir=Path(t.output_dir), state=state, probe_blocks=blocks.train
    )
    if acc.is_main_process:
        prepare_output_dir(cfg, overwrite=overwrite, clear=True)
    acc.wait_for_everyone()
    if resume_from is not None:
        ctx = dataclasses.replace(ctx, state=load_checkpoint(ctx, callbacks, cfg, resume_from, task.trainable))
        state = ctx.state
    summary = (
        f"{task.verb}: {cfg.model.name_or_path} | {len(blocks.train)} train / {len(blocks.eval)} eval blocks of {cfg.data.block_size} tokens | "
        f"{state.max_steps} steps x {t.per_device_train_batch_size * t.gradient_accumulation_steps * acc.num_processes} blocks | "
        f"{acc.num_processes} process(es) on {acc.device}, {precision(t.bf16)} | torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
        + (f" | resumed from {resume_from.name} (step {state.step})" if resume_from else "")
    )
    return Session(ctx, cfg, task, callbacks, Loaders(train_dl, eval_dl), scheduler, tokenizer, resume_from, summary)


def fit(cfg: TrainConfig, *, overwrite: bool = False, task: Task | None = None) -> Path:
    """``qaft train`` (or another task's verb): set up, resume if asked, train, write ``final/``. Returns its path."""
    s = setup(cfg, overwrite=overwrite, task=task)
    acc, state, t = s.ctx.accelerator, s.ctx.state, cfg.training
    if t.report_to:
        acc.init_trackers("qaft")
    log = MetricsLogger(acc, t.output_dir, start_step=state.step, total_steps=state.max_steps, append=s.resume_from is not None)
    log.echo(s.summary)
    if s.resume_from is not None:
        log.log("resume", state.step, {"checkpoint": str(s.resume_from)})
    try:
        train(s.ctx, cfg, s.callbacks, s.loaders, s.scheduler, log, s.task)
        final = save_final(s.ctx, cfg, s.ctx.state, lambda model, folder: s.task.write_final(model, s.tokenizer, folder))
        log.echo(s.task.done(state.step, final))
    finally:
        log.close()
    return final

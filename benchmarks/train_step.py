"""Seconds per optimizer step, tokens/s and peak RSS of LoRA training, and the cost of the callback protocol.

Drives the real ``setup()`` + ``train()`` of ``qaft.trainer.loop``: one model load, then interleaved
rounds of steps with no callbacks (A) and with a list of no-op callbacks (B), so machine noise hits
both alike; the overhead is reported as the ratio of median step times measured in the same run.

    .venv/bin/python benchmarks/train_step.py                       # SmolLM2-135M, r 8 all-linear, 512 x 4
    .venv/bin/python benchmarks/train_step.py --model tiny-llama --seq 64 --rounds 2

Writes ``benchmarks/results/train_step.json``. Never run it beside another CPU-heavy process
(tests included): on 2 cores the two fight for the same cores and both timings come out several times too slow.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does, before torch loads

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from qaft.callbacks import Callback, CallbackList
from qaft.pipeline.config import config_from_dict
from qaft.trainer.loop import setup, train
from qaft.trainer.metrics import MetricsLogger

ROOT = Path(__file__).resolve().parents[1]
WIKI_VALID = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


class NoOp(Callback):
    """Every hook inherited from the base: measures pure dispatch cost."""

    name = "noop"


def timed_steps(session, callbacks, log, n: int) -> list[float]:
    times = []
    for _ in range(n):
        session.ctx.state.max_steps = session.ctx.state.step + 1
        t0 = time.perf_counter()
        train(session.ctx, session.cfg, callbacks, session.loaders, session.scheduler, log, session.task)
        times.append(time.perf_counter() - t0)
    return times


def dispatch_seconds(callbacks: CallbackList, ctx, accumulation: int, repeats: int = 20_000) -> float:
    """Wall time of every hook the loop calls in one optimizer step, averaged over ``repeats``."""
    t0 = time.perf_counter()
    for _ in range(repeats):
        callbacks.on_step_begin(ctx)
        for _ in range(accumulation):
            callbacks.loss_terms(ctx, {}, None)
        callbacks.on_gradients(ctx)
        callbacks.on_step_end(ctx)
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved A/B rounds")
    ap.add_argument("--steps", type=int, default=2, help="steps per condition per round")
    ap.add_argument("--noops", type=int, default=4, help="no-op callbacks in condition B")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step.json"))
    args = ap.parse_args()

    data = str(WIKI_VALID) if WIKI_VALID.exists() else "python-docs"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_from_dict(
            {
                "model": {"name_or_path": args.model},
                "data": {"path": data, "block_size": args.seq, "eval_fraction": 0.0},
                "lora": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
                "training": {
                    "output_dir": tmp,
                    "per_device_train_batch_size": args.batch,
                    "max_steps": 10_000,
                    "save_steps": 0,
                    "logging_steps": 10_000,
                    "lr_scheduler_type": "constant",
                    "seed": 0,
                },
            }
        )
        t0 = time.perf_counter()
        session = setup(cfg)
        load_s = time.perf_counter() - t0
        log = MetricsLogger(session.ctx.accelerator, tmp, start_step=0, total_steps=0, append=False)
        none, noops = CallbackList(), CallbackList([NoOp(None, generator=torch.Generator()) for _ in range(args.noops)])
        timed_steps(session, none, log, 1)  # warm-up: allocator, first-touch of optimizer state
        a, b = [], []
        for r in range(args.rounds):
            first, second = (none, noops) if r % 2 == 0 else (noops, none)  # alternate who goes first
            ta, tb = timed_steps(session, first, log, args.steps), timed_steps(session, second, log, args.steps)
            (a, b)[first is noops].extend(ta)
            (a, b)[second is noops].extend(tb)
        log.close()
        dispatch = dispatch_seconds(noops, session.ctx, cfg.training.gradient_accumulation_steps)

    med_a, med_b = statistics.median(a), statistics.median(b)
    tokens = args.seq * args.batch
    result = {
        "protocol": {
            "model": args.model,
            "data": data,
            "seq_len": args.seq,
            "batch": args.batch,
            "lora": "r8 alpha16 all-linear",
            "dtype": "float32",
            "rounds": args.rounds,
            "steps_per_round": args.steps,
            "noop_callbacks": args.noops,
        },
        "machine": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "cpu": platform.processor() or platform.machine(),
            "python": sys.version.split()[0],
        },
        "setup_s": load_s,
        "no_callbacks": {"s_per_step": med_a, "tokens_per_s": tokens / med_a, "steps": a},
        "noop_callbacks": {"s_per_step": med_b, "tokens_per_s": tokens / med_b, "steps": b},
        "overhead_ratio": med_b / med_a,
        "dispatch_us_per_step": dispatch * 1e6,
        "dispatch_share_of_step": dispatch / med_a,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        f"\n{args.model}, LoRA r8 all-linear, {args.seq} x {args.batch} tokens, fp32, {result['machine']['threads']} threads, OMP_WAIT_POLICY={result['machine']['omp_wait_policy']}"
    )
    print(f"{'condition':<22}{'s/step (median)':>16}{'tokens/s':>10}   steps")
    for name, key in (("no callbacks", "no_callbacks"), (f"{args.noops} no-op callbacks", "noop_callbacks")):
        r = result[key]
        print(f"{name:<22}{r['s_per_step']:>16.3f}{r['tokens_per_s']:>10.1f}   {' '.join(f'{x:.2f}' for x in r['steps'])}")
    print(f"overhead ratio (B/A, same run): {result['overhead_ratio']:.4f}   setup {load_s:.1f} s   peak RSS {result['peak_rss_gb']:.2f} GB")
    print(f"hook dispatch of {args.noops} no-op callbacks: {dispatch * 1e6:.1f} us per step = {dispatch / med_a:.2e} of a step")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""What bf16 autocast buys on this machine: LoRA step time, qaft beside a bare HF + PEFT loop, the callbacks, eval loss.

One invocation, interleaved rounds (every condition takes one turn per round, the order rotating), so machine
noise hits all conditions alike; speed is reported as ratios of medians measured in the same run.

- ``steps``: SmolLM2-135M LoRA (r 8 all-linear), 2 × 512 tokens per step. With dropout 0.05 (the default before
  this benchmark): qaft float32 (the default before ``training.bf16: auto``), qaft bf16, and a bare HF + PEFT loop
  (the same model, batches, LoRA config, AdamW, clipping) in float32 and bf16 as the anchor. With dropout 0 (the
  default now; on CPU dropout's random draws cost a share of the step that bf16 does not shrink): qaft and bare, bf16.
- ``callbacks``: NPFT, QAT, MAT, temporal distillation steps (dropout 0.05), float32 vs bf16.
- ``postpass``: wall and perplexity of each post-pass method on the protocol, calibration forwards in float32 vs
  bf16 (and ``--baseline``: another checkout's code, e.g. before a change).
- ``eval``: ``qaft eval`` of six methods on the protocol, the whole command's wall (``--baseline``'s code, quantized
  propagation, float propagation with shared statistics), and the calibration of 16 x 512 tokens alone.
- ``quality``: eval loss on 16 held-out blocks after ``--quality-steps`` steps from the same seed (dropout 0),
  float32 vs bf16.

    .venv/bin/python benchmarks/speed.py                       # all parts, ~20 min on 2 cores
    .venv/bin/python benchmarks/speed.py --parts steps --rounds 2
    .venv/bin/python benchmarks/speed.py --parts postpass --baseline /path/to/pkg   # beside another checkout's qaft

Writes ``benchmarks/results/speed.json``. Never run it beside another CPU-heavy process.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does, before torch loads

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from qaft.callbacks import Callback, CallbackList
from qaft.core.hardware import bf16_is_fast, cpu_flags
from qaft.core.model import load_model_and_tokenizer
from qaft.pipeline.config import config_from_dict
from qaft.trainer.loop import evaluate, setup, train
from qaft.trainer.metrics import MetricsLogger

ROOT = Path(__file__).resolve().parents[1]
WIKI_VALID = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
# Per-step cost only: NPFT's Hessian-trace diagnostic runs once at the start and once at the end of training.
CALLBACK_SPECS = {
    "npft": {"name": "npft", "hessian_probes": 0},
    "qat": {"name": "qat"},
    "mat": {"name": "mat", "warmup_steps": 0, "interval": 4},
    "temporal_kd": {"name": "temporal_kd"},
}


class StepClock(Callback):
    """Placed first and last in the callback list: the wall time from the first ``on_step_begin`` to the last
    ``on_step_end``, so one ``train`` call of several steps yields per-step times without its begin/end hooks."""

    name = "step_clock"

    def __init__(self, times: list[float], start: StepClock | None = None, stop_after: int = 0):
        """The first clock: ``StepClock(times)``; the last: ``StepClock(times, first, n)``, which ends the call after n steps."""
        super().__init__(None, generator=torch.Generator())
        self.times, self.start, self.stop_after, self.t0 = times, start, stop_after, 0.0

    def on_step_begin(self, ctx) -> None:
        if self.start is None:
            self.t0 = time.perf_counter()

    def on_step_end(self, ctx) -> dict[str, float]:
        if self.start is not None:
            self.times.append(time.perf_counter() - self.start.t0)
            if len(self.times) == self.stop_after:
                ctx.state.max_steps = ctx.state.step  # ends this train call; the run's own horizon is restored after it
        return {}


def config(tmp: Path, args, *, bf16: bool, dropout: float = 0.05, callbacks: tuple = (), steps: int = 10_000, eval_blocks: int = 0) -> object:
    data = str(WIKI_VALID) if WIKI_VALID.exists() else "python-docs"
    return config_from_dict(
        {
            "model": {"name_or_path": args.model},
            "data": {
                "path": data,
                "block_size": args.seq,
                "eval_fraction": 0.05 if eval_blocks else 0.0,
                **({"max_eval_blocks": eval_blocks} if eval_blocks else {}),
            },
            "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": dropout, "target_modules": "all-linear"},
            "training": {
                "output_dir": str(tmp),
                "per_device_train_batch_size": args.batch,
                "max_steps": steps,
                "save_steps": 0,
                "logging_steps": 10_000,
                "lr_scheduler_type": "constant",
                "learning_rate": 2e-4,
                "seed": 0,
                "bf16": bf16,
            },
            "callbacks": list(callbacks),
        }
    )


class Qaft:
    """qaft's own loop, one optimizer step per call."""

    def __init__(self, cfg, tmp: Path):
        self.s = setup(cfg)
        self.log = MetricsLogger(self.s.ctx.accelerator, tmp, start_step=0, total_steps=0, append=False)

    def step(self, n: int = 1) -> None:
        s = self.s
        s.ctx.state.max_steps = s.ctx.state.step + n  # the loop evaluates at max_steps: once per call
        train(s.ctx, s.cfg, s.callbacks, s.loaders, s.scheduler, self.log, s.task)

    def timed_steps(self, n: int) -> list[float]:
        """``n`` steps in one ``train`` call (after one untimed), each timed by ``StepClock``. The run keeps its long horizon
        (``max_steps`` of the config), so callbacks that schedule work over the run (NPFT's re-scoring rounds)
        do it as they would in a real run, not at every call."""
        times: list[float] = []
        first = StepClock(times)
        last = StepClock(times, first, n + 1)
        s, horizon = self.s, self.s.cfg.training.max_steps
        s.ctx.state.max_steps = horizon
        try:
            train(s.ctx, s.cfg, CallbackList([first, *s.callbacks.callbacks, last]), s.loaders, s.scheduler, self.log, s.task)
        finally:
            s.ctx.state.max_steps = horizon
        return times[1:]  # each call's first step redoes what a run does once in on_train_begin (NPFT re-scores outliers)

    def batches(self, n: int) -> list[dict[str, torch.Tensor]]:
        return [b for b, _ in zip(self.s.loaders.train, range(n))]


class Bare:
    """The loop a user would write with transformers + peft alone: same model, batches, LoRA, AdamW and clipping."""

    def __init__(self, args, batches: list[dict[str, torch.Tensor]], *, bf16: bool, dropout: float = 0.05):
        from qaft.core.model import ModelConfig

        torch.manual_seed(0)
        model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=args.model))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear")).to(self.device).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=2e-4, weight_decay=0.0)
        self.batches, self.bf16 = itertools.cycle([{k: v.to(self.device) for k, v in b.items()} for b in batches]), bf16

    def step(self) -> None:
        batch = next(self.batches)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # qaft's loop syncs when it logs; time finished work in both


Turn = Callable[[int], list[float]]
"""``turn(n)``: run ``n`` steps of one condition, return the seconds of each."""


def each_timed(step: Callable[[], None]) -> Turn:
    """A turn of ``n`` separate calls to ``step``, each timed from outside."""

    def turn(n: int) -> list[float]:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return times

    return turn


def interleaved(turns: dict[str, Turn], rounds: int, steps: int) -> dict[str, list[float]]:
    """Each condition one turn of ``steps`` steps per round, after one warm-up turn of one step; the order
    rotates every round, so machine noise hits every condition alike."""
    for turn in turns.values():
        turn(1)
    names, times = list(turns), {k: [] for k in turns}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name] += turns[name](steps)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {statistics.median(v):.2f}s" for k, v in times.items()), flush=True)
    return times


def summary(times: dict[str, list[float]], baseline: str) -> dict[str, dict]:
    med = {k: statistics.median(v) for k, v in times.items()}
    return {k: {"s_per_step": med[k], "speedup_vs_" + baseline: med[baseline] / med[k], "steps": v} for k, v in times.items()}


def part_steps(args, tmp: Path) -> dict:
    qaft32 = Qaft(config(tmp / "q32", args, bf16=False), tmp / "q32")
    batches = qaft32.batches(4)
    qaft16 = Qaft(config(tmp / "q16", args, bf16=True), tmp / "q16")
    qaft16_nodrop = Qaft(config(tmp / "q16d", args, bf16=True, dropout=0.0), tmp / "q16d")
    bare32, bare16 = Bare(args, batches, bf16=False), Bare(args, batches, bf16=True)
    bare16_nodrop = Bare(args, batches, bf16=True, dropout=0.0)
    conditions = {
        "qaft fp32": each_timed(qaft32.step),
        "qaft bf16": each_timed(qaft16.step),
        "bare HF+PEFT fp32": each_timed(bare32.step),
        "bare HF+PEFT bf16": each_timed(bare16.step),
        "qaft bf16, lora_dropout 0": each_timed(qaft16_nodrop.step),
        "bare HF+PEFT bf16, lora_dropout 0": each_timed(bare16_nodrop.step),
    }
    out = summary(interleaved(conditions, args.rounds, args.steps), "qaft fp32")
    med = {k: v["s_per_step"] for k, v in out.items()}
    return {
        "conditions": out,
        "qaft_over_bare_bf16": med["qaft bf16"] / med["bare HF+PEFT bf16"],
        "qaft_over_bare_fp32": med["qaft fp32"] / med["bare HF+PEFT fp32"],
        "qaft_over_bare_bf16_no_dropout": med["qaft bf16, lora_dropout 0"] / med["bare HF+PEFT bf16, lora_dropout 0"],
    }


def part_callbacks(args, tmp: Path) -> dict:
    out = {}
    for name, spec in CALLBACK_SPECS.items():
        runs = {f"{name} {p}": Qaft(config(tmp / f"{name}{p}", args, bf16=p == "bf16", callbacks=(spec,)), tmp / f"{name}{p}") for p in ("fp32", "bf16")}
        times = interleaved({k: r.timed_steps for k, r in runs.items()}, args.rounds, args.steps)  # callbacks' begin/end hooks stay out
        out[name] = summary(times, f"{name} fp32")
        del runs
    return out


def part_quality(args, tmp: Path) -> dict:
    out = {}
    for precision in ("fp32", "bf16"):
        run = Qaft(config(tmp / f"quality{precision}", args, bf16=precision == "bf16", dropout=0.0, eval_blocks=16), tmp / f"quality{precision}")
        before = evaluate(run.s.ctx, run.s.loaders.eval)["eval_loss"]
        t0 = time.perf_counter()
        run.step(args.quality_steps)
        wall = time.perf_counter() - t0
        out[precision] = {"eval_loss_start": before, "eval_loss": evaluate(run.s.ctx, run.s.loaders.eval)["eval_loss"], "train_and_eval_s": wall}
        print(f"  {precision}: eval loss {before:.4f} -> {out[precision]['eval_loss']:.4f} after {args.quality_steps} steps ({wall:.0f} s)", flush=True)
        del run
    out["relative_difference"] = out["bf16"]["eval_loss"] / out["fp32"]["eval_loss"] - 1
    return out


POSTPASS_CONFIG = ROOT / "configs" / "smollm2-postpass.yaml"
POSTPASS_METHODS = ("rtn", "l2qer", "whiten", "aser")


def postpass_worker(method: str, bf16: str | None) -> None:
    """One method on the post-pass protocol, in this process: prints ``{postpass_s, ppl}`` as the last line.
    Runs whatever ``qaft`` the interpreter imports, so ``PYTHONPATH`` can point it at another checkout."""
    from qaft.core import text
    from qaft.eval.perplexity import perplexity
    from qaft.pipeline.commands import calibration_of, run_method
    from qaft.pipeline.config import load_config

    cfg = load_config(POSTPASS_CONFIG, [] if bf16 is None else [f"postpass.bf16={bf16}"])
    model, tok = load_model_and_tokenizer(cfg.model)
    calib, ids = calibration_of(cfg, tok), text.token_stream(cfg.eval.path, tok, key="eval.path")
    t0 = time.perf_counter()
    run_method(model, calib, cfg, method, progress=False)
    postpass_s = time.perf_counter() - t0
    ppl = perplexity(model, ids, cfg.eval.seq_len, cfg.eval.windows, progress=False).ppl
    print(json.dumps({"postpass_s": postpass_s, "ppl": ppl}))


def part_postpass(args, tmp: Path) -> dict:
    """Post-pass wall and perplexity per method (the protocol of configs/smollm2-postpass.yaml): calibration
    forwards in float32 and in bf16, and, with ``--baseline``, the code of another checkout; each (method,
    condition) in its own process, conditions interleaved per method."""
    import subprocess

    conditions = {"fp32 calibration": ({}, "false"), "bf16 calibration": ({}, "true")}
    if args.baseline:
        conditions = {"baseline": ({"PYTHONPATH": args.baseline}, None)} | conditions
    out: dict = {"config": str(POSTPASS_CONFIG.relative_to(ROOT)), "baseline": args.baseline, "methods": {}}
    for method in POSTPASS_METHODS:
        out["methods"][method] = {}
        for name, (env, bf16) in conditions.items():
            cmd = [sys.executable, __file__, "--postpass-worker", method] + ([] if bf16 is None else ["--bf16", bf16])
            done = subprocess.run(cmd, env=os.environ | env, cwd=ROOT, capture_output=True, text=True, check=True)
            out["methods"][method][name] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"  {method:<8}{name:<18}{out['methods'][method][name]['postpass_s']:>8.1f} s  ppl {out['methods'][method][name]['ppl']:.3f}", flush=True)
    return out


EVAL_METHODS = "fp,rtn,lqer,l2qer,whiten,aser"


def calibration_worker() -> None:
    """The statistics of every layer on the protocol's calibration tokens, alone: RTN (no quantization work to
    speak of) under float propagation (one forward per layer) with telemetry; prints ``{calibration_s}``."""
    from qaft.pipeline.commands import calibration_of
    from qaft.pipeline.config import load_config
    from qaft.quant.methods import resolve
    from qaft.quant.postpass import quantize_model

    cfg = load_config(POSTPASS_CONFIG, [])
    model, tok = load_model_and_tokenizer(cfg.model)
    calib = calibration_of(cfg, tok)
    t0 = time.perf_counter()
    reports, _ = quantize_model(model, calib, cfg.quant, cfg.postpass, method=resolve("rtn", cfg.postpass), propagate="float", progress=False)
    wall = time.perf_counter() - t0
    print(json.dumps({"calibration_s": wall - sum(r.seconds for r in reports), "tokens": calib.numel()}))


def part_eval(args, tmp: Path) -> dict:
    """``qaft eval CONFIG --methods fp,rtn,lqer,l2qer,whiten,aser`` wall (the whole command: model load, every
    method's post-pass and evaluation), with ``--baseline``'s code, today's default (quantized propagation) and
    ``postpass.propagate=float`` (statistics shared); plus the calibration of 16 x 512 tokens alone."""
    import subprocess

    conditions = {"quantized propagation": ({}, [])}
    conditions["float propagation (shared)"] = ({}, ["postpass.propagate=float"])
    if args.baseline:
        conditions = {"baseline": ({"PYTHONPATH": args.baseline}, [])} | conditions
    out: dict = {"config": str(POSTPASS_CONFIG.relative_to(ROOT)), "methods": EVAL_METHODS, "baseline": args.baseline, "conditions": {}}
    for name, (env, overrides) in conditions.items():
        js = tmp / f"{len(out['conditions'])}.json"
        js.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "qaft", "eval", str(POSTPASS_CONFIG), *overrides, "--methods", EVAL_METHODS, "--json", str(js)]
        t0 = time.perf_counter()
        subprocess.run(cmd, env=os.environ | env, cwd=ROOT, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t0
        res = json.loads(js.read_text())["results"]
        out["conditions"][name] = {"wall_s": wall, "ppl": {m: r["ppl"] for m, r in res.items()}, "seconds": {m: r["seconds"] for m, r in res.items()}}
        print(f"  {name:<28}{wall:>8.1f} s  " + " ".join(f"{m} {r['ppl']:.3f}" for m, r in res.items()), flush=True)
    done = subprocess.run([sys.executable, __file__, "--calibration-worker"], cwd=ROOT, capture_output=True, text=True, check=True)
    out["calibration"] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  calibration of {out['calibration']['tokens']} tokens (every layer's statistics): {out['calibration']['calibration_s']:.1f} s")
    return out


PARTS = {"steps": part_steps, "callbacks": part_callbacks, "quality": part_quality, "postpass": part_postpass, "eval": part_eval}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per condition per round")
    ap.add_argument("--quality-steps", type=int, default=60)
    ap.add_argument("--parts", nargs="*", default=list(PARTS), choices=list(PARTS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speed.json"))
    ap.add_argument("--baseline", help="postpass and eval parts: also time the qaft package found on this PYTHONPATH (another checkout)")
    ap.add_argument("--postpass-worker", metavar="METHOD", help=argparse.SUPPRESS)
    ap.add_argument("--bf16", help=argparse.SUPPRESS)
    ap.add_argument("--calibration-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.calibration_worker:
        return calibration_worker()
    if args.postpass_worker:
        return postpass_worker(args.postpass_worker, args.bf16)
    use, why = bf16_is_fast()
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    result = {k: v for k, v in previous.items() if k in PARTS and k not in args.parts} | {  # each part is one invocation's table
        "protocol": {
            "model": args.model,
            "seq_len": args.seq,
            "batch": args.batch,
            "lora": "r8 alpha16 all-linear",
            "rounds": args.rounds,
            "steps_per_round": args.steps,
        },
        "machine": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "bf16_units": sorted(f for f in ("avx512_bf16", "amx_bf16") if f in cpu_flags()),
            "bf16_auto": use,
            "why": why,
            "python": sys.version.split()[0],
        },
    }
    print(f"{args.model}, {args.batch} x {args.seq} tokens per step, {result['machine']['threads']} threads; bf16 auto: {use} ({why})")
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts:
            print(f"[{part}]", flush=True)
            t0 = time.perf_counter()
            result[part] = PARTS[part](args, Path(tmp) / part)
            result[part]["wall_s"] = time.perf_counter() - t0
            Path(args.out).write_text(json.dumps(result, indent=2))  # partial results survive a later part's failure
    report(result)
    print(f"wrote {args.out}")


def report(r: dict) -> None:
    if "steps" in r:
        print(f"\n{'condition':<28}{'s/step':>8}{'vs qaft fp32':>14}")
        for k, v in r["steps"]["conditions"].items():
            print(f"{k:<28}{v['s_per_step']:>8.2f}{v['speedup_vs_qaft fp32']:>13.2f}x")
        st = r["steps"]
        print(
            f"qaft / bare HF+PEFT, same run: bf16 {st['qaft_over_bare_bf16']:.3f}, fp32 {st['qaft_over_bare_fp32']:.3f}, bf16 without dropout {st['qaft_over_bare_bf16_no_dropout']:.3f}"
        )
    if "callbacks" in r:
        print(f"\n{'callback':<14}{'fp32 s/step':>12}{'bf16 s/step':>12}{'speed-up':>10}")
        for name, v in r["callbacks"].items():
            if name == "wall_s":
                continue
            a, b = v[f"{name} fp32"]["s_per_step"], v[f"{name} bf16"]["s_per_step"]
            print(f"{name:<14}{a:>12.2f}{b:>12.2f}{a / b:>9.2f}x")
    if "postpass" in r:
        names = list(next(iter(r["postpass"]["methods"].values())))
        print(f"\n{'method':<10}" + "".join(f"{n + ' s':>22}{'ppl':>9}" for n in names))
        for method, v in r["postpass"]["methods"].items():
            print(f"{method:<10}" + "".join(f"{v[n]['postpass_s']:>22.1f}{v[n]['ppl']:>9.3f}" for n in names))
    if "eval" in r:
        e = r["eval"]
        print(f"\nqaft eval --methods {e['methods']} (whole command):")
        for name, v in e["conditions"].items():
            print(f"  {name:<28}{v['wall_s']:>8.1f} s")
        print(f"calibration of {e['calibration']['tokens']} tokens alone: {e['calibration']['calibration_s']:.1f} s")
    if "quality" in r:
        q = r["quality"]
        print(f"\neval loss after the quality steps: fp32 {q['fp32']['eval_loss']:.4f}, bf16 {q['bf16']['eval_loss']:.4f} ({q['relative_difference']:+.2%})")


if __name__ == "__main__":
    main()

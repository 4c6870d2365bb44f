"""``qaft <train|quantize|tune|export|eval|run|doctor> CONFIG [key=value ...]``.

Exit codes: 0 ok; 2 a problem with the input (one line per problem, no traceback); 3 a problem with
the machine (disk full, read-only or forbidden folder, output folder held by another qaft process; one
line); 143 / 130 stopped by SIGTERM / SIGINT (training saves a checkpoint first); 1 a bug (traceback,
please report it).

Every verb's module is imported when the verb runs, not at start, so ``qaft --help`` answers in a
fraction of a second instead of after torch, transformers and peft have loaded.

Threads: with OpenMP's default (active) wait policy, a torch process on a 2-core machine slows
down 16-25x as soon as any other CPU-bound process runs beside it (its threads spin waiting for a
descheduled partner). The CLI therefore sets ``OMP_WAIT_POLICY=PASSIVE`` before torch loads,
unless the user set it; the startup line prints the thread count and the policy in force.

A run that seems stuck (a process group that never forms, a rank waiting on another): ``kill -USR1 PID`` prints
every thread's Python stack of that process to stderr, and the run goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from . import STAGES


def _train(args: argparse.Namespace) -> int:
    from qaft.trainer.loop import fit

    from .commands import held_folders

    cfg = _config(args)
    with held_folders(cfg):
        fit(cfg, overwrite=args.overwrite)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from qaft.eval.compare import table, write_json
    from qaft.quant.methods import parse_list

    from .commands import compare

    methods = parse_list(args.methods or "fp,rtn") if args.methods or not args.export else []
    report = compare(_config(args), methods, export=args.export, runtime=args.runtime)
    print(table(report))
    if args.json:
        write_json(report, args.json)
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from qaft.quant.store import META

    from .commands import check_export_destination, describe_result, held_folders, quantize_and_save

    cfg = _config(args)
    with held_folders(cfg, (cfg.quantized_dir, "postpass.output_dir"), *([(cfg.export_dir, "export.dir")] if args.export else [])):
        if args.export:  # fail before the post-pass, not after it
            check_export_destination(cfg, args.overwrite)
        out = quantize_and_save(cfg, overwrite=args.overwrite)
        print(f"qaft quantize: {describe_result(cfg, json.loads((out / META).read_text())['layers'])} written to {out}")
        return _export(args) if args.export else 0


def _tune(args: argparse.Namespace) -> int:
    from .commands import held_folders, tune_run

    cfg = _config(args)
    with held_folders(cfg, (cfg.tune_dir, "tune.output_dir")):
        tune_run(cfg, overwrite=args.overwrite)
    return 0


def _export(args: argparse.Namespace) -> int:
    from .commands import export_run, held_folders

    cfg = _config(args)
    with held_folders(cfg, (cfg.export_dir, "export.dir")):
        out, m = export_run(cfg, overwrite=args.overwrite)
    s, p = m["sizes"], m["parity"]
    print(f"qaft export: {m['scheme_label']} + {m['method']} written to {out}")
    print(
        f"  base {s['base_bytes'] / 2**20:.1f} MiB + adapter {s['adapter_bytes'] / 2**20:.1f} MiB (float32 {s['float32_bytes'] / 2**20:.1f} MiB); "
        f"{s['bits_per_weight_base']:.2f} bits/weight, {s['bits_per_weight_with_adapter']:.2f} with adapter"
    )
    for loader, v in p.items():
        act = "" if v["act_max_abs_diff"] is None else f"; with activation quantization {v['act_max_abs_diff']:.2e}"
        print(
            f"  reload parity ({loader}): max |logit diff| {v['max_abs_diff']:.2e}{act} (tolerance {v['tolerance']:g}), top-1 agreement {v['top1_agreement']:.1%}"
        )
    if m.get("evaluation"):
        print("  ppl " + ", ".join(f"{k} {v:.2f}" for k, v in m["evaluation"]["ppl"].items()))
    return 0


def _run(args: argparse.Namespace) -> int:
    from .doctor import launch_from
    from .run import run

    run(args.config, args.overrides, overwrite=args.overwrite, start=args.start, launch=launch_from(args.launch))
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import blocking, diagnose, launch_from, render

    rows = diagnose(args.config, args.overrides, launch_from(args.launch))
    print(render(rows))
    bad = blocking(rows)
    if bad:
        print(f"qaft doctor: {len(bad)} blocking problem(s)", file=sys.stderr)
        return 2
    print("qaft doctor: no blocking problem")
    return 0


def _config(args: argparse.Namespace) -> Any:
    from .config import load_config

    return load_config(args.config, args.overrides)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qaft", description="Quantization-aware fine-tuning of LLMs.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="{train,quantize,tune,export,eval,run,doctor}")

    def verb(name: str, help: str, handler: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.add_argument("config", help="YAML config, e.g. configs/smoke.yaml")
        sp.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. training.max_steps=20 lora.r=16")
        sp.set_defaults(handler=handler)
        return sp

    train = verb("train", "LoRA fine-tuning with the configured callbacks", _train)
    train.add_argument("--overwrite", action="store_true", help="replace a previous run's checkpoints and final/ in output_dir")
    qz = verb("quantize", "quantize + reconstruct a model or a run's final/ folder, save codes, scales and factors", _quantize)
    qz.add_argument("--overwrite", action="store_true", help="replace an existing postpass.output_dir (and export.dir with --export)")
    qz.add_argument("--export", action="store_true", help="then run `qaft export` on the result")
    tn = verb("tune", "train the post-pass result's low-rank factors (codes frozen) against the float model by distillation", _tune)
    tn.add_argument("--overwrite", action="store_true", help="replace a previous tuning run in tune.output_dir")
    ex = verb("export", "packed int4 base (compressed-tensors) + PEFT adapter + manifest + model card, with a reload parity check", _export)
    ex.add_argument("--overwrite", action="store_true", help="replace an existing export.dir")
    ev = verb("eval", "WikiText-2 perplexity of the float model and of post-pass methods", _eval)
    ev.add_argument(
        "--methods",
        default=None,
        help="comma list of fp, <quantizer>, <reconstructor>, <quantizer>+<reconstructor> "
        "(quantizers: rtn, gptq; reconstructors: aser, l2qer, lqer, whiten); default fp,rtn; none with --export",
    )
    ev.add_argument("--export", metavar="DIR", help="also evaluate an export folder (base alone and base + adapter), after checking its manifest hashes")
    ev.add_argument(
        "--runtime",
        choices=["llama.cpp"],
        help="with --export of a GGUF folder: also run the files in llama.cpp itself (rows llama.cpp, llama.cpp+adapter; greedy agreement with the reload)",
    )
    ev.add_argument("--json", metavar="PATH", help='also write {"protocol": {...}, "results": {method: {"ppl", "seconds", ...}}}')
    rn = verb("run", "doctor → train → quantize → tune → export → eval → report, resumable by stage", _run)
    rn.add_argument("--from", dest="start", choices=STAGES, help="redo this stage and the ones after it (finished stages are otherwise skipped)")
    rn.add_argument("--overwrite", action="store_true", help="start over: remove this run's outputs in training.output_dir")
    rn.add_argument("--launch", metavar="ACCELERATE_YAML", help="the accelerate config the doctor checks the callbacks against")
    doc = verb("doctor", "check a config, the model's layout, the launch and the data before any work (exit 2 on a blocking problem)", _doctor)
    doc.add_argument("--launch", metavar="ACCELERATE_YAML", help="the accelerate config you will launch with (default: read accelerate's environment)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see module docstring
    _stacks_on_sigusr1()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft calls a deprecated transformers API
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # lets flags sit between overrides (argparse's nargs='*' cannot)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = [*args.overrides, *extra]
    from qaft.core.errors import QaftError
    from qaft.core.io import environment_problem

    try:
        return args.handler(args)
    except QaftError as e:
        return _report(e)
    except KeyboardInterrupt:
        _say("qaft: interrupted\n")
        return 130
    except Exception as e:
        problem = environment_problem(e, what=getattr(e, "filename", None) or "a file", doing="accessing")  # a write io.writing did not wrap
        if problem is not None:
            return _report(problem)
        traceback.print_exc()
        _say("qaft: internal error (a bug in qaft): please report it with the traceback above\n")
        return 1


def _stacks_on_sigusr1() -> None:
    """``kill -USR1`` prints where each thread is (see module docstring); to the process's own stderr, which an
    in-process caller's replacement of ``sys.stderr`` (no file descriptor) cannot receive."""
    if hasattr(signal, "SIGUSR1") and sys.__stderr__ is not None:
        with contextlib.suppress(OSError, ValueError):  # a stderr without a file descriptor: no stacks, the run is unaffected
            faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)


def _report(e: Any) -> int:
    _say("".join(f"qaft: error: {line}\n" for line in str(e).splitlines() or [type(e).__name__]))
    return e.exit_code


def _say(text: str) -> None:
    """``text`` (whole lines) to stderr in one write: every rank of a launch reports on the same stream, and
    ``print`` writes a line and its newline separately, so two ranks' lines ran into one."""
    sys.stderr.write(text)
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())

"""One llama.cpp job in a process of its own: ``python -m qaft.runtimes.llamacpp.worker MODEL [ADAPTER] --threads N``
reads the job (JSON, see ``Job``) on stdin and writes one JSON object on stdout:
``{"rows": {"model": {...}, "model+adapter": {...}}, "runtime": {...}}``.
By hand, ``--text FILE [--seq-len 512] [--windows 8]`` instead: llama.cpp tokenizes the text itself (no BOS), takes the
first non-overlapping windows, and one line per row gives the perplexity.

Per row: the next-token NLL of every position of every window over the full distribution (log-sum-exp of the logits
in float64: nothing truncated), prompt-processing speed, and greedy (argmax) tokens after each prompt. Any failure is
one line on stderr and exit status 2; a crash inside llama.cpp ends this process, not the caller."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from . import default_threads, native

CHUNK = 64  # rows of logits turned into float64 at a time: 64 x 262k x 8 bytes = 134 MB for Gemma's vocabulary


def window_nll(ctx: native.Context, window: list[int]) -> np.ndarray:
    ctx.clear()
    ctx.decode(window, 0, outputs=True)
    targets = np.asarray(window[1:])
    out = np.empty(len(targets))
    for a in range(0, len(targets), CHUNK):
        rows = np.stack([ctx.logits(i) for i in range(a, min(a + CHUNK, len(targets)))]).astype(np.float64)
        top = rows.max(axis=1)
        lse = top + np.log(np.exp(rows - top[:, None]).sum(axis=1))
        out[a : a + len(rows)] = lse - rows[np.arange(len(rows)), targets[a : a + len(rows)]]
    return out


def perplexity(ctx: native.Context, windows: list[list[int]], keep_tokens: bool) -> dict:
    t0 = time.perf_counter()
    per_window = [window_nll(ctx, w) for w in windows]
    ctx.clear()
    every = np.concatenate(per_window)
    row = {"nll": float(every.mean()), "ppl": float(np.exp(every.mean())), "tokens": int(every.size), "windows": len(windows)}
    row["seconds"] = time.perf_counter() - t0
    if keep_tokens:
        row["token_nll"] = [w.tolist() for w in per_window]
    return row


def prompt_speed(ctx: native.Context, tokens: list[int]) -> float:
    """Tokens per second of prompt processing alone (the last logits only); the best of three runs, after a warm-up."""
    ctx.clear()
    ctx.decode(tokens[:8], 0, outputs=False)
    best = float("inf")
    for _ in range(3):
        ctx.clear()
        t0 = time.perf_counter()
        ctx.decode(tokens, 0, outputs=False)
        best = min(best, time.perf_counter() - t0)
    ctx.clear()
    return len(tokens) / best


def greedy(ctx: native.Context, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    outs = []
    for p in prompts:
        ctx.clear()
        ctx.decode(p, 0, outputs=False)
        got: list[int] = []
        while len(got) < new_tokens:
            got.append(int(np.argmax(ctx.logits(-1))))
            if len(got) < new_tokens:
                ctx.decode(got[-1:], len(p) + len(got) - 1, outputs=False)
        outs.append(got)
    ctx.clear()
    return outs


def check_ids(job: dict, vocab: int, name: str) -> None:
    for seq in (*job["windows"], *job.get("prompts", [])):
        bad = [t for t in seq if not 0 <= t < vocab]
        if bad:
            raise native.LlamaError(f"token id {bad[0]} is outside {name}'s vocabulary of {vocab}")


def rows(model_path: Path, adapter: Path | None, job: dict, threads: int) -> dict:
    windows, prompts, new = job["windows"], job.get("prompts", []), job.get("new_tokens", 16)
    longest = max([len(w) for w in windows] + [len(p) + new for p in prompts] + [8])
    out = {}
    with native.model(model_path) as m:
        for name, extra in [("model", None), *([("model+adapter", adapter)] if adapter else [])]:
            with native.context(m, longest, threads, extra) as ctx:
                if not out:  # the vocabulary is the model's, adapter or not
                    check_ids(job, ctx.n_vocab, model_path.name)
                row = perplexity(ctx, windows, job.get("token_nll", False)) if windows and job.get("perplexity", True) else {}
                if windows:
                    row["prompt_tokens_per_s"] = prompt_speed(ctx, windows[0][: job.get("speed_tokens") or len(windows[0])])
                if prompts:
                    row["generations"] = greedy(ctx, prompts, new)
                out[name] = row
    return out


def text_job(model_path: Path, text: Path, seq_len: int, n: int) -> dict:
    with native.model(model_path) as m:
        ids = native.tokenize(m, text.read_text())
    windows = [ids[s : s + seq_len] for s in range(0, len(ids) - seq_len + 1, seq_len)][:n]
    if not windows:
        raise native.LlamaError(f"{text}: {len(ids)} tokens, fewer than one window of {seq_len}")
    return {"windows": windows, "prompts": [], "perplexity": True}


def release() -> str | None:
    info = native.HERE / "node_modules" / "node-llama-cpp" / "llama" / "llama.cpp.info.json"
    return json.loads(info.read_text()).get("tag") if info.is_file() else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qaft.runtimes.llamacpp.worker", description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path, help="MODEL.gguf [ADAPTER.gguf]")
    ap.add_argument("--threads", type=int, default=None, help="default: OMP_NUM_THREADS, else every core this process may use")
    ap.add_argument("--text", type=Path, help="by hand: a text file llama.cpp tokenizes (instead of a job on stdin)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    args = ap.parse_args(argv)
    args.threads = args.threads or default_threads()
    try:
        if len(args.files) > 2:
            raise native.LlamaError("give a model file and at most one adapter file")
        for f in args.files:
            if not f.is_file():
                raise native.LlamaError(f"{f}: no such file")
        model, adapter = args.files[0], args.files[1] if len(args.files) > 1 else None
        job = text_job(model, args.text, args.seq_len, args.windows) if args.text else json.loads(sys.stdin.read())
        answer = {"rows": rows(model, adapter, job, args.threads)}
    except (native.LlamaError, ValueError, KeyError, OSError) as e:  # ValueError: JSON that does not parse
        print(f"worker: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.text:
        for name, r in answer["rows"].items():
            file = model if name == "model" else f"{model} + {adapter}"
            w = job["windows"]
            print(f"{file}: perplexity {r['ppl']:.4f} ({len(w)} windows x {len(w[0])} tokens, {r['tokens']} predicted, {r['seconds']:.1f} s)")
        return 0
    answer["runtime"] = {"name": "llama.cpp", "release": release(), "build": "prebuilt", "threads": args.threads}
    sys.stdout.write(json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

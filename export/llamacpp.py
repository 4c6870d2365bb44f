"""A GGUF export run by llama.cpp itself: perplexity rows and a greedy-generation check beside transformers' reload.

The Python readers (transformers' GGUF loader, ``gguf.GGUFReader``) prove the files hold qaft's model;
this proves the program users deploy with reads them the same way: tokenizer, tensor names and
rotary layout, the LoRA adapter's names and scale. Both sides get the same token ids (qaft's
tokenization of the protocol windows and of the parity prompts), so what differs is llama.cpp's
arithmetic alone: it rounds activations to 8 bits inside its quantized dot products, which moves
perplexity by a fraction of a percent and can flip a near-tie in greedy decoding. Hence generation
agreement is reported (tokens generated identically before the first difference), not required.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from qaft.runtimes import llamacpp

from .parity import prompt_ids

NEW_TOKENS = 16
ROWS = {"model": "llama.cpp", "model+adapter": "llama.cpp+adapter"}
"""The script's row names → the names of the rows in qaft's tables (beside ``export-base`` / ``export``)."""
RELOAD = {"model": "base", "model+adapter": "base+adapter"}
"""The script's row names → transformers' reload row of the same files (``exporter.evaluate_export``) each must match."""


@torch.no_grad()
def greedy(model: torch.nn.Module, prompts: list[torch.Tensor], new_tokens: int) -> list[list[int]]:
    """``new_tokens`` argmax tokens after each prompt, end-of-text included (llama.cpp's side does the same), decoded
    with the KV cache (the same tokens as recomputing the whole sequence each step, checked on SmolLM2)."""
    outs = []
    for p in prompts:
        out = model(input_ids=p[None], use_cache=True)
        got = [out.logits[:, -1:].argmax(-1)]
        for _ in range(new_tokens - 1):
            out = model(input_ids=got[-1], cache=out.cache, use_cache=True)  # transformers >= 5.24 names it cache
            got.append(out.logits[:, -1:].argmax(-1))
        outs.append(torch.cat(got, dim=1)[0].tolist())
    return outs


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> float:
    """Share of generated tokens produced identically before each prompt's first difference."""
    same = 0
    for a, b in zip(ours, theirs):
        for x, y in zip(a, b):
            if x != y:
                break
            same += 1
    total = sum(len(a) for a in ours)
    return same / total if total else 1.0


def binding_version() -> str | None:
    path = llamacpp.HERE / "node_modules" / llamacpp.PACKAGE / "package.json"
    try:
        return json.loads(path.read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def check(
    reloaded: torch.nn.Module, tok: Any, model_file: Path, adapter_file: Path | None, windows: torch.Tensor | None, *, new_tokens: int = NEW_TOKENS
) -> dict[str, Any]:
    """llama.cpp on ``model_file`` (+ ``adapter_file``): ``{"rows": {name: {ppl, seconds, prompt_tokens_per_s}},
    "generation": {...}, "runtime": {...}}``; ``rows`` is empty without ``windows``. Greedy generations are compared
    with ``reloaded``, transformers' reload of the same files (with and without the adapter: ``disable_adapter()``)."""
    prompts = prompt_ids(tok)
    t0 = time.perf_counter()
    job = llamacpp.Job(windows=[] if windows is None else windows.tolist(), prompts=[p.tolist() for p in prompts], new_tokens=new_tokens)
    answer = llamacpp.run(model_file, adapter_file, job)
    seconds = time.perf_counter() - t0
    adapter = hasattr(reloaded, "disable_adapter")
    rows, agree = {}, {}
    for key, name in ROWS.items():
        if key not in answer["rows"]:
            continue
        r = answer["rows"][key]
        with reloaded.disable_adapter() if adapter and key == "model" else contextlib.nullcontext():
            agree[name] = agreement(greedy(reloaded, prompts, new_tokens), r["generations"])
        if "ppl" in r:
            rows[name] = {"ppl": r["ppl"], "seconds": r["seconds"], "prompt_tokens_per_s": r["prompt_tokens_per_s"], "reload": RELOAD[key]}
    runtime = answer["runtime"] | {"binding": f"{llamacpp.PACKAGE} {binding_version()}"}
    return {
        "rows": rows,
        "generation": {"prompts": len(prompts), "new_tokens": new_tokens, "agreement": agree},
        "runtime": runtime,
        "seconds": seconds,
    }


def card_lines(record: dict[str, Any]) -> list[str]:
    """The model card's account of the check (or of why it was skipped)."""
    if "skipped" in record:
        return [f"Not run in llama.cpp at export time: {record['skipped']}.", ""]
    rt, g = record["runtime"], record["generation"]
    agree = ", ".join(f"{n} {a:.0%}" for n, a in g["agreement"].items())
    speed = "; ".join(f"{n} {r['prompt_tokens_per_s']:.0f} tokens/s prompt processing" for n, r in record["rows"].items())
    return [
        f"Loaded and run by llama.cpp ({rt['binding']}'s prebuilt binary, tag {rt['release']}; CPU, {rt['threads']} threads): greedy decoding of "
        f"{g['new_tokens']} tokens after {g['prompts']} prompts agrees with transformers' reload on {agree} of tokens "
        "(llama.cpp rounds activations to 8 bits in its quantized dot products, so near-ties can differ)" + (f"; {speed}." if speed else "."),
        "",
    ]

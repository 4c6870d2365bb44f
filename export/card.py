"""The parts every export's model card (``README.md``) shares: what was made, how well it does, where the provenance is.

Each format's ``card`` (``ExportFormat.card``) adds its files, sizes, parity table and how to load them.
"""

from __future__ import annotations

from collections import Counter
from typing import Any


def mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def weight_formats(m: dict[str, Any]) -> str:
    """The scheme's format, or with a bits budget's menu (``layer_formats``) each format and how many Linears are on it."""
    others = m.get("layer_formats") or {}
    if not others:
        return m["scheme_label"]
    counts = Counter(others.values())
    counts[m["scheme_label"]] = len(m["quantized_modules"]) - len(others)
    return "per Linear, as the bits budget chose: " + ", ".join(f"{label} ({n})" for label, n in sorted(counts.items()) if n)


def made_with(m: dict[str, Any], weights: str, factors: str) -> list[str]:
    ranks = sorted(set(m["ranks"].values()))
    rank_text = "none" if not ranks else (f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]} per layer")
    return [
        f"# {m['source_model']} — {m['scheme_label']} + {m['method']}",
        "",
        "Made with qaft: round-to-nearest quantization with low-rank reconstruction of the quantization error.",
        "",
        "| | |",
        "|---|---|",
        f"| weights | {weight_formats(m)} ({weights}) |",
        f"| method | `{m['method']}`, rank {rank_text} ({factors}) |",
        f"| calibration | {m['calibration']['samples']} × {m['calibration']['seq_len']} tokens of `{m['calibration']['path']}` |",
        f"| training | {'callbacks ' + ', '.join(m['training']['callbacks']) if m.get('training') and m['training']['callbacks'] else ('qaft LoRA run' if m.get('training') else 'none (post-training only)')} |",
        "",
    ]


def perplexity_section(m: dict[str, Any]) -> list[str]:
    ev = m.get("evaluation")
    if not ev:
        return []
    pr = ev["protocol"]
    return [
        f"## Perplexity ({pr['windows']} windows × {pr['seq_len']} tokens of `{pr['eval_path']}`"
        f"{', each starting with BOS' if pr.get('bos') else ''}, reloaded from these files)",
        "",
        "| model | ppl |",
        "|---|---|",
        *(f"| {name} | {ppl:.2f} |" for name, ppl in ev["ppl"].items()),
        "",
    ]


def provenance_note() -> str:
    return (
        "`manifest.json` lists the scheme, method, per-layer ranks, calibration data with sha256, training config, library versions, "
        "qaft revision, and a sha256 of every file; `qaft eval CONFIG --export DIR` checks them before evaluating."
    )

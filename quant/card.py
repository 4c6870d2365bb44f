"""The export's model card (``README.md``): what the folder holds, how it was made, how good it is, how to load it."""

from __future__ import annotations

from typing import Any


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def model_card(m: dict[str, Any]) -> str:
    s, p = m["sizes"], m["parity"]
    ranks = sorted(set(m["ranks"].values()))
    rank_text = "none" if not ranks else (f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]} per layer (`rank_pattern`)")
    lines = [
        "---", "library_name: peft", "tags: [qaft, compressed-tensors, int4, lora]", "---", "",
        f"# {m['source_model']} — {m['scheme_label']} + {m['method']}", "",
        "Made with qaft: round-to-nearest quantization with low-rank reconstruction of the quantization error.", "",
        "| | |", "|---|---|",
        f"| weights | {m['scheme_label']} (`base/`, compressed-tensors `pack-quantized`) |",
        f"| method | `{m['method']}`, rank {rank_text}{', int' + str(m['factor_bits']) + ' factors' if m.get('factor_bits') else ''} (`adapter/`, PEFT LoRA, scaling 1) |",
        f"| calibration | {m['calibration']['samples']} × {m['calibration']['seq_len']} tokens of `{m['calibration']['path']}` |",
        f"| training | {'callbacks ' + ', '.join(m['training']['callbacks']) if m.get('training') and m['training']['callbacks'] else ('qaft LoRA run' if m.get('training') else 'none (post-training only)')} |",
        "",
    ]
    ev = m.get("evaluation")
    if ev:
        pr = ev["protocol"]
        lines += [f"## Perplexity ({pr['windows']} windows × {pr['seq_len']} tokens of `{pr['eval_path']}`, reloaded from these files)", "",
                  "| model | ppl |", "|---|---|"]
        lines += [f"| {name} | {ppl:.2f} |" for name, ppl in ev["ppl"].items()]
        lines.append("")
    lines += [
        "## Size", "",
        f"float32 {_mb(s['float32_bytes'])}, bfloat16 {_mb(s['bfloat16_bytes'])} → `base/` {_mb(s['base_bytes'])} + `adapter/` {_mb(s['adapter_bytes'])} on disk. "
        f"Quantized Linears: {s['bits_per_weight_base']:.2f} bits per weight (codes + scales), {s['bits_per_weight_with_adapter']:.2f} with the adapter. "
        "Embeddings, norms and ignored layers are stored in float.", "",
        "## Reload parity", "",
        "Logits of the reloaded files vs qaft's in-memory model on fixed prompts, activation quantization off on both sides"
        + (" and, separately, on (qaft rounding activations as compressed-tensors' Python code does, max|x|/127.5)" if any(v["act_max_abs_diff"] is not None for v in p.values()) else "")
        + ":", "",
        "| loader | max abs diff | top-1 agreement | with activation quantization | vs a server's max abs/127 rounding |", "|---|---|---|---|---|",
    ]
    for loader, v in p.items():
        act = "–" if v["act_max_abs_diff"] is None else f"{v['act_max_abs_diff']:.2e}"
        server = "–" if v["server_act_max_abs_diff"] is None else f"{v['server_act_max_abs_diff']:.2e} ({v['server_act_top1_agreement']:.1%} top-1)"
        lines.append(f"| {loader} | {v['max_abs_diff']:.2e} (tolerance {v['tolerance']:g}) | {v['top1_agreement']:.1%} | {act} | {server} |")
    if "transformers" not in p:
        lines += ["", "transformers' `from_pretrained` cannot read asymmetric packed checkpoints in transformers 5.23 + compressed-tensors 0.20 "
                  "(packed zero points are mis-sized on load); `qaft.load_quantized(\"export\")` reads them with the library's own decompression."]
    lines += [
        "", "## Load", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "from peft import PeftModel  # needs: pip install compressed-tensors peft", "",
        'base = AutoModelForCausalLM.from_pretrained("base")  # int4 packed; de-compressed to float on first use on CPU',
        'model = PeftModel.from_pretrained(base, "adapter")   # the low-rank error correction' if m["ranks"] else "model = base",
        'tokenizer = AutoTokenizer.from_pretrained("base")', "```", "",
        "Activation quantization, when the scheme has it, is recorded as dynamic `input_activations` in `base/config.json`; "
        "servers that read compressed-tensors (vLLM) apply it at run time.", "",
        "`manifest.json` lists the scheme, method, per-layer ranks, calibration data with sha256, training config, library versions, "
        "qaft revision, and a sha256 of every file; `qaft eval CONFIG --export DIR` checks them before evaluating.", "",
    ]
    return "\n".join(lines)

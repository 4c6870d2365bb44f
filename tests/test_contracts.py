"""Contract suites over the registries: every registered weight quantizer and export format is held to
the promises the rest of qaft relies on. A new entry is enrolled by registering it (callbacks:
``test_callbacks.py``; reconstructors: ``test_reconstruct.py``)."""

from __future__ import annotations

import pytest
import torch

from helpers import SMALL_POSTPASS
from qaft.core.errors import ExportError
from qaft.export import FORMATS
from qaft.export.exporter import load_export
from qaft.export.formats import of_folder
from qaft.pipeline.commands import export_run, quantize_and_save
from qaft.quant.calibrate import LayerStats
from qaft.quant.ggufgrid import CODE_RANGE
from qaft.quant.grid import dequantize, quantize_weight
from qaft.quant.quantizers import QUANTIZERS
from qaft.quant.scheme import GGUFType, Granularity, QuantScheme, WeightFormat, WeightQuant

SPECS = [
    WeightQuant(),
    WeightQuant(bits=3, granularity=Granularity.GROUP, group_size=16, symmetric=False),
    WeightQuant(format=WeightFormat.MXINT, granularity=Granularity.GROUP, group_size=16),
    WeightQuant(format=WeightFormat.GGUF, gguf_type=GGUFType.Q4_0),
]


def correlated_stats(d: int = 64, n: int = 512) -> LayerStats:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g) @ torch.randn(8, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)
    st = LayerStats(d)
    st.update(x)
    return st


def code_range(spec: WeightQuant) -> tuple[int, int]:
    if spec.gguf_type is not None:
        return CODE_RANGE[spec.gguf_type]
    if spec.format is WeightFormat.MXINT or spec.symmetric:
        return -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1
    return 0, 2**spec.bits - 1


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
@pytest.mark.parametrize("name", QUANTIZERS.names())
def test_every_quantizer_lands_on_the_grid_in_rtns_layout(name, spec):
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    q = QUANTIZERS.create(name).quantize(w, correlated_stats(), spec)
    r = quantize_weight(w, spec)
    assert q.codes.shape == r.codes.shape and q.scale.shape == r.scale.shape and (q.zero is None) == (r.zero is None)
    lo, hi = code_range(spec)
    assert q.codes.dtype == torch.int16 and lo <= int(q.codes.min()) and int(q.codes.max()) <= hi
    assert torch.equal(dequantize(q.codes, q.scale, q.zero, spec), q.dequant)  # what the store and the exports rebuild
    again = QUANTIZERS.create(name).quantize(w, correlated_stats(), spec)
    assert torch.equal(again.codes, q.codes)  # deterministic


@pytest.mark.parametrize("name", QUANTIZERS.names())
def test_every_quantizer_beats_rtn_on_the_output_error_and_rtn_is_the_grids_own_rounding(name):
    """A quantizer that solves each Linear from the calibration statistics must use them: on correlated inputs its
    output error is below round-to-nearest's by a margin. ``rtn`` is the grid's rounding bit for bit (what the others
    beat), and so is the per-Linear start of a quantizer that refines whole blocks (``refine_block`` beats it there:
    test_signround.py)."""
    st = correlated_stats()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    spec = WeightQuant(bits=3)
    err = lambda q: torch.trace((w - q.dequant) @ st.covariance.float() @ (w - q.dequant).T).item()  # noqa: E731
    quantizer = QUANTIZERS.create(name)
    q, nearest = quantizer.quantize(w, st, spec), quantize_weight(w, spec)
    if name == "rtn" or quantizer.refines_blocks:
        assert torch.equal(q.codes, nearest.codes) and torch.equal(q.dequant, nearest.dequant)
    else:
        assert err(q) < 0.9 * err(nearest)


SCHEMES = [("quant.weight.format=int",), ("quant.weight.format=gguf", "quant.weight.gguf_type=Q4_0")]


def scheme_for(fmt) -> tuple[str, ...]:
    for overrides in SCHEMES:
        w = {o.split("=")[0].split(".")[-1]: o.split("=")[1] for o in overrides}
        spec = WeightQuant(format=WeightFormat(w["format"]), gguf_type=GGUFType(w["gguf_type"]) if "gguf_type" in w else None)
        try:
            fmt.check_scheme(QuantScheme(weight=spec))
            return overrides
        except ExportError:
            continue
    raise AssertionError(f"{fmt.name} holds none of the test schemes; add one to SCHEMES")


@pytest.mark.parametrize("name", FORMATS.names())
def test_every_format_writes_files_that_reload_to_the_quantized_model(name, make_cfg):
    fmt = FORMATS.get(name)
    cfg = make_cfg(*SMALL_POSTPASS, f"export.format={name}", *scheme_for(fmt))
    quantize_and_save(cfg, overwrite=False, progress=False)
    out, manifest = export_run(cfg, overwrite=False, progress=False)
    assert of_folder(out) is fmt and {"README.md", "manifest.json"} <= {p.name for p in out.iterdir()}
    assert manifest["parity"] and all(p["max_abs_diff"] <= cfg.export.parity_atol for p in manifest["parity"].values())
    assert set(manifest["sizes"]) >= {"bits_per_weight_base", "bits_per_weight_with_adapter", "base_bytes", "adapter_bytes"}
    model, tok, record = load_export(out)  # hashes verified
    assert record["scheme_label"] in (out / "README.md").read_text()
    ids = torch.tensor([tok("quantization", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        on = model(input_ids=ids).logits
        with model.disable_adapter():  # every format reloads with a way to switch the factors off
            off = model(input_ids=ids).logits
    assert not torch.allclose(on, off)


@pytest.mark.parametrize("name", FORMATS.names())
def test_every_format_refuses_what_it_cannot_hold_before_writing(name, make_cfg):
    fmt = FORMATS.get(name)
    other = next(o for o in SCHEMES if o != scheme_for(fmt))
    cfg = make_cfg(*SMALL_POSTPASS, f"export.format={name}", *other)
    quantize_and_save(cfg, overwrite=False, progress=False)
    with pytest.raises(ExportError, match=r"^(export\.format|quant\.weight): .* (quantize|export) "):  # the scheme refusal, naming the fix
        export_run(cfg, overwrite=False, progress=False)
    assert not cfg.export_dir.exists() and not any(p.name.startswith(".tmp") for p in cfg.export_dir.parent.iterdir())


def _corrupt_compressed_tensors(monkeypatch):
    """Flip one packed int32 word (8 int4 codes) of the first quantized Linear right after the library packs it."""
    from safetensors.torch import load_file, save_file

    import qaft.export.ctformat as ctformat

    real = ctformat.write_packed

    def write_then_flip(model, tok, scheme, formats, out, float_dtype):
        names = real(model, tok, scheme, formats, out, float_dtype)
        f = next(out.glob("*.safetensors"))
        t = load_file(str(f))
        key = sorted(k for k in t if k.endswith("weight_packed"))[0]
        t[key].view(-1)[0] ^= 0x7777_7777
        save_file(t, str(f), metadata={"format": "pt"})
        return names

    monkeypatch.setattr(ctformat, "write_packed", write_then_flip)


def _corrupt_gguf(monkeypatch):
    """Change one byte of codes in the first quantized tensor's packed blocks."""
    import qaft.export.gguffile as gguffile

    real, done = gguffile.quantized, []

    def quantized_then_flip(name, values, t):
        packed = real(name, values, t).copy()
        if not done:
            packed.reshape(-1)[-1] ^= 0x55  # the last byte: codes, never a block scale
            done.append(name)
        return packed

    monkeypatch.setattr(gguffile, "quantized", quantized_then_flip)


CORRUPT = {"compressed-tensors": _corrupt_compressed_tensors, "gguf": _corrupt_gguf}


@pytest.mark.parametrize("name", FORMATS.names())
def test_a_reload_mismatch_fails_the_export_and_publishes_nothing(name, make_cfg, monkeypatch):
    """The parity gate: files that do not reload to the model fail the command; no export folder, no temp folder."""
    fmt = FORMATS.get(name)
    cfg = make_cfg(*SMALL_POSTPASS, f"export.format={name}", *scheme_for(fmt))
    quantize_and_save(cfg, overwrite=False, progress=False)
    CORRUPT[name](monkeypatch)
    with pytest.raises(ExportError, match=r"reload parity failed .* > export\.parity_atol"):
        export_run(cfg, overwrite=False, progress=False)
    assert not cfg.export_dir.exists() and not any(p.name.startswith(".tmp") for p in cfg.export_dir.parent.iterdir())

"""GGUF exports run by llama.cpp itself (node-llama-cpp's prebuilt CPU binary, ``runtimes/llamacpp``), not only by
Python readers: the files load, perplexity on the same token ids matches transformers' reload, the adapter moves
llama.cpp's predictions as it moves transformers', and a broken file is one line, not a crash."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from qaft.core.errors import ConfigError, ExportError, PreflightError
from qaft.export.gguffile import ADAPTER_FILE
from qaft.export.ggufformat import load_gguf
from qaft.pipeline.commands import export_run, quantize_and_save
from qaft.runtimes import llamacpp


def runs_llamacpp(test):
    """The llama.cpp tier: marked (``make test-fast`` leaves it out) and skipped where the runtime is missing, which
    ``CI=true`` turns into a failure (conftest.py). The tests below without it need no runtime and run everywhere."""
    return pytest.mark.llamacpp(pytest.mark.skipif(llamacpp.missing() is not None, reason=f"llama.cpp runtime not installed: {llamacpp.missing()}")(test))


ROOT = Path(__file__).resolve().parents[1]
BY_HAND = [sys.executable, "-m", "qaft.runtimes.llamacpp.worker"]
TEXT = "The quick brown fox jumps over the lazy dog; then the dog sleeps in the sun, and the fox runs into the woods. " * 40
PPL_RTOL = 0.01
"""llama.cpp vs transformers' reload on the same ids: llama.cpp rounds activations to 8 bits in its quantized dot
products (measured here: 0.02-0.3% on the tiny model; 1.5% is the acceptance bound on SmolLM2)."""


def exported(make_cfg, tmp_path, t: str, *overrides: str):
    """A tiny-llama post-pass result on the GGUF grid ``t``, exported (and evaluated on TEXT: 4 windows x 64)."""
    text = tmp_path / "eval.txt"
    text.write_text(TEXT)
    cfg = make_cfg(
        "postpass.calibration_samples=4",
        "postpass.calibration_seq_len=32",
        "postpass.rank=8",
        "model.name_or_path=tiny-llama",
        "quant.weight.format=gguf",
        f"quant.weight.gguf_type={t}",
        f"eval.path={text}",
        "eval.seq_len=64",
        "eval.windows=4",
        *overrides,
    )
    quantize_and_save(cfg, overwrite=False, progress=False)
    out, m = export_run(cfg, overwrite=False, progress=False)
    return cfg, out, m


@pytest.fixture(scope="module")
def q4_0(corpus, tmp_path_factory):
    """One Q4_0 export, evaluated and run by llama.cpp at export time, for the tests that only read it (copy it to change it)."""
    from qaft.pipeline.config import config_from_dict

    root = tmp_path_factory.mktemp("q4_0")
    raw = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    raw["data"]["path"], raw["training"]["output_dir"] = str(corpus), str(root / "run")
    return exported(lambda *o: config_from_dict(raw, list(o)), root, "Q4_0", "export.runtime_check=required")


@runs_llamacpp
@pytest.mark.parametrize("t", ["Q4_0", "Q8_0", "Q4_1", "MXFP4"])
def test_llama_cpp_loads_each_type_and_matches_the_transformers_reload(make_cfg, tmp_path, t):
    _, out, m = exported(make_cfg, tmp_path, t, "export.runtime_check=required")
    ppl, rc = m["evaluation"]["ppl"], m["runtime_check"]
    assert ppl["llama.cpp"] == pytest.approx(ppl["base"], rel=PPL_RTOL)
    assert ppl["llama.cpp+adapter"] == pytest.approx(ppl["base+adapter"], rel=PPL_RTOL)
    assert rc["rows"]["llama.cpp"]["prompt_tokens_per_s"] > 0 and rc["generation"]["new_tokens"] == 16
    assert {n: r["reload"] for n, r in rc["rows"].items()} == {"llama.cpp": "base", "llama.cpp+adapter": "base+adapter"}  # what the gate compares
    assert rc["runtime"]["binding"] == "node-llama-cpp 3.21.1"  # the pinned package, as installed
    card = (out / "README.md").read_text()
    assert "## llama.cpp" in card and f"| llama.cpp+adapter | {ppl['llama.cpp+adapter']:.2f} |" in card


ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
"""Every architecture the GGUF export writes (``export.ggufarch``), as a tiny random model (``core.model.TINY_MODELS``)."""


@runs_llamacpp
@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_runs_in_llama_cpp_token_for_token_as_in_transformers(make_cfg, tmp_path, arch):
    """Per token, llama.cpp's NLL on the files vs transformers' reload of them, without and with the adapter: the same
    values (a wrong norm offset, rotary layout, bias, soft-cap or window moves them), and the adapter moves llama.cpp's
    predictions as it moves transformers' (a wrong LoRA scale or a factor llama.cpp does not attach shows up as a
    slope away from 1 or a low correlation). Windows of 64 tokens cross the tiny Gemmas' 32-token sliding window."""
    _, out, m = exported(make_cfg, tmp_path, "Q4_0", f"model.name_or_path=tiny-{arch}", "export.runtime_check=required")
    ppl = m["evaluation"]["ppl"]
    assert ppl["llama.cpp"] == pytest.approx(ppl["base"], rel=PPL_RTOL) and ppl["llama.cpp+adapter"] == pytest.approx(ppl["base+adapter"], rel=PPL_RTOL)
    reloaded, tok = load_gguf(out)
    ids = torch.tensor(tok(TEXT, add_special_tokens=False)["input_ids"][:256]).view(4, 64)
    job = llamacpp.Job(windows=ids.tolist(), prompts=[], token_nll=True)
    rows = llamacpp.run(out / "model-Q4_0.gguf", out / ADAPTER_FILE, job)["rows"]
    theirs = {k: torch.tensor(r["token_nll"]).flatten() for k, r in rows.items()}
    with torch.no_grad():
        nll = lambda m: torch.nn.functional.cross_entropy(m(input_ids=ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")  # noqa: E731
        with reloaded.disable_adapter():
            base = nll(reloaded)
        adapted = nll(reloaded)
    for ours, key in ((base, "model"), (adapted, "model+adapter")):
        assert torch.corrcoef(torch.stack([ours, theirs[key]]))[0, 1] > 0.99, key
    ours_effect, theirs_effect = adapted - base, theirs["model+adapter"] - theirs["model"]
    assert ours_effect.abs().mean() > 5 * (theirs["model"] - base).abs().mean()  # the adapter matters more than llama.cpp's rounding
    slope = (theirs_effect * ours_effect).sum() / (ours_effect * ours_effect).sum()
    assert torch.corrcoef(torch.stack([ours_effect, theirs_effect]))[0, 1] > 0.9
    assert 0.85 < slope < 1.15


@runs_llamacpp
def test_qaft_eval_runtime_llama_cpp_reports_the_rows_and_agreement(q4_0, smoke_raw, tmp_path, capsys):
    from qaft.pipeline.cli import main

    cfg, out, m = q4_0
    cfg_file, js = tmp_path / "c.yaml", tmp_path / "r.json"
    cfg_file.write_text(yaml.safe_dump(smoke_raw))
    args = ["eval", str(cfg_file), "--export", str(out), "--runtime", "llama.cpp", f"eval.path={cfg.eval.path}", "eval.seq_len=64", "eval.windows=4"]
    assert main([*args, "--json", str(js)]) == 0
    report = json.loads(js.read_text())
    rows = report["results"]
    assert list(rows) == ["export-base", "export", "llama.cpp", "llama.cpp+adapter"]
    for name in ("llama.cpp", "llama.cpp+adapter"):  # the same numbers the export stage recorded
        assert rows[name]["ppl"] == pytest.approx(m["evaluation"]["ppl"][name], rel=1e-4), (m["evaluation"], {k: v["ppl"] for k, v in rows.items()})
    assert set(report["export"]["runtime_check"]["generation"]["agreement"]) == {"llama.cpp", "llama.cpp+adapter"}
    assert "llama.cpp rows: the same token ids" in capsys.readouterr().out


@runs_llamacpp
def test_a_run_reports_the_rows_its_export_recorded(q4_0):
    from qaft.core.text import token_stream
    from qaft.pipeline.evaluation import recorded_export_rows

    cfg, out, m = q4_0
    _, tok = load_gguf(out)
    scheme, rows = recorded_export_rows(cfg, token_stream(cfg.eval.path, tok, key="eval.path"))
    assert {n: r["ppl"] for n, r in rows.items()} == {
        "export-base": m["evaluation"]["ppl"]["base"],
        "export": m["evaluation"]["ppl"]["base+adapter"],
        "llama.cpp": m["evaluation"]["ppl"]["llama.cpp"],
        "llama.cpp+adapter": m["evaluation"]["ppl"]["llama.cpp+adapter"],
    }


@runs_llamacpp
@pytest.mark.parametrize("broken", ["model", "adapter"])
def test_a_corrupted_file_is_one_line_from_llama_cpp_not_a_crash(q4_0, tmp_path, broken):
    out = Path(shutil.copytree(q4_0[1], tmp_path / "export"))
    model, adapter = out / "model-Q4_0.gguf", out / ADAPTER_FILE
    victim = model if broken == "model" else adapter
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a truncated download
    with pytest.raises(ExportError, match=rf"{victim.name}.*cannot load") as e:
        llamacpp.run(model, adapter, llamacpp.Job(windows=[list(range(16))], prompts=[]))
    assert "\n" not in str(e.value) and victim.name in str(e.value) and "cannot load" in str(e.value)
    by_hand = subprocess.run([*BY_HAND, str(model), str(adapter), "--text", str(out / "README.md")], capture_output=True, text=True)
    assert by_hand.returncode == 2 and by_hand.stdout == ""
    assert len(by_hand.stderr.strip().splitlines()) == 1 and victim.name in by_hand.stderr


@runs_llamacpp
def test_the_runtime_by_hand_prints_both_perplexities(q4_0, tmp_path):
    """By hand, llama.cpp tokenizes the text itself: the same numbers as qaft's rows when its tokenizer agrees with ours."""
    _, out, m = q4_0
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    cmd = [*BY_HAND, str(out / "model-Q4_0.gguf"), str(out / ADAPTER_FILE), "--text", str(text), "--seq-len", "64", "--windows", "4"]
    lines = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()
    assert len(lines) == 2 and "model-Q4_0.gguf: perplexity" in lines[0] and f"+ {out / ADAPTER_FILE}: perplexity" in lines[1]
    assert "4 windows x 64 tokens, 252 predicted" in lines[0]
    for line, row in zip(lines, ("llama.cpp", "llama.cpp+adapter")):
        assert f"perplexity {m['evaluation']['ppl'][row]:.4f} " in line


@runs_llamacpp
def test_the_bindings_read_the_pinned_librarys_defaults_as_its_header_states_them():
    """``native.py`` restates ``llama.h``'s structures: a field added, dropped or moved in the pinned release would shift
    every field after it, and these defaults (``llama_context_default_params`` / ``llama_model_default_params``,
    src/llama-context.cpp and src/llama-model.cpp of that release) would no longer read back."""
    from qaft.runtimes.llamacpp import native

    lib = native.library()
    c = lib.llama_context_default_params()
    assert (c.n_ctx, c.n_batch, c.n_ubatch, c.n_seq_max, c.n_rs_seq, c.n_outputs_max, c.n_outputs_max_per_seq) == (512, 2048, 512, 1, 0, 0, 1)
    assert (c.n_threads, c.n_threads_batch, c.flash_attn_type) == (4, 4, -1)  # GGML_DEFAULT_N_THREADS, LLAMA_FLASH_ATTN_TYPE_AUTO
    floats = (c.rope_freq_base, c.rope_freq_scale, c.yarn_ext_factor, c.yarn_attn_factor, c.yarn_beta_fast, c.yarn_beta_slow, c.defrag_thold)
    assert floats == (0.0, 0.0, -1.0, -1.0, -1.0, -1.0, -1.0) and c.yarn_orig_ctx == 0
    assert (c.type_k, c.type_v, c.cb_eval, c.abort_callback) == (1, 1, None, None)  # GGML_TYPE_F16
    assert (c.embeddings, c.offload_kqv, c.no_perf, c.op_offload, c.swa_full, c.kv_unified) == (False, True, True, True, True, False)
    assert (c.samplers, c.n_samplers, c.ctx_other) == (None, 0, None)
    m = lib.llama_model_default_params()
    assert (m.devices, m.n_gpu_layers, m.split_mode, m.main_gpu, m.kv_overrides) == (None, -1, 1, 0, None)
    assert (m.vocab_only, m.check_tensors, m.use_extra_bufts, m.no_host, m.no_alloc, m.load_mtp) == (False, False, True, False, False, False)


def test_a_required_runtime_that_is_missing_fails_before_any_work_and_auto_records_the_skip(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(llamacpp, "missing", lambda: "node is not on PATH; install it with `make setup`")
    with pytest.raises(PreflightError, match=r"^export\.runtime_check: required, but llama\.cpp cannot run here: node is not on PATH"):
        exported(make_cfg, tmp_path, "Q4_0", "export.evaluate=false", "export.runtime_check=required")
    assert not (tmp_path / "run" / "export").exists()
    (tmp_path / "auto").mkdir()
    _, out, m = exported(make_cfg, tmp_path / "auto", "Q4_0", "export.evaluate=false", f"training.output_dir={tmp_path / 'auto-run'}")
    assert m["runtime_check"] == {"runtime": {"name": "llama.cpp"}, "skipped": "node is not on PATH; install it with `make setup`"}
    assert "Not run in llama.cpp at export time: node is not on PATH" in (out / "README.md").read_text()


def test_runtime_llama_cpp_needs_a_gguf_export(make_cfg, quantized_default, tmp_path):
    from qaft.pipeline.commands import compare

    cfg = make_cfg(f"export.dir={tmp_path / 'ct'}", f"eval.path={tmp_path / 'e.txt'}", f"training.output_dir={quantized_default.training.output_dir}")
    (tmp_path / "e.txt").write_text(TEXT)
    out, _ = export_run(cfg, overwrite=False, progress=False)
    with pytest.raises(ConfigError, match=r"--runtime llama\.cpp: .* is a compressed-tensors export, which llama\.cpp does not read"):
        compare(cfg, [], export=out, runtime="llama.cpp", progress=False)
    with pytest.raises(ConfigError, match=r"--runtime llama\.cpp: runs an export's files; give the folder with --export DIR"):
        compare(cfg, ["fp"], runtime="llama.cpp", progress=False)


@runs_llamacpp
def test_a_budget_over_gguf_types_runs_in_llama_cpp_from_a_relative_output_folder(make_cfg, tmp_path, monkeypatch):
    """Mixed per-tensor types (``postpass.budget_formats`` over GGUF types) load and score in llama.cpp as in
    transformers' reload; the run folder is relative to the working directory, as in every shipped config (node runs
    in the runtime's own folder, so the files must reach it as absolute paths)."""
    monkeypatch.chdir(tmp_path)
    menu = "postpass.budget_formats=[{format: gguf, gguf_type: Q8_0}, {format: gguf, gguf_type: MXFP4}]"
    overrides = ("training.output_dir=run", "postpass.reconstructor=whiten", "postpass.budget_bpw=4.6", menu, "export.runtime_check=required")
    _, out, m = exported(make_cfg, tmp_path, "Q4_0", *overrides)
    assert not out.is_absolute() and len({t for t in m["tensor_types"].values() if t.startswith(("Q", "MX"))}) > 1
    ppl = m["evaluation"]["ppl"]
    assert ppl["llama.cpp"] == pytest.approx(ppl["base"], rel=PPL_RTOL)
    assert ppl["llama.cpp+adapter"] == pytest.approx(ppl["base+adapter"], rel=PPL_RTOL)


@runs_llamacpp
def test_a_runtime_check_beyond_its_tolerance_fails_the_export(make_cfg, tmp_path):
    """Real llama.cpp, a tolerance below what its 8-bit activations move perplexity by (0.02-0.3 % here): the export
    stops with the runtime's line and nothing is published."""
    with pytest.raises(ExportError, match=r"^runtime check failed: llama\.cpp(\+adapter)? perplexity .* > export\.runtime_ppl_rtol 1e-09; llama\.cpp reads"):
        exported(make_cfg, tmp_path, "Q4_0", "export.runtime_check=required", "export.runtime_ppl_rtol=1e-9")
    assert not (tmp_path / "run" / "export").exists() and not list((tmp_path / "run").glob(".tmp-*"))


def test_under_ci_a_missing_runtime_fails_the_tier_by_name_and_the_runtime_free_tests_still_pass(tmp_path):
    """The npm package not installed (``npm ci`` never ran: Debian 12's node 18, a stand-in on PATH, is too old for it):
    with CI=true the llama.cpp tier cannot skip quietly (conftest.py)."""
    (tmp_path / "node").write_text("#!/bin/sh\necho v18.19.0\n")
    (tmp_path / "node").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "QAFT_REQUIRE"))}
    env |= {"CI": "true", "PATH": f"{tmp_path}:{os.environ['PATH']}", "QAFT_LLAMACPP_MODULES": str(tmp_path / "node_modules")}
    tests = [f"tests/test_llamacpp.py::{name}" for name in ("test_the_runtime_by_hand_prints_both_perplexities", "test_runtime_llama_cpp_needs_a_gguf_export")]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout[-3000:]
    assert "1 passed" in r.stdout and "1 error" in r.stdout, r.stdout[-3000:]
    assert (
        "test_the_runtime_by_hand_prints_both_perplexities: skipped, which CI=true / QAFT_REQUIRE_TIERS=1 does not allow: llama.cpp runtime not installed: "
        "the npm package node-llama-cpp is not installed in" in r.stdout
    )
    assert "and node 18 is too old to install it" in r.stdout


@runs_llamacpp
def test_the_user_model_config_runs_end_to_end_on_a_non_llama_architecture(tmp_path):
    """``configs/user-model-gguf.yaml`` as shipped (a GGUF budget with a format menu, whitening, tuning, the llama.cpp
    check required), shrunk in steps and windows, on the tiny Gemma 3: every stage finishes, each records its time and
    peak memory, and the table's ``rtn`` row is the base alone beside the budgeted method (which once crashed it)."""
    from qaft.pipeline.run import run

    small = ["training.max_steps=2", "training.eval_steps=2", "training.save_steps=2", "data.block_size=32", "tune.steps=2", "tune.eval_steps=2"]
    small += ["tune.seq_len=32", "postpass.calibration_samples=4", "postpass.calibration_seq_len=32", "postpass.rank=8", "eval.windows=2", "eval.seq_len=64"]
    where = [
        "data.path=python-docs-train",
        "postpass.calibration_path=python-docs-train",
        "eval.path=python-docs-heldout",
        f"training.output_dir={tmp_path / 'run'}",
    ]
    run(ROOT / "configs" / "user-model-gguf.yaml", ["model.name_or_path=tiny-gemma3", *where, *small], echo=lambda *_: None)
    out = tmp_path / "run"
    for stage in ("train", "quantize", "tune", "export", "eval", "report"):
        record = json.loads((out / "stages" / f"{stage}.json").read_text())
        assert record["seconds"] > 0 and record["peak_rss_gib"] > 0.05, record
    rows = {(r["model"], r["method"]): r for r in json.loads((out / "eval.json").read_text())["rows"]}
    assert ("fine-tuned", "rtn") in rows and rows[("fine-tuned", "rtn")]["scheme"] == "GGUF Q4_0"
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    assert set(manifest["runtime_check"]["rows"]) == {"llama.cpp", "llama.cpp+adapter"}

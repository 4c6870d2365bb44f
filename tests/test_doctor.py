"""``qaft doctor``: each check finds the problem it is for (and only then), and the exit code says whether one blocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from qaft.core.errors import QaftError
from qaft.pipeline.cli import main
from qaft.pipeline.doctor import Launch, Status, diagnose, launch_from

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def smoke_file(smoke_raw, tmp_path):
    p = tmp_path / "smoke.yaml"
    p.write_text(yaml.safe_dump(smoke_raw))
    return p


def rows_of(findings, check):
    return [r for r in findings if r.check == check]


def only_status(findings, check) -> Status:
    (row,) = rows_of(findings, check)
    return row.status


def test_a_sound_config_passes_and_names_what_it_checked(smoke_file, capsys):
    assert main(["doctor", str(smoke_file)]) == 0
    out = capsys.readouterr().out
    for check in (
        "torch",
        "peft",
        "config",
        "model",
        "lora targets",
        "lora rank",
        "quant scheme",
        "tied embeddings",
        "export",
        "disk space",
        "output dir",
        "launch",
    ):
        assert any(line.startswith(check) and " ok " in line for line in out.splitlines()), (check, out)
    assert "LlamaForCausalLM" in out and "W4 per-channel sym on 14 Linear layers in 2 blocks" in out


@pytest.mark.parametrize(
    "overrides, check, needle",
    [
        (["quant.weight.granularity=group", "quant.weight.group_size=48"], "quant scheme", "quant.weight.group_size: 48 does not divide the input width"),
        (["postpass.rank=100"], "quant scheme", "postpass.rank: 100 exceeds"),
        (["lora.target_modules=[q_proj, qproj]"], "lora targets", "['qproj'] match no Linear"),
        (["lora.r=65"], "lora rank", "lora.r: 65 exceeds min(out, in)"),
        (["quant.targets=[nothing_here]"], "quant targets", "select no decoder Linear"),
        (
            ["model.name_or_path=tiny-opt", "quant.weight.format=gguf", "quant.weight.gguf_type=Q4_0"],
            "export",
            "llama.cpp has no architecture for model_type 'opt'; the GGUF export writes gemma2",
        ),
        (["quant.weight.format=gguf", "quant.weight.gguf_type=Q4_0", "quant.activation.bits=8"], "export", "llama.cpp picks activation precision"),
        (["export.format=gguf"], "export", "gguf files hold llama.cpp's block grids"),
        (
            [
                "postpass.reconstructor=whiten",
                "postpass.budget_bpw=6",
                "postpass.budget_formats=[{bits: 8}, {format: mxint, bits: 8, granularity: group, group_size: 32}]",
            ],
            "export",
            "postpass.budget_formats: export.format compressed-tensors cannot write MXINT8 b32; give postpass.budget_formats int formats only",
        ),
    ],
)
def test_model_layout_problems_block(smoke_file, overrides, check, needle):
    rows = diagnose(smoke_file, overrides, Launch("test"))
    bad = [r for r in rows if r.status is Status.FAIL]
    assert [r.check for r in bad] == [check] and needle in bad[0].detail, bad


def saved(tmp_path: Path, config) -> str:
    """A random model of ``config`` with the tiny byte tokenizer, saved as a Hugging Face folder (what users point at)."""
    from transformers import AutoModelForCausalLM

    from qaft.core.model import byte_tokenizer

    folder, tok = tmp_path / config.model_type, byte_tokenizer()
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_a_gpt2_style_model_is_one_architecture_row_and_one_line_for_every_command(smoke_file, tmp_path, capsys):
    from transformers import GPT2Config

    folder = saved(tmp_path, GPT2Config(vocab_size=261, n_embd=32, n_layer=2, n_head=2, n_positions=128, bos_token_id=0, eos_token_id=0))
    rows = diagnose(smoke_file, [f"model.name_or_path={folder}"], Launch("test"))
    bad = [r for r in rows if r.status is Status.FAIL]
    assert [r.check for r in bad] == ["architecture"]
    assert "its blocks are `transformer.h`, with Conv1D (transposed) weights" in bad[0].detail and "Qwen2/3, Gemma 2/3, Phi-3" in bad[0].detail
    assert main(["quantize", str(smoke_file), f"model.name_or_path={folder}"]) == 2
    err = capsys.readouterr().err
    assert "transformer.h" in err and "Traceback" not in err and "internal error" not in err


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"])
def test_each_written_architecture_passes_the_doctor_with_a_gguf_scheme(smoke_file, arch):
    rows = diagnose(smoke_file, [f"model.name_or_path=tiny-{arch}", "quant.weight.format=gguf", "quant.weight.gguf_type=Q4_0"], Launch("test"))
    assert [r for r in rows if r.status is Status.FAIL] == []
    assert any(r.check == "export" and "gguf" in r.detail for r in rows)


def test_a_llama_cpp_architecture_qaft_does_not_write_is_refused_before_any_compute(smoke_file, tmp_path):
    from transformers import Starcoder2Config

    config = Starcoder2Config(vocab_size=261, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    folder = saved(tmp_path, config)
    rows = diagnose(smoke_file, [f"model.name_or_path={folder}", "quant.weight.format=gguf", "quant.weight.gguf_type=Q4_0"], Launch("test"))
    bad = [r for r in rows if r.status is Status.FAIL]
    assert [r.check for r in bad] == ["export"]
    assert "llama.cpp's 'starcoder2' architecture is not written by qaft yet; the GGUF export writes gemma2, gemma3" in bad[0].detail


def test_incompatible_callbacks_are_a_config_failure(smoke_file, capsys):
    code = main(["doctor", str(smoke_file), "callbacks=[{name: qat}, {name: npft}]"])
    assert code == 2
    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("config")]
    assert "FAIL" in line and "qat cannot be combined with npft" in line


@pytest.mark.parametrize(
    "callback, zero3_blocks, zero2_blocks",
    [
        ("npft", True, False),
        ("qat", True, False),
        ("temporal_kd", True, False),
        ("mat", True, True),  # masks p.grad between backward and step, a point DeepSpeed does not have
        ("telemetry", True, False),  # reads whole adapter tensors; logs without gradient norms under ZeRO-2
    ],
)
def test_deepspeed_launch_against_callbacks(smoke_file, callback, zero3_blocks, zero2_blocks):
    extra = {"temporal_kd": "{name: temporal_kd, layers: [1]}"}.get(callback, f"{{name: {callback}}}")
    zero3 = launch_from(str(ROOT / "launch" / "zero3.yaml"))
    zero2 = launch_from(None, {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"})
    for launch, blocks in ((zero3, zero3_blocks), (zero2, zero2_blocks)):
        rows = diagnose(smoke_file, [f"callbacks=[{extra}]"], launch)
        assert (only_status(rows, f"callback {callback}") is Status.FAIL) if blocks else not rows_of(rows, f"callback {callback}")
    ddp = launch_from(str(ROOT / "launch" / "ddp-cpu.yaml"))
    assert not rows_of(diagnose(smoke_file, [f"callbacks=[{extra}]"], ddp), f"callback {callback}")
    assert launch_from(None, {"ACCELERATE_USE_FSDP": "true"}).sharded == "FSDP"


def test_the_zero_stage_of_a_deepspeed_json_file_is_read(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 3}}')
    z3 = tmp_path / "z3.yaml"
    z3.write_text(yaml.safe_dump({"distributed_type": "DEEPSPEED", "num_processes": 2, "deepspeed_config": {"deepspeed_config_file": str(ds)}}))
    launch = launch_from(str(z3))
    assert launch.sharded == "DeepSpeed ZeRO-3" and launch.engine_step == "DeepSpeed"
    ds.write_text("{not json")
    with pytest.raises(QaftError, match="cannot read deepspeed_config_file"):
        launch_from(str(z3))


def test_eval_text_overlapping_calibration_or_training_text_blocks(smoke_file, corpus, tmp_path):
    assert only_status(diagnose(smoke_file, [f"eval.path={corpus}"], Launch("t")), "data overlap") is Status.FAIL  # the same file
    import random

    rnd = random.Random(0)
    vocab = [f"w{i}" for i in range(5000)]
    words = lambda n: " ".join(rnd.choice(vocab) for _ in range(n))  # noqa: E731  (random text shares no 13-gram by chance)
    eval_text = words(4000)
    ev, cal = tmp_path / "eval.txt", tmp_path / "cal.txt"
    ev.write_text(eval_text)
    cal.write_text(words(6000))
    clean = diagnose(smoke_file, [f"eval.path={ev}", f"postpass.calibration_path={cal}"], Launch("t"))
    assert [r.status for r in rows_of(clean, "data overlap")] == [Status.OK, Status.OK]
    cal.write_text(words(6000) + " " + " ".join(eval_text.split()[:112]))  # 100 of the ~3988 eval 13-grams leak: 2.5%
    leaky = diagnose(smoke_file, [f"eval.path={ev}", f"postpass.calibration_path={cal}"], Launch("t"))
    (bad,) = [r for r in leaky if r.status is Status.FAIL]
    assert "postpass.calibration_path" in bad.detail and "2.5%" in bad.detail, bad


def test_tied_embeddings_with_a_lora_head_block(smoke_file, tmp_path):
    from transformers import LlamaConfig

    folder = tmp_path / "tied"  # a config.json is all the doctor reads: it builds the model on the meta device
    LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
    ).save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True
    ok = diagnose(smoke_file, [f"model.name_or_path={folder}"], Launch("t"))
    assert only_status(ok, "tied embeddings") is Status.OK and "tied to the input embedding" in rows_of(ok, "tied embeddings")[0].detail
    bad = diagnose(smoke_file, [f"model.name_or_path={folder}", "lora.target_modules=[q_proj, lm_head]"], Launch("t"))
    assert only_status(bad, "tied embeddings") is Status.FAIL


def test_an_unreadable_model_is_one_failing_row(smoke_file, tmp_path, capsys):
    assert main(["doctor", str(smoke_file), f"model.name_or_path={tmp_path / 'nope'}"]) == 2
    captured = capsys.readouterr()
    (line,) = [ln for ln in captured.out.splitlines() if ln.startswith("model ")]
    assert "FAIL" in line and "cannot read the config" in line and "Traceback" not in captured.err


def test_a_previous_run_in_the_output_dir_is_a_warning(smoke_file, smoke_raw, tmp_path):
    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    assert only_status(diagnose(smoke_file, [f"training.output_dir={out}"], Launch("t")), "output dir") is Status.WARN


def test_builtin_corpora_train_and_heldout_are_disjoint_and_checked(smoke_file):
    from qaft.core import text as corpora

    train, held = corpora.documents("python-docs-train"), corpora.documents("python-docs-heldout")
    every = corpora.documents("python-docs")
    assert held == every[-len(held) :] and set(train) < set(every) and not set(train) & set(held)
    assert not corpora.ngrams("\n\n".join(train)) & corpora.ngrams("\n\n".join(held))  # no shared passage either
    ok = diagnose(smoke_file, ["data.path=python-docs-train", "eval.path=python-docs-heldout"], Launch("t"))
    (row,) = rows_of(ok, "data overlap")
    assert row.status is Status.OK and " 0.0%" in row.detail
    bad = diagnose(smoke_file, ["data.path=python-docs", "eval.path=python-docs-heldout"], Launch("t"))
    assert only_status(bad, "data overlap") is Status.FAIL  # the full corpus contains the held-out part


@pytest.mark.parametrize(
    "flags, overrides, expected",
    [
        ({"avx512_bf16", "avx2"}, [], "training: bf16 autocast (auto: CPU has avx512_bf16); post-pass calibration: bf16 autocast (auto: CPU has avx512_bf16)"),
        ({"avx2"}, [], "training: float32 (auto: CPU has no bf16 units"),
        ({"amx_bf16"}, ["training.bf16=false"], "training: float32 (set in the config); post-pass calibration: bf16 autocast (auto: CPU has amx_bf16)"),
    ],
    ids=["bf16-units", "avx2-only", "forced-off"],
)
def test_the_precision_row_says_what_auto_chose_and_why(smoke_file, monkeypatch, flags, overrides, expected):
    import torch

    from qaft.core import hardware

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(hardware.OVERRIDE, raising=False)  # the suite runs under QAFT_BF16=on and =off
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    (row,) = rows_of(diagnose(smoke_file, overrides), "precision")
    assert row.status is Status.OK and row.detail.startswith(expected)


def test_the_disk_row_counts_the_checkpoints_rotation_holds_and_fails_below_the_need(smoke_file, monkeypatch):
    """The estimate grows with ``save_total_limit`` (one more checkpoint exists while a new one is written) and the
    row is FAIL below it, WARN below twice it, OK above."""
    import collections
    import re

    import qaft.core.io as io

    def need(overrides):
        (row,) = rows_of(diagnose(smoke_file, overrides), "disk space")
        kept = int(re.search(r"\((\d+) x ", row.detail).group(1))
        return kept, row

    (k2, row), (k5, _) = need(["training.save_total_limit=2"]), need(["training.save_total_limit=5"])
    assert (k2, k5) == (3, 6) and row.status is Status.OK
    total = int(float(re.search(r"about ([\d.]+) MB needed", row.detail).group(1)) * 2**20)
    usage = collections.namedtuple("usage", "total used free")
    for free, status in [(total // 2, Status.FAIL), (int(total * 1.5), Status.WARN), (total * 3, Status.OK)]:
        monkeypatch.setattr(io.shutil, "disk_usage", lambda p, f=free: usage(10 * total, 0, f))
        assert need(["training.save_total_limit=2"])[1].status is status, free


def test_the_budget_row_gives_the_feasible_range_and_blocks_a_budget_below_it(smoke_file):
    import re

    (row,) = rows_of(diagnose(smoke_file, ["postpass.reconstructor=whiten", "postpass.rank=8"]), "bits budget")
    low, high = map(float, re.search(r"from ([\d.]+) \(codes and scales, rank 0\) to ([\d.]+) \(rank 8", row.detail).groups())
    assert row.status is Status.OK and 4 < low < high
    for budget, status in [(low - 0.01, Status.FAIL), ((low + high) / 2, Status.OK), (high + 1, Status.WARN)]:
        found = rows_of(diagnose(smoke_file, ["postpass.reconstructor=whiten", "postpass.rank=8", f"postpass.budget_bpw={budget}"]), "bits budget")
        assert [r.status for r in found] == [status], found


def test_the_budget_range_with_a_menu_of_formats_runs_from_the_cheapest_to_the_dearest(smoke_file):
    import re

    base = ["postpass.reconstructor=whiten", "postpass.rank=8", "postpass.budget_bpw=5.0"]
    spans = {}
    for name, extra in (("one", []), ("menu", ["postpass.budget_formats=[{bits: 2, granularity: group, group_size: 32}, {bits: 8}]"])):
        (row,) = rows_of(diagnose(smoke_file, base + extra), "bits budget")
        spans[name] = tuple(map(float, re.search(r"within ([\d.]+) \(codes and scales, .*rank 0\) to ([\d.]+) \(", row.detail).groups()))
    assert "the cheapest format" in row.detail
    assert spans["menu"][0] == pytest.approx(2.5) and spans["menu"][0] < spans["one"][0] and spans["menu"][1] > spans["one"][1] + 3.9


def test_a_gguf_export_names_whether_llama_cpp_can_run_its_files(smoke_file, monkeypatch):
    from qaft.runtimes import llamacpp

    gguf = ["quant.weight.format=gguf", "quant.weight.gguf_type=Q4_0"]
    monkeypatch.setattr(llamacpp, "missing", lambda: "node is not on PATH")
    rows = {r.check: r for r in diagnose(smoke_file, gguf, Launch("test"))}
    assert rows["export runtime"].status is Status.WARN and "llama.cpp: node is not on PATH" in rows["export runtime"].detail
    required = {r.check: r for r in diagnose(smoke_file, [*gguf, "export.runtime_check=required"], Launch("test"))}
    assert required["export runtime"].status is Status.FAIL
    assert "export runtime" not in {r.check for r in diagnose(smoke_file, [*gguf, "export.runtime_check=skip"], Launch("test"))}
    monkeypatch.setattr(llamacpp, "missing", lambda: None)
    assert {r.check: r for r in diagnose(smoke_file, gguf, Launch("test"))}["export runtime"].status is Status.OK


def test_a_gguf_cut_inside_its_metadata_is_a_fail_row_naming_the_file_not_a_crash(smoke_file, tmp_path):
    """transformers' GGUF reader raises ``struct.error`` on metadata cut off mid-vocabulary (the first megabytes of an
    interrupted download): the doctor names the file and the fix, as ``train`` does (tests/reliability's matrix)."""
    from reliability.test_bad_input import gguf_cut_in_its_metadata

    gguf_cut_in_its_metadata(tmp_path / "meta.gguf")
    (row,) = rows_of(diagnose(smoke_file, [f"model.name_or_path={tmp_path / 'meta.gguf'}"]), "model")
    assert row.status is Status.FAIL and row.detail.startswith(
        f"model.name_or_path: {tmp_path / 'meta.gguf'} has a damaged or cut-short GGUF header (100000 bytes"
    )


def test_a_folder_with_its_own_model_code_is_one_line_saying_how_to_allow_it(smoke_file, tmp_path, capsys):
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mycustom", "auto_map": {"AutoModelForCausalLM": "modeling_my.MyModel"}}))
    (folder / "modeling_my.py").write_text("raise SystemExit('never run without trust_remote_code')\n")
    rows = diagnose(smoke_file, [f"model.name_or_path={folder}"], Launch("test"))
    [bad] = [r for r in rows if r.status is Status.FAIL]
    assert bad.check == "model" and "ships its own model code" in bad.detail and "model.trust_remote_code=true" in bad.detail
    assert main(["quantize", str(smoke_file), f"model.name_or_path={folder}"]) == 2
    err = capsys.readouterr().err
    assert "model.trust_remote_code=true" in err and "Traceback" not in err

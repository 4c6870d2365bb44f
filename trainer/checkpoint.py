"""Checkpoints that are either complete or absent, and resume that continues bit for bit.

Layout of ``output_dir/checkpoint-{step}/``::

    accelerate/          accelerator.save_state: optimizer, scheduler, RNG states (one per rank)
    adapter/             what the run trains (``Trainable``): the LoRA adapter in PEFT format (``qaft train``),
                         or the trained factors and scales by name (``qaft tune``)
    callbacks/rank{r}.pt every callback's state_dict(), keyed by callback name
    trainer_state.json   step, data position, tokens seen
    config.yaml          the training sections of the run's resolved config (``TrainConfig``)

Everything is written into ``.tmp-checkpoint-{step}`` and renamed into place only when complete (``core.io.publish``);
a rename is atomic on one filesystem, so a kill mid-save leaves the previous checkpoint as the
latest one and a stray temp folder that the next run deletes. accelerate would also save the whole
base model (540 MB for SmolLM2) with every checkpoint: a save/load pre-hook removes the model from
its lists, and we save and load the adapter ourselves. Under DeepSpeed the engine must save its
module with its optimizer (the fp32 master partitions live there): frozen parameters are excluded,
so ``accelerate/`` holds the adapter and optimizer partitions only. Under ZeRO-3 the adapter is
gathered from every process before it is written (``parallel.gathered``).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml
from peft import set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from qaft.callbacks import CallbackList, Context, TrainState
from qaft.core.configfile import diff_configs
from qaft.core.errors import CheckpointError
from qaft.core.io import TMP_PREFIX, folder_size, publish, temp_path, writing

from .config import RESUMABLE_CHANGES, TrainConfig
from .parallel import gathered, zero_stage

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp folders are never listed)."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def install_adapter_only_hooks(accelerator: Any) -> None:
    """Make ``accelerator.save_state``/``load_state`` skip the model: the adapter is saved separately."""

    def drop_weights(models: list, weights: list, output_dir: str) -> None:
        weights.clear()

    def drop_models(models: list, input_dir: str) -> None:
        models.clear()

    accelerator.register_save_state_pre_hook(drop_weights)
    accelerator.register_load_state_pre_hook(drop_models)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _engine_kwargs(acc: Any, save: bool) -> dict[str, Any]:
    """What DeepSpeed's engine needs to save and load an adapter-only checkpoint; nothing otherwise."""
    if zero_stage(acc) is None:
        return {}
    return {"exclude_frozen_parameters": True} if save else {"load_module_strict": False}


def save_adapter(acc: Any, model: torch.nn.Module, folder: Path) -> None:
    """``save_pretrained`` of the adapter by the main process, with whole tensors (every process calls this)."""
    peft_model = acc.unwrap_model(model)
    params = trainable(peft_model)
    with gathered(acc, params):
        if any(p.numel() == 0 for p in params):  # a shard slipped through: never write an empty adapter
            raise CheckpointError(f"{folder}: the adapter is sharded across processes and was not gathered; this launch is not supported")
        if acc.is_main_process:
            peft_model.save_pretrained(folder)


class Trainable:
    """What a checkpoint's ``adapter/`` folder holds: the tensors the run trains, saved whole by the main process."""

    files: tuple[str, ...] = ()
    """Files every complete ``adapter/`` folder has."""

    def save(self, acc: Any, model: torch.nn.Module, folder: Path) -> None:
        raise NotImplementedError

    def load(self, acc: Any, model: torch.nn.Module, folder: Path) -> None:
        raise NotImplementedError


class PeftAdapter(Trainable):
    """A peft LoRA adapter (``PeftModel.from_pretrained`` reads it)."""

    files = (ADAPTER_WEIGHTS,)

    def save(self, acc: Any, model: torch.nn.Module, folder: Path) -> None:
        save_adapter(acc, model, folder)

    def load(self, acc: Any, model: torch.nn.Module, folder: Path) -> None:
        adapter = load_file(folder / ADAPTER_WEIGHTS)
        peft_model = acc.unwrap_model(model)
        with gathered(acc, trainable(peft_model), modifier_rank=0):  # every process loads the same file
            result = set_peft_model_state_dict(peft_model, adapter)
        if getattr(result, "unexpected_keys", None):
            raise CheckpointError(f"checkpoint {folder.parent}: adapter has tensors this model lacks: {result.unexpected_keys[:3]}")


class TrainedTensors(Trainable):
    """Every parameter that requires grad, by its name in the model, in one safetensors file."""

    files = ("trained.safetensors",)

    def save(self, acc: Any, model: torch.nn.Module, folder: Path) -> None:
        named = {n: p for n, p in acc.unwrap_model(model).named_parameters() if p.requires_grad}
        with gathered(acc, named.values()):
            if acc.is_main_process:
                folder.mkdir(parents=True, exist_ok=True)
                save_file({n: p.detach().contiguous() for n, p in named.items()}, str(folder / self.files[0]))

    def load(self, acc: Any, model: torch.nn.Module, folder: Path) -> None:
        saved = load_file(folder / self.files[0])
        named = {n: p for n, p in acc.unwrap_model(model).named_parameters() if p.requires_grad}
        if saved.keys() != named.keys():
            odd = sorted(saved.keys() ^ named.keys())[:3]
            raise CheckpointError(f"checkpoint {folder.parent}: its trained tensors are not this run's ({odd}); resume with the run's own config")
        with torch.no_grad(), gathered(acc, named.values(), modifier_rank=0):
            for n, p in named.items():
                p.copy_(saved[n])


PEFT_ADAPTER = PeftAdapter()
TRAINED_TENSORS = TrainedTensors()


def config_text(cfg: TrainConfig) -> str:
    """What a checkpoint and ``final/`` store as ``config.yaml``: the training sections of the run's config."""
    return yaml.safe_dump(cfg.training_part(), sort_keys=False)


def save_checkpoint(ctx: Context, callbacks: CallbackList, cfg: TrainConfig, keep: int | None, what: Trainable = PEFT_ADAPTER) -> Path:
    """Write ``checkpoint-{step}`` atomically (all ranks call this), then rotate to the newest ``keep``."""
    acc = ctx.accelerator
    out = Path(cfg.training.output_dir)
    final = out / f"checkpoint-{ctx.state.step}"
    tmp = temp_path(final)
    newest = latest_checkpoint(out)
    with writing(final.name, out, cleanup=tmp, needed=folder_size(newest) if newest else None, kept=lambda: _kept(newest)):
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "callbacks").mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp / "accelerate"), **_engine_kwargs(acc, save=True))
        torch.save(callbacks.state_dict(), tmp / "callbacks" / f"rank{acc.process_index}.pt")
        what.save(acc, ctx.model, tmp / "adapter")
        if acc.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(asdict(ctx.state), indent=2))
            (tmp / "config.yaml").write_text(config_text(cfg))
        acc.wait_for_everyone()
        if acc.is_main_process:
            publish(tmp, final)
    if acc.is_main_process and keep is not None:  # rotation only after the new checkpoint is published
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    acc.wait_for_everyone()
    return final


def _kept(newest: Path | None) -> str:
    if newest is None:
        return "no checkpoint had been completed yet"
    return f"the newest complete checkpoint, {newest.name}, is intact (resume from it with training.resume_from_checkpoint=true)"


def check_resumable(path: Path, cfg: TrainConfig, what: Trainable = PEFT_ADAPTER) -> None:
    """A checkpoint must be complete and made by a compatible config, else resume could not be exact."""
    need = [STATE_FILE, "config.yaml", *(f"adapter/{f}" for f in what.files), "accelerate", "callbacks"]
    missing = [n for n in need if not (path / n).exists()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}); delete it or resume from an older one")
    try:
        saved = yaml.safe_load((path / "config.yaml").read_text())
    except yaml.YAMLError as e:
        raise CheckpointError(f"checkpoint {path}: config.yaml is unreadable ({str(e).splitlines()[0]})") from None
    now = cfg.training_part()
    changed = [k for k in diff_configs(saved, now) if k not in RESUMABLE_CHANGES]
    if changed:
        raise CheckpointError(
            f"checkpoint {path} was made with a different config ({', '.join(changed)}); resuming would not be exact. "
            "Use the original values, or start a new run (--overwrite or another training.output_dir)"
        )


def load_checkpoint(ctx: Context, callbacks: CallbackList, cfg: TrainConfig, path: Path, what: Trainable = PEFT_ADAPTER) -> TrainState:
    """Restore the trained tensors, optimizer, scheduler, RNG and callback states from ``path``; returns its
    counters (with ``max_steps`` from the current config, which decides how far to go)."""
    check_resumable(path, cfg, what)
    acc = ctx.accelerator
    try:
        what.load(acc, ctx.model, path / "adapter")
        acc.load_state(str(path / "accelerate"), **_engine_kwargs(acc, save=False))
        rank_file = path / "callbacks" / f"rank{acc.process_index}.pt"
        callbacks.load_state_dict(torch.load(rank_file, weights_only=False))
        state = TrainState(**{**json.loads((path / STATE_FILE).read_text()), "max_steps": ctx.state.max_steps})
    except CheckpointError:
        raise
    except Exception as e:  # truncated safetensors, missing optimizer file, pickle errors...
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); delete it or resume from an older one"
        ) from None
    return state


def save_final(ctx: Context, cfg: TrainConfig, train_state: TrainState, write: Callable[[torch.nn.Module, Path], None]) -> Path:
    """``final/``: what ``write(unwrapped model, folder)`` puts there, plus the run's ``config.yaml`` and
    ``trainer_state.json``; written by the main process into a temp folder and published whole."""
    acc = ctx.accelerator
    out = Path(cfg.training.output_dir)
    tmp, final = out / f"{TMP_PREFIX}final", out / "final"
    acc.wait_for_everyone()
    model = acc.unwrap_model(ctx.model)
    with gathered(acc, model.parameters()):  # ZeRO-3: the whole model; dropped on exit
        if acc.is_main_process:
            newest = latest_checkpoint(out)
            with writing("final/", out, cleanup=tmp, kept=lambda: _kept(newest)):
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                write(model, tmp)
                (tmp / "config.yaml").write_text(config_text(cfg))
                (tmp / STATE_FILE).write_text(json.dumps(asdict(train_state), indent=2))
                publish(tmp, final)
    acc.wait_for_everyone()
    return final

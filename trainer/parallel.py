"""What a multi-process launch does to weights and to the optimizer step, and what that rules out.

Two launch properties matter to qaft, and both are read from the same place by ``qaft doctor``
(from an accelerate config file or ``accelerate launch``'s environment, before any work) and by
``qaft train`` (from the live ``Accelerator``, before the first step):

- **sharded weights** (DeepSpeed ZeRO-3, FSDP): each process holds a slice of every large
  parameter. Callbacks that read or write whole tensors say why they cannot run
  (``Callback.sharded_weights_problem``); checkpoints gather the adapter before writing it
  (``gathered``), so a saved adapter is never the empty shard other tools have written.
- **an engine-owned step** (DeepSpeed, any stage): ``accelerator.backward`` runs the engine's
  backward *and* its optimizer step, and gradients live in the engine's flat buffers, so there is
  no point between backward and step where a callback could read or mask ``p.grad``
  (``Callback.engine_step_problem``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from qaft.callbacks import CALLBACKS
from qaft.core.errors import PreflightError, QaftError
from qaft.core.registry import Spec

FSDP_REFUSED = (
    "launch: FSDP is not supported by qaft train yet: its adapter and merged-model saves are untested (no GPU here, and on CPU "
    "accelerate gives FSDP ranks no working process group); to shard weights use launch/zero3.yaml (DeepSpeed ZeRO-3, tested)"
)


@dataclass(frozen=True)
class Launch:
    description: str
    sharded: str | None = None
    """``None``, or what shards the weights (``DeepSpeed ZeRO-3``, ``FSDP``)."""
    engine_step: str | None = None
    """``None``, or the engine that runs the optimizer step inside backward (``DeepSpeed``)."""


def _deepspeed(stage: int | str, where: str) -> Launch:
    return Launch(f"DeepSpeed ZeRO-{stage}{where}", "DeepSpeed ZeRO-3" if str(stage) == "3" else None, "DeepSpeed")


def _zero_stage_of(section: Mapping[str, Any], config_file: str) -> int:
    """``zero_stage`` of an accelerate config, or ``zero_optimization.stage`` of the DeepSpeed JSON it names."""
    if "deepspeed_config_file" not in section:
        return int(section.get("zero_stage", 0))
    path = Path(section["deepspeed_config_file"])  # relative to the working folder, as accelerate reads it
    try:
        return int(json.loads(path.read_text()).get("zero_optimization", {}).get("stage", 0))
    except (OSError, ValueError) as e:
        raise QaftError(f"--launch: {config_file}: cannot read deepspeed_config_file {str(path)!r}: {str(e).splitlines()[0]}") from None


def launched_with(engine: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``accelerate launch`` started this process under ``engine`` (``DEEPSPEED``, ``FSDP``): the variable
    ``ACCELERATE_USE_<engine>`` it exports to every rank."""
    return (os.environ if environ is None else environ).get(f"ACCELERATE_USE_{engine}", "").lower() == "true"


def launch_from(config_file: str | None, environ: Mapping[str, str] | None = None) -> Launch:
    """Read an accelerate config file, or the variables ``accelerate launch`` exports to the process."""
    env = os.environ if environ is None else environ
    if config_file:
        try:
            raw = yaml.safe_load(Path(config_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise QaftError(f"--launch: cannot read accelerate config {config_file!r}: {str(e).splitlines()[0]}") from None
        kind = str(raw.get("distributed_type", "NO")).upper()
        procs = raw.get("num_processes", 1)
        if kind == "DEEPSPEED":
            return _deepspeed(_zero_stage_of(raw.get("deepspeed_config") or {}, config_file), f", {procs} process(es)")
        if kind == "FSDP":
            return Launch(f"FSDP, {procs} process(es)", "FSDP")
        return Launch(f"{kind}, {procs} process(es)")
    if launched_with("DEEPSPEED", env):
        return _deepspeed(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "?"), " (environment)")
    if launched_with("FSDP", env):
        return Launch("FSDP (environment)", "FSDP")
    return Launch(f"single process or DDP ({env.get('WORLD_SIZE', '1')} process(es))")


def zero_stage(accelerator: Any) -> int | None:
    """The DeepSpeed ZeRO stage the accelerator runs, or None without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.zero_stage)


def launch_of(accelerator: Any) -> Launch:
    stage = zero_stage(accelerator)
    if stage is not None:
        return _deepspeed(stage, f", {accelerator.num_processes} process(es)")
    if accelerator.distributed_type.name == "FSDP":
        return Launch(f"FSDP, {accelerator.num_processes} process(es)", "FSDP")
    return Launch(f"{accelerator.distributed_type.name}, {accelerator.num_processes} process(es)")


def callback_problems(specs: Iterable[Spec], launch: Launch) -> list[tuple[str, str]]:
    """``(callback name, one-line reason)`` for every configured callback this launch rules out."""
    found = []
    for spec in specs:
        cls = CALLBACKS.get(spec.name)
        if launch.sharded and (why := cls.sharded_weights_problem(spec.options)):
            found.append((spec.name, f"callbacks: {spec.name} under {launch.sharded}: {why}; launch with DDP or ZeRO-2 (launch/)"))
        elif launch.engine_step and (why := cls.engine_step_problem(spec.options)):
            found.append((spec.name, f"callbacks: {spec.name} under {launch.engine_step}: {why}; launch with DDP (launch/ddp-cpu.yaml, ddp-gpu.yaml)"))
    return found


def skip_inference_comm_build() -> None:
    """Keep DeepSpeed from compiling its shared-memory all-reduce when the process group starts.

    DeepSpeed's torch backend JIT-compiles ``deepspeed_shm_comm`` (C++, ~1-3 min with gcc and ninja, under a file lock
    every rank waits on) on every fresh machine, for ``inference_all_reduce``, which only DeepSpeed-Inference's tensor
    parallelism calls: ZeRO training reduces through the process group. Marking the op incompatible before the backend
    starts (DeepSpeed then falls back as it does on a platform without the op) removes the compiler from the launch;
    a compile that hung, or whose lock a killed run left behind, would otherwise stall every later launch."""
    import deepspeed.ops

    table = getattr(deepspeed.ops, "__compatible_ops__", None)  # a dict in every DeepSpeed that has the op (0.14+)
    if isinstance(table, dict):
        table["deepspeed_shm_comm"] = False


def fill_deepspeed_config(accelerator: Any, max_grad_norm: float, accumulation: int) -> None:
    """DeepSpeed clips and accumulates by itself: hand it ``training.max_grad_norm`` and
    ``gradient_accumulation_steps`` where the launch file says ``auto`` (accelerate would fill 1.0
    for clipping), and refuse a number that disagrees, which would train differently from the config."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    for key, ours, want in (
        ("gradient_clipping", "max_grad_norm", max_grad_norm),
        ("gradient_accumulation_steps", "gradient_accumulation_steps", accumulation),
    ):
        have = ds.get(key, "auto")
        if have == "auto":
            ds[key] = want
        elif float(have) != float(want):
            raise PreflightError(f"launch config: deepspeed {key} is {have} but training.{ours} is {want}; set it to auto in the launch file (qaft fills it)")


def check_launch(specs: Iterable[Spec], accelerator: Any) -> None:
    problems = callback_problems(specs, launch_of(accelerator))
    if problems:
        raise PreflightError("; ".join(why for _, why in problems))


def gathered(accelerator: Any, params: Iterable[torch.nn.Parameter], *, modifier_rank: int | None = None) -> contextlib.AbstractContextManager:
    """Whole tensors inside the block under ZeRO-3 (every process must enter it); a no-op otherwise.

    ``modifier_rank=r``: what rank r writes into them is kept (and re-sharded) on exit; ``None``:
    read-only, changes are dropped. Small parameters that DeepSpeed keeps whole
    (``stage3_param_persistence_threshold``) pass through unchanged."""
    if zero_stage(accelerator) != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank)

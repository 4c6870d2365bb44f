"""``qaft tune``: train the low-rank correction of a quantized model against the float model it came from.

The post-pass solves each layer's factors in closed form, one SVD of a weighted error per layer; they
never see the model's loss. Tuning keeps every integer code frozen and trains, in the same loop as
``qaft train``, the factors of every ``QuantLinear`` (``lora_A [k, in]``, ``lora_B [out, k]``: shapes
and orientation unchanged, so both exports take them as they are) and, with ``train_scales``, the
per-channel / per-group scales.

Objective ``kd``: ``T² · KL(p_teacher,T ‖ p_student,T)`` of the next-token distributions at every
position, averaged over positions; the teacher is the float model the post-pass quantized (a run's
``final/``, or the original), frozen, in eval mode. There is no label term: the student can only
recover what the teacher knows, so a tuned model's perplexity is bounded by the float model's and
the comparison stays honest (a label term would also adapt to the domain).

Activation-quantized schemes tune as deployed: the base path sees ``Q_a(x)`` with a straight-through
gradient, the factors the unquantized ``x`` (``QuantLinear``). The result is a post-pass folder
(``quant.store``) in ``final/`` with a ``tune`` record (config, steps, the text's sha256), which
``qaft export`` reads.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

from qaft.callbacks import CALLBACKS
from qaft.core import memory
from qaft.core.errors import CheckpointError, ConfigError, PreflightError
from qaft.core.hardware import resolve_bf16
from qaft.core.io import sha256_file
from qaft.core.logits import Head, head_of, next_token_losses
from qaft.core.model import load_model_and_tokenizer
from qaft.core.modules import decoder_layers
from qaft.core.typed import parse, to_plain
from qaft.quant.calibrate import calibration_ids
from qaft.quant.fakequant import QuantLinear, narrow_codes
from qaft.quant.lowrank import balanced
from qaft.quant.postpass import block_errors, layer_input
from qaft.quant.scheme import QuantScheme, WeightFormat
from qaft.quant.store import META, load_quantized, read_codes, write_quantized

from .checkpoint import TRAINED_TENSORS
from .config import Objective, TrainConfig, TrainingConfig, TuneConfig
from .kd import kd_per_position
from .parallel import launch_of
from .schedule import phased_scheduler
from .task import Task, enable_gradient_checkpointing


@dataclasses.dataclass(frozen=True, kw_only=True)
class TuneJob(TrainConfig):
    """One tuning run: the teacher (``model``), the tuning text (``data``), the loop (``training``), the
    scheme, the tuning options and the post-pass folder it starts from. Built from the root config by
    the pipeline (``commands.tune_job``); a checkpoint records all of it, so a resume is exact."""

    tune: TuneConfig
    """The ``tune`` section."""
    source: str
    """The post-pass result the factors start from (``postpass.output_dir``)."""
    rank: int
    """The factors' rank when ``tune.init`` is ``zero`` (``postpass.rank``)."""

    @property
    def source_id(self) -> str | None:
        """sha256 of the source's record (which holds its calibration and per-layer telemetry): a re-quantized
        folder at the same path is another start, so checkpoints and results of the old one are not reused."""
        record = Path(self.source) / META
        return sha256_file(record) if record.is_file() else None

    def training_part(self) -> dict[str, Any]:
        return super().training_part() | {"tune": to_plain(self.tune), "source": self.source, "source_sha256": self.source_id, "rank": self.rank}


def check_source(job: TuneJob) -> dict[str, Any]:
    """The post-pass record ``job.source`` holds, refused when tuning cannot start from it."""
    src = Path(job.source)
    if not (src / META).is_file():
        raise CheckpointError(f"tune: no post-pass result at {src} (no {META}); run `qaft quantize CONFIG` or `qaft run CONFIG --from quantize` first")
    meta = json.loads((src / META).read_text())
    if str(meta["source_model"]) != str(job.model.name_or_path):
        raise ConfigError(
            f"tune: the post-pass result at {src} was made from {meta['source_model']!r}, but the teacher (model.name_or_path) is "
            f"{job.model.name_or_path!r}; quantize the teacher again, or point model.name_or_path at {meta['source_model']!r}"
        )
    if job.tune.init == "closed_form" and not meta.get("rank"):
        raise ConfigError(f"tune.init: closed_form starts from the post-pass factors, and {src} has none (reconstructor none); use tune.init=zero")
    if job.tune.init == "zero" and job.rank == 0 and not job.tune.train_scales:
        raise ConfigError("tune.init: zero creates factors of rank postpass.rank, which is 0; set postpass.rank (e.g. 32) or tune.train_scales=true")
    return meta


def check_options(tune: TuneConfig, weight_format: WeightFormat) -> None:
    """What the tuning options cannot do with this scheme, one line each."""
    if tune.train_scales and weight_format is not WeightFormat.INT:
        raise ConfigError(
            f"tune.train_scales: only int schemes can train their scales (the {weight_format.value} grid fixes them: MXINT's are powers of "
            "two, GGUF's are re-derived from each block by llama.cpp's writer); set tune.train_scales=false"
        )
    bad = [(s.name, why) for s in tune.callbacks if (why := CALLBACKS.get(s.name).quantized_base_problem(s.options))]
    if bad:
        raise ConfigError([f"tune.callbacks: {name} cannot run in qaft tune: {why}" for name, why in bad])


@torch.no_grad()
def balance_factors(model: torch.nn.Module) -> None:
    """``tune.init: closed_form``: the post-pass factors, balanced (``lowrank.balanced``: the same product,
    ``‖lora_B[:, j]‖ = ‖lora_A[j]‖``), so that AdamW's per-element steps are of one size for both factors."""
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.lora_A is not None:
            a, b = balanced(m.lora_B, m.lora_A)  # our A = peft's lora_B [out, k], our B = peft's lora_A [k, in]
            m.lora_B.copy_(a.to(m.lora_B.dtype))
            m.lora_A.copy_(b.to(m.lora_A.dtype))


def fresh_factors(model: torch.nn.Module, rank: int, seed: int) -> None:
    """``tune.init: zero``: every ``QuantLinear`` gets rank-``rank`` factors as peft starts a LoRA adapter,
    ``lora_B = 0`` (the model is unchanged) and ``lora_A`` Kaiming-uniform (so ``lora_B`` gets a gradient)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            k = min(rank, m.in_features, m.out_features)
            bound = 1 / math.sqrt(m.in_features)
            a = (torch.rand(k, m.in_features, generator=g) * 2 - 1) * bound
            m.lora_A = torch.nn.Parameter(a.to(m.weight.dtype), requires_grad=False)
            m.lora_B = torch.nn.Parameter(torch.zeros(m.out_features, k, dtype=m.weight.dtype), requires_grad=False)


@torch.no_grad()
def lean_teacher(teacher: torch.nn.Module, student: torch.nn.Module, *, bf16: bool) -> None:
    """Hold the teacher in much less memory than a second float model, computing the same logits.

    Parameters equal to the student's (the embeddings and a tied or untied head, the norms: the post-pass
    changes only the quantized Linears and, with smoothing, the norms it folds into) are held once. Which
    copy: a teacher loaded from safetensors holds a memory map of the checkpoint, resident as far as it
    has been read, and the map lives as long as any of its tensors does. In float32 the teacher's Linears
    keep it alive anyway, so both models use the teacher's tensors and the student's copies go; under bf16
    the teacher's Linears become copies, so both use the student's and the map can go.

    Under bf16 autocast (``bf16``) the teacher's other Linears are stored in bf16: autocast casts a float32
    weight to bf16 for every matmul anyway, so the products are bit for bit the same (tested), at half the
    memory and without a cast per forward. The teacher is then only for forwards under that autocast."""
    theirs = dict(teacher.named_parameters(remove_duplicate=False))
    for name, s in list(student.named_parameters(remove_duplicate=False)):
        p = theirs.get(name)
        if p is not None and s is not p and s.shape == p.shape and s.dtype == p.dtype and torch.equal(s, p):
            owner, _, leaf = name.rpartition(".")
            holder, kept = (teacher, s) if bf16 else (student, p)
            setattr(holder.get_submodule(owner), leaf, kept)
    if not bf16:
        return
    shared = {id(p) for p in student.parameters()}
    for m in teacher.modules():
        if isinstance(m, torch.nn.Linear) and id(m.weight) not in shared:
            m.weight = torch.nn.Parameter(m.weight.to(torch.bfloat16), requires_grad=False)
            if m.bias is not None:
                m.bias = torch.nn.Parameter(m.bias.to(torch.bfloat16), requires_grad=False)


@dataclasses.dataclass
class LayerOutputs:
    """``block``'s forward: one decoder layer's output, quantized (with grad) and float, on the same input."""

    student: torch.Tensor
    teacher: torch.Tensor


def _first(y: Any) -> torch.Tensor:
    return y[0] if isinstance(y, tuple) else y


class Distill(Task):
    """``qaft tune``'s task: the post-pass model's factors (and scales) trained against the float teacher."""

    verb = "qaft tune"
    trainable = TRAINED_TENSORS

    def __init__(self, job: TuneJob):
        self.job = job
        self.meta = check_source(job)
        self.scheme = parse(QuantScheme, self.meta["scheme"], "scheme")
        check_options(job.tune, self.scheme.weight.format)
        self.teacher: torch.nn.Module | None = None

    def check(self, cfg: TrainConfig, accelerator: Any) -> None:
        launch = launch_of(accelerator)
        if launch.sharded:
            raise PreflightError(
                f"launch: qaft tune under {launch.sharded} is not supported: the quantized layers hold whole codes and "
                "factors per process; tune with DDP or one process (launch/ddp-cpu.yaml, ddp-gpu.yaml)"
            )
        if self.job.tune.objective is Objective.BLOCK and accelerator.num_processes > 1:
            raise PreflightError(
                f"tune.objective: block trains one decoder layer at a time outside the model's forward, which DDP does not "
                f"synchronise; run it on one process (this launch has {accelerator.num_processes}), or use tune.objective=kd"
            )

    def build(self, cfg: TrainConfig) -> tuple[torch.nn.Module, Any]:
        # What a quantized layer holds while tuning (all before the teacher loads). Only its codes, 1 byte per weight,
        # where the forward de-quantizes anyway (trained scales) or where one layer at a time keeps its weight for
        # the backward (block). Otherwise (kd: every layer's weight is kept for the backward) only the weight, in bf16
        # under bf16 autocast (exact: QuantLinear.refresh_weight); the codes are frozen and not read until
        # write_final, which takes them back from the source.
        codes_only = self.job.tune.train_scales or self.job.tune.objective is Objective.BLOCK
        student, tokenizer, _ = load_quantized(self.job.source, weights=not codes_only)
        if self.job.tune.init == "zero":
            fresh_factors(student, self.job.rank, cfg.training.seed)  # lora_B = 0: the model as solved
        else:
            balance_factors(student)  # the same products
        student.requires_grad_(False)
        layers = [m for m in student.modules() if isinstance(m, QuantLinear)]
        for m in layers:
            for p in (m.lora_A, m.lora_B, m.scale if self.job.tune.train_scales else None):
                if p is not None:
                    p.requires_grad_(True)
        if not any(p.requires_grad for p in student.parameters()):
            raise ConfigError(f"tune: nothing to train in {self.job.source}: no low-rank factors (rank 0) and tune.train_scales is false")
        self.weight_dtype = layers[0].weight_dtype if layers else torch.float32
        self.bf16 = resolve_bf16(cfg.training.bf16)[0]
        self.source_id = self.job.source_id
        for m in layers if not codes_only else ():
            if self.bf16:
                m.refresh_weight(torch.bfloat16)
            m.codes = None
        memory.release()  # the load's temporaries, before the teacher's
        teacher, _ = load_model_and_tokenizer(self.job.model)
        self.teacher = teacher.eval().requires_grad_(False)
        self.layers = list(zip(decoder_layers(student)[1], decoder_layers(self.teacher)[1]))
        if self.job.tune.objective is Objective.BLOCK and cfg.training.max_steps < len(self.layers):
            raise ConfigError(
                f"tune.steps: block tunes the {len(self.layers)} decoder layers one after another, so it needs at least "
                f"{len(self.layers)} steps (got {cfg.training.max_steps}); e.g. tune.steps={20 * len(self.layers)}"
            )
        lean_teacher(self.teacher, student, bf16=self.bf16)
        self.solved_errors = self.errors_by_block(student, tokenizer)  # now, rather than reloading the solved model at the end
        if cfg.training.gradient_checkpointing:
            enable_gradient_checkpointing(student, "tune.gradient_checkpointing")
        return student.train(), tokenizer

    def param_groups(self, model: torch.nn.Module, t: TrainingConfig) -> list[dict[str, Any]]:
        """The factors at ``tune.learning_rate``; each layer's scales in a group of their own, at
        ``tune.scales_relative_lr`` × that layer's mean |scale| and without weight decay.

        AdamW moves a parameter by about its learning rate per step, whatever the parameter's size: the factors' rate
        (4e-4) is a few percent of a 4-bit group-64 scale (~0.01) per step, and tuning with it diverged on SmolLM2
        (held-out KL 0.076 -> 0.130 in 50 steps). A rate proportional to the layer's scales moves every layer by the
        same fraction. Fixed from the source's scales when the model is built, so a resumed run has the same rates."""
        scales = [m.scale for m in model.modules() if isinstance(m, QuantLinear) and m.scale.requires_grad]
        ids = {id(s) for s in scales}
        groups = [{"params": [p for g in super().param_groups(model, t) for p in g["params"] if id(p) not in ids]}]
        rel = self.job.tune.scales_relative_lr
        groups += [{"params": [s], "lr": rel * s.detach().abs().mean().item(), "weight_decay": 0.0} for s in scales]
        return [g for g in groups if g["params"]]

    def ready(self, accelerator: Any) -> None:
        self.teacher.to(accelerator.device)
        self.accelerator = accelerator

    @torch.no_grad()
    def teacher_head(self, batch: dict[str, torch.Tensor]) -> Head:
        """The teacher up to its head, under the same autocast as the student (bf16 matmuls when ``training.bf16``)."""
        with self.accelerator.autocast():
            return head_of(self.teacher, batch["input_ids"])

    def kd(self, student: Head, teacher: Head, temperature: float) -> torch.Tensor:
        """``kd_per_position`` at every position, ``[batch, T]``, over chunks of positions: the student's and the
        teacher's logits of one chunk at a time (Gemma 3's 262k vocabulary: 0.5 GB per 512 positions and tensor)."""

        def piece(s: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                t = teacher.apply(hidden)
            return kd_per_position(s, t, temperature)

        return student.chunks(piece, teacher.hidden, positions=student.hidden.shape[1])

    def phase_starts(self, steps: int) -> list[int]:
        """``block``: the first step of each decoder layer's phase (``steps`` split evenly, in order)."""
        n = len(self.layers)
        return [math.ceil(i * steps / n) for i in range(n)]

    def scheduler(self, opt: torch.optim.Optimizer, t: TrainingConfig, max_steps: int) -> Any:
        if self.job.tune.objective is Objective.BLOCK:
            self.optimizer = opt  # forget_finished drops what it holds for layers that are done
            return phased_scheduler(opt, t, self.phase_starts(max_steps), max_steps)
        return super().scheduler(opt, t, max_steps)

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], step: int) -> Any:
        """``kd``: the student's forward. ``block``: the input of this phase's layer, as the (already tuned) layers below
        produce it (quantized propagation, no graph), then that layer and the float layer on it."""
        if self.job.tune.objective is Objective.KD:
            return head_of(model, batch["input_ids"])
        phase = bisect.bisect_right(self.phase_starts(self.job.training.max_steps), step) - 1
        self.forget_finished(phase)
        student, teacher = self.layers[phase]
        with torch.no_grad():
            hidden, kw = layer_input(model, student, batch["input_ids"])
        with self.accelerator.autocast():
            out = _first(student(hidden, **kw))
            with torch.no_grad():
                target = _first(teacher(hidden, **kw))
        return LayerOutputs(out, target)

    def forget_finished(self, phase: int) -> None:
        """``block``: a layer whose phase is over never trains again (no later step gives it a gradient), so the
        optimizer's state for it (AdamW: two moments per factor entry) is dropped. Deterministic in the step, so
        a checkpoint holds the same states a straight run would, and a resume stays exact."""
        for student, _ in self.layers[:phase]:
            for p in student.parameters():
                self.optimizer.state.pop(p, None)

    def loss(self, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor:
        if isinstance(outputs, LayerOutputs):
            return (outputs.student.float() - outputs.teacher.float()).pow(2).sum() / outputs.teacher.float().pow(2).sum().clamp(min=1e-30)
        return self.kd(outputs, self.teacher_head(batch), self.job.tune.temperature).mean()

    def eval_terms(self, batch: dict[str, torch.Tensor], head: Head) -> dict[str, torch.Tensor]:
        """On the held-out blocks, per sequence: ``eval_kl``, the KL to the teacher at temperature 1 (what tuning
        lowers), and ``eval_teacher_loss``, the teacher's own next-token loss (``eval_teacher_ppl``: the bound)."""
        teacher = self.teacher_head(batch)
        own = teacher.chunks(next_token_losses, batch["input_ids"][:, 1:]).mean(1)
        return {"eval_kl": self.kd(head, teacher, 1.0).mean(-1), "eval_teacher_loss": own}

    def errors_by_block(self, model: torch.nn.Module, tokenizer: Any) -> list[float]:
        """Per decoder block, the relative output error against the teacher on the post-pass's own calibration
        tokens (``postpass.block_errors``); the record keeps it as solved and as tuned (the report plots both).
        Both are measured as tuning computes, under its autocast: the lean teacher (``lean_teacher``) is not a
        float32 model any more, and a second, float32 one for the record would be the run's peak memory."""
        c = self.meta["calibration"]
        was = model.training
        model.eval()
        device = next(model.parameters()).device
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
                return block_errors(model, self.teacher, calibration_ids(c["path"], tokenizer, c["samples"], c["seq_len"]))
        finally:
            model.train(was)

    def restore_codes(self, model: torch.nn.Module) -> None:
        """The codes ``build`` let go of, read back from the source, which must be the folder tuning started from."""
        if self.job.source_id != self.source_id:
            raise CheckpointError(
                f"tune: the post-pass result at {self.job.source} changed while tuning (it was quantized again); its codes are not "
                "the ones these factors were trained on: run `qaft tune CONFIG --overwrite` again"
            )
        missing = [n for n in self.meta["quantized"] if model.get_submodule(n).codes is None]
        for name, codes in read_codes(self.job.source, missing).items():
            model.get_submodule(name).codes = narrow_codes(codes)

    def write_final(self, model: torch.nn.Module, tokenizer: Any, folder: Path) -> None:
        self.restore_codes(model)
        for m in model.modules():
            if isinstance(m, QuantLinear) and m.weight is not None:  # released weights are not stored either
                m.refresh_weight(self.weight_dtype)  # bf16 storage while tuning
        record = {
            "config": to_plain(self.job.tune),
            "source": self.job.source,
            "source_sha256": self.job.source_id,
            "teacher": self.job.model.name_or_path,
            "data": {
                "path": self.job.data.path,
                "sha256": sha256_file(Path(self.job.data.path)) if Path(self.job.data.path).is_file() else None,
                "seq_len": self.job.data.block_size,
            },
            "start": self.meta["method"],
            "steps": self.job.training.max_steps,
            "block_errors": {"closed_form": self.solved_errors, "tuned": self.errors_by_block(model, tokenizer)},
        }
        meta = {k: v for k, v in self.meta.items() if k not in ("format_version", "scheme", "quantized")}
        rank = self.job.rank if self.job.tune.init == "zero" else meta["rank"]
        method = f"{self.meta['method']}+{self.job.tune.objective.value}"
        write_quantized(model, tokenizer, folder, self.scheme, meta | {"method": method, "rank": rank, "tune": record})

    def done(self, steps: int, final: Path) -> str:
        return f"{self.verb}: done, {steps} steps; tuned post-pass result in {final} (export it with `qaft export`)"

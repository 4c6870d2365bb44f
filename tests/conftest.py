"""Shared fixtures: a small text corpus, the smoke config as a dict, config builders, and two session-wide
results that many tests only read (a finished tiny training run, a tiny post-pass result), built once."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # same as the CLI: see qaft.pipeline.cli (before torch loads)
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test-fast` runs one worker per core: one thread each, not two apiece
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

TRUE = ("1", "true", "yes")
IN_CI = os.environ.get("CI", "").strip().lower() in TRUE
REQUIRE_TIERS = os.environ["QAFT_REQUIRE_TIERS"].strip().lower() in TRUE if "QAFT_REQUIRE_TIERS" in os.environ else IN_CI
"""``CI=true`` (or ``QAFT_REQUIRE_TIERS=1``): a test skipped because this machine lacks something (llama.cpp, chromium,
mount rights, the SmolLM2 package) fails instead, so CI cannot be green with a tier that never ran."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_TIERS and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid}: skipped, which CI=true / QAFT_REQUIRE_TIERS=1 does not allow: {reason.removeprefix('Skipped: ')}"


def pytest_configure(config):
    if IN_CI:  # CI replays the same examples; locally hypothesis explores new ones each run
        from hypothesis import settings

        settings.register_profile("ci", derandomize=True, print_blob=True)
        settings.load_profile("ci")


@pytest.fixture(scope="session", autouse=True)
def gguf_cache(tmp_path_factory):
    """One de-quantized-GGUF cache for the session (``core.model.gguf_cache``): the SmolLM2 tests convert the
    GGUF once instead of once each, and nothing is written under the user's home."""
    os.environ["QAFT_CACHE"] = str(tmp_path_factory.mktemp("qaft-cache"))
    yield


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


def _session_cfg(corpus: Path, out: Path, *overrides: str):
    from qaft.pipeline.config import config_from_dict

    raw = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    raw["data"]["path"], raw["training"]["output_dir"] = str(corpus), str(out)
    return config_from_dict(raw, list(overrides))


@pytest.fixture(scope="session")
def trained_run(corpus, tmp_path_factory):
    """The config of one finished tiny-llama run: 6 steps, logged every 2, checkpoints at 3 and 6, telemetry every 3.
    Read it, never write into ``training.output_dir``: every test of the session sees the same folder."""
    from qaft.trainer.loop import fit

    cfg = _session_cfg(
        corpus,
        tmp_path_factory.mktemp("trained") / "run",
        "training.max_steps=6",
        "training.save_steps=3",
        "training.logging_steps=2",
        "training.learning_rate=1e-2",
        "callbacks.0.every=3",
    )
    fit(cfg)
    return cfg


@pytest.fixture(scope="session")
def quantized_default(corpus, tmp_path_factory):
    """The default post-pass (W4 per-channel + L2QER rank 4, 4 x 32 calibration tokens) of the untrained tiny-llama,
    written once. Tests export it into a folder of their own: ``export.dir=...``, never into its output folder."""
    from helpers import SMALL_POSTPASS
    from qaft.pipeline.commands import quantize_and_save

    cfg = _session_cfg(corpus, tmp_path_factory.mktemp("quantized") / "run", *SMALL_POSTPASS)
    quantize_and_save(cfg, overwrite=False, progress=False)
    return cfg

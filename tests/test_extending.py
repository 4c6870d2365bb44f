"""``docs/extending.md`` runs as written: each section's Python blocks, in order, in a fresh interpreter
(so the example registrations never leak into the other tests), and each section's "try it" output is
what the section says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "extending.md").read_text()


def sections() -> dict[str, str]:
    parts = re.split(r"^## ", DOC, flags=re.M)[1:]
    return {p.splitlines()[0].strip(): "\n".join(re.findall(r"```python\n(.*?)```", p, re.S)) for p in parts}


def test_the_page_shows_all_four_extension_points():
    assert list(sections()) == ["A callback", "A weight quantizer", "A reconstructor", "An export format"]


EXPECT = {
    "A callback": r"^\[\d\.\d+(e-\d+)?, \d\.\d+(e-\d+)?\]$",  # the penalty is logged every step
    "A weight quantizer": r"^14 layers, mean output error after the correction 0\.\d+$",
    "A reconstructor": r"^\['l2qer_max', 'gptq\+l2qer_max', 'signround\+l2qer_max'\]$",
    "An export format": r"^\['README\.md', 'config\.json', .*'manifest\.json', 'model\.safetensors'.*\] \{'transformers': \{'max_abs_diff': ",
}


@pytest.mark.parametrize("title", list(EXPECT))
def test_each_example_runs_as_written(title, tmp_path):
    r = subprocess.run([sys.executable, "-c", sections()[title]], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    assert re.search(EXPECT[title], last), last

"""Every number in a table of README.md and docs/ comes from a committed result: it appears, to the digits
shown, in some ``benchmarks/results/*.json`` that the benchmark which wrote it recorded with its settings.
(``docs/config.md`` is generated from the code and holds defaults, not measurements.)"""

from __future__ import annotations

import bisect
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def recorded() -> list[float]:
    found: list[float] = []

    def walk(x) -> None:
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            found.append(float(x))

    for f in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        walk(json.loads(f.read_text()))
    return sorted(set(found))


def unsourced(text: str, values: list[float]) -> list[str]:
    """Decimal numbers in the body cells of the markdown tables of ``text`` that no recorded value rounds to."""

    def sourced(token: str) -> bool:
        x, tol = float(token), 0.5 * 10 ** -len(token.split(".")[1]) + 1e-9
        i = bisect.bisect_left(values, x - tol)
        return i < len(values) and values[i] <= x + tol

    cells = [line for line in text.splitlines() if line.startswith("|") and not set(line) <= set("|-: ")]
    return [t for line in cells for t in re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", line) if not sourced(t)]


def test_every_table_figure_in_the_docs_has_a_committed_source():
    values = recorded()
    pages = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").rglob("*.md") if p.name != "config.md")]
    missing = {str(p.relative_to(ROOT)): bad for p in pages if (bad := unsourced(p.read_text(), values))}
    assert missing == {}, missing


def test_the_check_catches_a_figure_without_a_source():
    values = recorded()
    assert unsourced("| float | 30.15 | 63.03 |", values) == []  # the protocol's float and RTN ppl, recorded
    assert unsourced("| float | 30.15 | 63.04 |\n|---|---|---|\n| x | 12.345 | 1 |", values) == ["63.04", "12.345"]

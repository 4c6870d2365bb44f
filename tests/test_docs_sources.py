"""Every figure of README.md and of the docs pages names its source in docs/figures.yaml, and the test compares
exactly that value.

``docs/figures.yaml`` lists, page by page, each decimal figure and measured time (``5 min 19 s``, ``86 s``) of the
page in reading order (tables and prose; fenced code left out) with where it comes from:

- ``["33.16", tune.json, results, w4/whiten, tuned_ppl]``: the value at that path of ``benchmarks/results/tune.json``;
  a mapping as a path step picks the one list element whose keys hold those values (``{model: original, method: fp}``);
- ``["0.87", ratio, [A...], [B...]]``: A / B, each a source as above or itself derived; ``gain%``: 100 (B − A) / B;
  ``diff``: A − B; ``percent``: 100 A / B; ``times``: A · B (a unit: seconds → ms); B may be a plain number;
  ``["31.53", mean, [A...], [B...], ...]`` and ``range``: the mean, and max − min, of several draws (``min``,
  ``max``: the bounds of a range the page gives);
- ``["1.06", "=", why]``: not a measurement (a goal, a setting), said so.

A figure matches when its source, printed to the digits the page shows, is that figure: a one-digit typo, a figure
moved to another row, or a new figure without a line in the list fails, and so does a docs page with figures and no
list (``docs/config.md`` is generated from the code and holds defaults, not measurements)."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FIGURE = r"(?<![\w.])\d+\.\d+(?!\w|\.\d)"
DURATION = r"\b\d+ min \d+ s\b|(?<![\w.])\d+ s\b"
"""Measured times as the pages print them (``5 min 19 s``, ``86 s``), in seconds in the results."""
LISTED = yaml.safe_load((ROOT / "docs" / "figures.yaml").read_text())


def figures(text: str) -> list[str]:
    """Decimal figures and durations of a markdown page in reading order, fenced code blocks and inline code left out."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(f"{DURATION}|{FIGURE}", text)


@cache
def results(name: str) -> Any:
    return json.loads((RESULTS / name).read_text())


def value_at(source: list[Any]) -> float:
    """The number at ``[file, step, ...]``: keys, list indices, or a mapping that picks one list element."""
    node, where = results(source[0]), source[0]
    for step in source[1:]:
        if isinstance(step, dict):
            hits = [x for x in node if all(str(x.get(k)) == str(v) for k, v in step.items())]
            assert len(hits) == 1, f"{where}: {step} picks {len(hits)} elements, not one"
            node = hits[0]
        else:
            node = node[step]
        where += f" > {step}"
    assert isinstance(node, (int, float)) and not isinstance(node, bool), f"{where} is not a number: {node!r}"
    return float(node)


KINDS = {
    "ratio": lambda a, b: a / b,
    "gain%": lambda a, b: 100 * (b - a) / b,
    "diff": lambda a, b: a - b,
    "percent": lambda a, b: 100 * a / b,
    "times": lambda a, b: a * b,
    "mean": lambda *draws: sum(draws) / len(draws),
    "range": lambda *draws: max(draws) - min(draws),
    "min": lambda *draws: min(draws),
    "max": lambda *draws: max(draws),
}
"""Figures derived from sources: each argument is itself a source (a path, or another derived figure)."""


def value_of(source: list[Any] | float) -> float:
    if isinstance(source, (int, float)):  # a constant of the page's own sentence (an interval, a count)
        return float(source)
    if source[0] in KINDS:
        return KINDS[source[0]](*(value_of(arg) for arg in source[1:]))
    return value_at(source)


def shown(entry: list[Any]) -> str | None:
    """What the entry's source prints as at the figure's digits, or None for a stated non-measurement."""
    figure = str(entry[0])
    if entry[1] == "=":
        return None
    x = value_of(entry[1:])
    if re.fullmatch(DURATION, figure):
        seconds = round(x)
        return f"{seconds // 60} min {seconds % 60} s" if "min" in figure else f"{seconds} s"
    return f"{x:.{len(figure.split('.')[1])}f}"


@pytest.mark.parametrize("page", sorted(LISTED))
def test_every_figure_of_a_listed_page_names_its_source_and_matches_it(page):
    entries = LISTED[page]
    on_page = figures((ROOT / page).read_text())
    listed = [str(e[0]) for e in entries]
    assert listed == on_page, f"{page}: the figures listed in docs/figures.yaml are not the page's, in order"
    wrong = [(e[0], got, e[1:]) for e in entries if (got := shown(e)) is not None and got != str(e[0])]
    assert wrong == [], wrong
    assert all(len(e) == 3 and str(e[2]).strip() for e in entries if e[1] == "="), "a non-measurement says why"


def test_a_typo_or_a_moved_figure_fails():
    entry = ["13.36", "demo.json", "rows", {"model": "fine-tuned", "method": "rtn+whiten+kd r16"}, "ppl"]
    assert shown(entry) == "13.36"
    assert shown(["13.37", *entry[1:]]) != "13.37"  # a one-digit typo
    assert shown(["13.36", "demo.json", "rows", {"model": "fine-tuned", "method": "rtn+whiten r16"}, "ppl"]) != "13.36"  # another row's figure
    assert figures("a 1.5 b `2.5` c\n```\n3.5\n```\n| 4.50 | in 5 min 19 s (train 86 s), 20 steps, v0.16.1.") == ["1.5", "4.50", "5 min 19 s", "86 s"]
    assert shown(["5 min 19 s", "demo.json", "wall_seconds"]) == "5 min 19 s" and shown(["86 s", "demo.json", "stage_seconds", "train"]) == "86 s"


def test_every_docs_page_with_figures_is_listed():
    """A new page cannot bring figures without sources: every page under docs/ (but the generated config reference)
    that holds a figure has its list in docs/figures.yaml."""
    pages = [p for p in sorted((ROOT / "docs").rglob("*.md")) if p.name != "config.md"]
    unlisted = [str(p.relative_to(ROOT)) for p in pages if str(p.relative_to(ROOT)) not in LISTED and figures(p.read_text())]
    assert unlisted == [], f"{unlisted}: list their figures' sources in docs/figures.yaml"

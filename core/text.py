"""Text corpora that ship with Python, so the demo runs on a fresh machine with no data and no network.

pydoc's topic help (``pydoc_data.topics``, ~465 KB of English prose in every CPython), one document
per topic in sorted key order:

- ``python-docs``: every topic;
- ``python-docs-heldout``: the last 10% of the topics (~38 KB);
- ``python-docs-train``: the other topics, minus every topic that shares a word 13-gram with the
  held-out part (pydoc repeats passages across topics, e.g. the ``while`` grammar appears under
  ``while`` and ``compound``: 13% of the held-out 13-grams occurred in the rest before this filter),
  ~306 KB. So a demo can fine-tune and calibrate on one and measure perplexity on the other.

Every place that takes a text path (``data.path``, ``postpass.calibration_path``, ``eval.path``)
accepts these names.
"""

from __future__ import annotations

from functools import cache

HELDOUT_SHARE = 0.1
NGRAM = 13  # word n-grams, the usual contamination unit: long enough that shared boilerplate rarely matches
NAMES = ("python-docs", "python-docs-train", "python-docs-heldout")


@cache
def _topics() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    return tuple(topics[k] for k in sorted(topics))


def is_builtin(name: str) -> bool:
    return name in NAMES


def ngrams(text: str) -> set[tuple[str, ...]]:
    words = text.split()
    return {tuple(words[i:i + NGRAM]) for i in range(max(len(words) - NGRAM + 1, 0))}


@cache
def _split() -> tuple[tuple[str, ...], tuple[str, ...]]:
    docs = _topics()
    cut = len(docs) - max(1, round(HELDOUT_SHARE * len(docs)))
    held = docs[cut:]
    held_grams = set().union(*map(ngrams, held))
    return tuple(d for d in docs[:cut] if not ngrams(d) & held_grams), held


def documents(name: str) -> list[str]:
    if name == "python-docs":
        return list(_topics())
    train, held = _split()
    return list({"python-docs-train": train, "python-docs-heldout": held}[name])


def same_source(a: str, b: str) -> bool:
    """Whether two text settings (file paths or built-in names) name the same text."""
    from pathlib import Path

    return a == b or (not is_builtin(a) and not is_builtin(b) and Path(a).is_file() and Path(b).is_file()
                      and Path(a).resolve() == Path(b).resolve())


def text(name: str) -> str:
    """The corpus as one string, documents separated by blank lines (how ``eval`` reads a text file)."""
    return "\n\n".join(documents(name))

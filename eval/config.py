"""The ``eval`` config section: which text and how many windows the perplexity protocol reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from qaft.core.typed import Ge


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Used by ``qaft eval``, ``qaft run``'s eval stage and the export's perplexity rows: WikiText-2 perplexity on a fixed protocol."""

    path: str | None = None
    """Evaluation text file (WikiText-2 raw test) or a built-in corpus (``python-docs-heldout``); read whole, tokenized once."""
    windows: Annotated[int, Ge(1)] | None = 8
    """Evaluate the first N non-overlapping windows; null = the whole text."""
    seq_len: Annotated[int, Ge(8)] = 512
    """Tokens per window."""

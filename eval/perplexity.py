"""Perplexity on the protocol of ``shared/docs/protocol.md``: one function for float, fake-quant and reconstructed models.

Read the text file whole, tokenize once without special tokens, cut the ids into non-overlapping
``seq_len`` windows, take the first ``windows`` of them (all when None), average the next-token
NLL over every predicted token (``seq_len - 1`` per window), exponentiate.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    seconds: float


def token_stream(path: str | Path, tokenizer) -> torch.Tensor:
    """The whole file (or built-in corpus, ``qaft.trainer.corpora``) as one id sequence (no special tokens added)."""
    from qaft.core import text as corpora

    text = corpora.text(str(path)) if corpora.is_builtin(str(path)) else Path(path).read_text(encoding="utf-8")
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def windows_of(ids: torch.Tensor, seq_len: int, windows: int | None) -> torch.Tensor:
    n = ids.numel() // seq_len
    if windows is not None:
        n = min(n, windows)
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, seq_len: int, windows: int | None, *, progress: bool = True) -> Perplexity:
    model.eval()
    t0 = time.perf_counter()
    wins = windows_of(ids, seq_len, windows)
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for w in tqdm(wins, desc="perplexity (windows)", disable=not progress, leave=False):
        w = w.to(device)
        logits = model(input_ids=w[None], use_cache=False).logits[0, :-1].float()
        total += F.cross_entropy(logits, w[1:], reduction="sum").item()
        count += seq_len - 1
    nll = total / count
    return Perplexity(math.exp(nll), nll, count, len(wins), seq_len, time.perf_counter() - t0)

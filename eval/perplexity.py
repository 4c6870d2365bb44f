"""Perplexity on the WikiText-2 protocol: one function for float, fake-quant, reconstructed and reloaded models.

Read the text whole, tokenize once without special tokens (``core.text.token_stream``), cut the ids
into non-overlapping ``seq_len`` windows, take the first ``windows`` of them (all when None), average
the next-token NLL over every predicted token (``seq_len - 1`` per window), exponentiate. Where the
tokenizer adds BOS (Gemma, Llama 2, Phi-3) each window is BOS + ``seq_len - 1`` text tokens, as in
llama.cpp's perplexity tool, and every text token of the window is predicted. Papers use
``seq_len`` 2048 and the whole split; on two CPU cores the defaults are 8 windows × 512, and every
result records its windows and ``seq_len``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from qaft.core.logits import token_nll
from qaft.core.text import Stream, windows_of


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    seconds: float


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: Stream | torch.Tensor, seq_len: int, windows: int | None, *, progress: bool = True) -> Perplexity:
    model.eval()
    t0 = time.perf_counter()
    wins = windows_of(ids, seq_len, windows)
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for w in tqdm(wins, desc="perplexity (windows)", disable=not progress, leave=False):
        total += token_nll(model, w[None].to(device)).sum().item()  # in chunks of positions: no whole-logits tensor
        count += seq_len - 1
    nll = total / count
    return Perplexity(math.exp(nll), nll, count, len(wins), seq_len, time.perf_counter() - t0)

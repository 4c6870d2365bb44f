"""Text → token blocks: load through ``datasets``, tokenize once, pack, split, and serve deterministically.

Packing concatenates every document (plus EOS) into one id stream and cuts it into
``block_size`` blocks, dropping the ragged tail, so no token is padding. The eval split is the
*tail* of the block sequence (contiguous, so train and eval share at most one document boundary),
and training order is a permutation seeded by ``(seed, epoch)``: a run is reproducible, and
resume can jump to any position without replaying the data.

Sources (files, datasets, built-in corpora) are read by ``core.text``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from qaft.core import text
from qaft.core.errors import DataError
from qaft.core.typed import suggest

from .config import DataConfig


def load_documents(cfg: DataConfig) -> Any:
    """The configured corpus as a ``datasets.Dataset`` (one row per document)."""
    return text.load_documents(cfg.path, key="data.path", config_name=cfg.config_name, split=cfg.split)


def _texts(ds: Any, cfg: DataConfig, tokenizer: Any) -> list[str]:
    column = cfg.messages_column if cfg.chat_template else cfg.text_column
    if column not in ds.column_names:
        key = "data.messages_column" if cfg.chat_template else "data.text_column"
        raise DataError(f"{key}: column {column!r} not in {cfg.path!r}{suggest(column, ds.column_names)}; columns: {', '.join(ds.column_names)}")
    if not cfg.chat_template:
        return [t for t in ds[column] if isinstance(t, str) and t]
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("data.chat_template: this tokenizer has no chat template; set data.chat_template=false")
    return [tokenizer.apply_chat_template(m, tokenize=False) for m in ds[column]]


def tokenize_and_pack(texts: list[str], tokenizer: Any, block_size: int, add_eos: bool) -> torch.Tensor:
    """``[n_blocks, block_size]`` int64: documents (each + EOS) concatenated and cut, ragged tail dropped; each block
    starts with BOS when the tokenizer adds one (``core.text.windows_of``: the windows the model is evaluated on)."""
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    stream = text.Stream(torch.from_numpy(np.fromiter((t for doc in ids for t in (*doc, *eos)), dtype=np.int64)), text.bos_of(tokenizer))
    return text.windows_of(stream, block_size, None) if stream.fits(block_size) else torch.empty(0, block_size, dtype=torch.int64)


@dataclass(frozen=True)
class Blocks:
    train: torch.Tensor
    """``[n_train, block_size]`` token ids."""
    eval: torch.Tensor
    """``[n_eval, block_size]`` token ids (may have 0 rows)."""
    corpus_tokens: int
    """Tokens in the whole corpus before cutting into blocks."""


def build_blocks(cfg: DataConfig, tokenizer: Any, documents: Any = None) -> Blocks:
    """Pack ``documents`` (default: ``load_documents(cfg)``) into train/eval blocks."""
    texts = _texts(load_documents(cfg) if documents is None else documents, cfg, tokenizer)
    if not texts:
        raise DataError(f"data.path: corpus {cfg.path!r} is empty (no non-empty {cfg.text_column!r} values)")
    blocks = tokenize_and_pack(texts, tokenizer, cfg.block_size, cfg.add_eos)
    n = len(blocks)
    n_eval = 0 if cfg.eval_fraction == 0 else max(1, round(n * cfg.eval_fraction))
    if n - n_eval < 1:
        raise DataError(
            f"data.block_size: corpus {cfg.path!r} gives only {n} block(s) of {cfg.block_size} tokens, "
            f"too few to train{' and evaluate' if n_eval else ''}; use a smaller block_size or a larger corpus"
        )
    train, ev = blocks[: n - n_eval], blocks[n - n_eval :]
    return Blocks(train[: cfg.max_train_blocks], ev[: cfg.max_eval_blocks], corpus_tokens=n * cfg.block_size)


class _BlockDataset(Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.blocks[i]


def _collate(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    ids = torch.stack(rows)
    return {"input_ids": ids, "labels": ids}  # the model shifts labels itself


class EpochPermutation(Sampler[int]):
    """A fresh permutation per epoch from ``(seed, epoch)`` alone: no hidden state to checkpoint."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def train_loader(blocks: torch.Tensor, batch_size: int, seed: int) -> DataLoader:
    """Shuffled, full batches only (equal-size steps). Its own generator keeps the global RNG untouched."""
    return DataLoader(
        _BlockDataset(blocks),
        batch_size=batch_size,
        sampler=EpochPermutation(len(blocks), seed),
        drop_last=True,
        collate_fn=_collate,
        generator=torch.Generator().manual_seed(seed),
    )


def eval_loader(blocks: torch.Tensor, batch_size: int) -> DataLoader:
    return DataLoader(_BlockDataset(blocks), batch_size=batch_size, shuffle=False, collate_fn=_collate)

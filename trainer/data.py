"""Text → token blocks: load through ``datasets``, tokenize once, pack, split, and serve deterministically.

Packing concatenates every document (plus EOS) into one id stream and cuts it into
``block_size`` blocks, dropping the ragged tail, so no token is padding. The eval split is the
*tail* of the block sequence (contiguous, so train and eval share at most one document boundary),
and training order is a permutation seeded by ``(seed, epoch)``: a run is reproducible, and
resume can jump to any position without replaying the data.

Plain text files (``.txt``, ``.raw``) are read whole, as one document, the way the perplexity
protocol reads WikiText; structured files (jsonl/json/parquet/csv) give one document per row.
``python-docs`` (and its disjoint ``-train`` / ``-heldout`` parts, see ``corpora.py``) is pydoc's
topic help, which ships with every CPython, so the demo runs on a machine with no data and no network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from qaft.core import text as corpora
from .config import DataConfig
from qaft.core.errors import DataError
from qaft.core.typed import suggest

BUILTIN_CORPORA = corpora.NAMES
_BUILDERS = {".txt": "text", ".raw": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_documents(cfg: DataConfig) -> "Any":
    """The configured corpus as a ``datasets.Dataset`` (one row per document)."""
    import datasets

    datasets.disable_progress_bars()
    if corpora.is_builtin(cfg.path):
        return datasets.Dataset.from_dict({"text": corpora.documents(cfg.path)})
    p = Path(cfg.path)
    try:
        if p.is_file():
            builder = _BUILDERS.get(p.suffix.lower())
            if builder is None:
                raise DataError(f"data.path: {cfg.path!r} has suffix {p.suffix!r}; expected one of {', '.join(sorted(_BUILDERS))}")
            kw = {"sample_by": "document"} if builder == "text" else {}
            return datasets.load_dataset(builder, data_files=str(p), split="train", keep_in_memory=True, **kw)
        if p.is_dir():
            return datasets.load_dataset(str(p), split=cfg.split, keep_in_memory=True)
        if cfg.path.startswith((".", "/", "~")) or p.suffix.lower() in _BUILDERS:
            raise DataError(f"data.path: file {cfg.path!r} does not exist (relative paths are relative to {Path.cwd()})")
        return datasets.load_dataset(cfg.path, cfg.config_name, split=cfg.split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ConnectionError...)
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DataError(f"data.path: cannot load {cfg.path!r}: {first}") from None


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
    """``[n_blocks, block_size]`` int64: documents (each + EOS) concatenated and cut, ragged tail dropped."""
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    stream = np.fromiter((t for doc in ids for t in (*doc, *eos)), dtype=np.int64)
    n = len(stream) // block_size
    return torch.from_numpy(stream[: n * block_size].reshape(n, block_size).copy())


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
        _BlockDataset(blocks), batch_size=batch_size, sampler=EpochPermutation(len(blocks), seed),
        drop_last=True, collate_fn=_collate, generator=torch.Generator().manual_seed(seed),
    )


def eval_loader(blocks: torch.Tensor, batch_size: int) -> DataLoader:
    return DataLoader(_BlockDataset(blocks), batch_size=batch_size, shuffle=False, collate_fn=_collate)

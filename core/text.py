"""Text sources: files, ``datasets`` names and the corpora that ship with Python, as documents or one token stream.

Every setting that takes text (``data.path``, ``postpass.calibration_path``, ``eval.path``, ``tune.data``)
goes through here, so they all accept the same things: a local text/jsonl/json/parquet/csv file or
folder, a hub dataset name, or a built-in corpus. Plain text files (``.txt``, ``.raw``) are one
document, read whole (the way the perplexity protocol reads WikiText); structured files give one
document per row.

Built-in corpora, so the demo runs on a fresh machine with no data and no network:

pydoc's topic help (``pydoc_data.topics``, ~465 KB of English prose in every CPython), one document
per topic in sorted key order:

- ``python-docs``: every topic;
- ``python-docs-heldout``: the last 10% of the topics (~38 KB);
- ``python-docs-train``: the other topics, minus every topic that shares a word 13-gram with the
  held-out part (pydoc repeats passages across topics, e.g. the ``while`` grammar appears under
  ``while`` and ``compound``: 13% of the held-out 13-grams occurred in the rest before this filter),
  ~306 KB. So a demo can fine-tune and calibrate on one and measure perplexity on the other.

"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from .errors import DataError
from .io import utf8_problem

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
    return {tuple(words[i : i + NGRAM]) for i in range(max(len(words) - NGRAM + 1, 0))}


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
    return a == b or (not is_builtin(a) and not is_builtin(b) and Path(a).is_file() and Path(b).is_file() and Path(a).resolve() == Path(b).resolve())


def text(name: str) -> str:
    """The corpus as one string, documents separated by blank lines (how ``eval`` reads a text file)."""
    return "\n\n".join(documents(name))


_BUILDERS = {".txt": "text", ".raw": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_documents(path: str, *, key: str, config_name: str | None = None, split: str = "train") -> Any:
    """``path`` as a ``datasets.Dataset`` with one row per document; ``key`` names the setting in errors."""
    import datasets

    datasets.disable_progress_bars()
    if is_builtin(path):
        return datasets.Dataset.from_dict({"text": documents(path)})
    p = Path(path)
    try:
        if p.is_file():
            builder = _BUILDERS.get(p.suffix.lower())
            if builder is None:
                raise DataError(f"{key}: {path!r} has suffix {p.suffix!r}; expected one of {', '.join(sorted(_BUILDERS))}")
            kw = {"sample_by": "document"} if builder == "text" else {}
            return datasets.load_dataset(builder, data_files=str(p), split="train", keep_in_memory=True, **kw)
        if p.is_dir():
            return datasets.load_dataset(str(p), split=split, keep_in_memory=True)
        if path.startswith((".", "/", "~")) or p.suffix.lower() in _BUILDERS:
            raise DataError(f"{key}: file {path!r} does not exist (relative paths are relative to {Path.cwd()})")
        return datasets.load_dataset(path, config_name, split=split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ConnectionError...)
        if p.is_file() and _BUILDERS.get(p.suffix.lower()) in ("text", "json", "csv") and (bad := utf8_problem(p)):  # datasets only says "an error occurred"
            raise DataError(
                f"{key}: {path!r} is not UTF-8 text: {bad}; re-encode it, e.g. `iconv -f latin1 -t utf-8 {p.name} > {p.stem}.utf8{p.suffix}`"
            ) from None
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DataError(f"{key}: cannot load {path!r}: {first}") from None


def read_text(path: str, *, key: str, text_column: str = "text") -> str:
    """The whole source as one string: a text file read whole, a built-in corpus or a dataset's documents joined by blank lines."""
    if is_builtin(path):
        return text(path)
    if Path(path).is_file() and _BUILDERS.get(Path(path).suffix.lower()) == "text":
        return Path(path).read_text(encoding="utf-8")
    docs = load_documents(path, key=key)
    if text_column not in docs.column_names:
        raise DataError(f"{key}: {path!r} has no column {text_column!r}; columns: {', '.join(docs.column_names)}")
    return "\n\n".join(t for t in docs[text_column] if isinstance(t, str))


def bos_of(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer starts every encoding with one (its ``add_bos_token``: Gemma, Llama 2, Mistral, Phi-3),
    else None (SmolLM2, Qwen). Read from what the tokenizer does, not from a flag only some tokenizer classes have."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


@dataclass(frozen=True)
class Stream:
    """A text as one id sequence (tokenized once, no special tokens), and the BOS id each window starts with."""

    ids: torch.Tensor
    bos: int | None = None

    def fits(self, seq_len: int) -> int:
        """How many whole windows of ``seq_len`` the text fills (BOS takes one place in each)."""
        return self.ids.numel() // (seq_len - (self.bos is not None))


def bos_first(ids: Stream | torch.Tensor) -> bool:
    """Whether the windows cut from ``ids`` start with BOS (recorded in every protocol)."""
    return isinstance(ids, Stream) and ids.bos is not None


def token_stream(path: str, tokenizer: Any, *, key: str, text_column: str = "text") -> Stream:
    """The source as one id sequence, tokenized once without special tokens (the perplexity protocol), with the
    tokenizer's BOS when it adds one (``bos_of``): every window cut from it then starts with BOS."""
    ids = tokenizer(read_text(str(path), key=key, text_column=text_column), add_special_tokens=False)["input_ids"]
    return Stream(torch.tensor(ids, dtype=torch.long), bos_of(tokenizer))


def windows_of(ids: Stream | torch.Tensor, seq_len: int, windows: int | None) -> torch.Tensor:
    """The first ``windows`` (all when None) non-overlapping ``seq_len`` windows of ``ids``: ``[n, seq_len]``. With a
    BOS, each window is BOS + the next ``seq_len - 1`` tokens of the text (as llama.cpp's perplexity tool starts each
    window), so a model that was trained to see BOS first is read as it runs; a plain tensor has no BOS."""
    stream = ids if isinstance(ids, Stream) else Stream(ids)
    n, body = stream.fits(seq_len), seq_len - (stream.bos is not None)
    if windows is not None:
        n = min(n, windows)
    if n == 0:
        raise DataError(f"text has {stream.ids.numel()} tokens, fewer than one window of {seq_len}")
    cut = stream.ids[: n * body].view(n, body)
    return cut if stream.bos is None else torch.cat([torch.full((n, 1), stream.bos, dtype=cut.dtype), cut], dim=1)

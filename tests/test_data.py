"""Data: packing is an exact concatenation, the split is the contiguous tail, order is a seeded permutation."""

from __future__ import annotations

import json

import pytest
import torch

from qaft.core.errors import DataError
from qaft.core.model import byte_tokenizer
from qaft.trainer.config import DataConfig
from qaft.trainer.data import EpochPermutation, build_blocks, tokenize_and_pack, train_loader

TOK = byte_tokenizer()


def test_packing_is_the_exact_concatenation_with_eos():
    docs = ["abc", "defgh", "ij"]
    blocks = tokenize_and_pack(docs, TOK, block_size=4, add_eos=True)
    stream = [t for d in docs for t in (*TOK(d, add_special_tokens=False)["input_ids"], TOK.eos_token_id)]
    assert len(stream) == 13 and blocks.shape == (3, 4)  # 13 ids → 3 full blocks, 1-id tail dropped
    assert blocks.flatten().tolist() == stream[:12]
    assert tokenize_and_pack(docs, TOK, block_size=4, add_eos=False).flatten().tolist() == [t for d in docs for t in TOK(d)["input_ids"]][:8]


def test_eval_split_is_the_contiguous_tail(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("".join(chr(97 + i % 26) for i in range(1000)))
    b = build_blocks(DataConfig(path=str(p), block_size=10, eval_fraction=0.1), TOK)
    whole = tokenize_and_pack([p.read_text()], TOK, 10, add_eos=True)
    assert len(b.train) == 90 and len(b.eval) == 10
    assert torch.equal(torch.cat([b.train, b.eval]), whole)
    capped = build_blocks(DataConfig(path=str(p), block_size=10, eval_fraction=0.1, max_train_blocks=7, max_eval_blocks=2), TOK)
    assert torch.equal(capped.train, b.train[:7]) and torch.equal(capped.eval, b.eval[:2])
    assert len(build_blocks(DataConfig(path=str(p), block_size=10, eval_fraction=0.0), TOK).eval) == 0


def test_order_depends_on_seed_and_epoch_only():
    s1, s2 = EpochPermutation(50, seed=1), EpochPermutation(50, seed=1)
    first = list(s1)
    assert first == list(s2) and sorted(first) == list(range(50))
    s1.set_epoch(1)
    assert list(s1) != first
    assert list(EpochPermutation(50, seed=2)) != first
    rng = torch.get_rng_state()
    loader = train_loader(torch.arange(40).view(20, 2), batch_size=3, seed=0)
    batches = list(loader)
    assert torch.equal(torch.get_rng_state(), rng), "the data loader must not draw from the global RNG"
    assert len(batches) == 6 and all(b["input_ids"].shape == (3, 2) for b in batches)  # full batches only
    assert all(torch.equal(b["input_ids"], b["labels"]) for b in batches)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_structured_files_give_one_document_per_row(tmp_path, fmt):
    import datasets

    rows = {"body": ["first document " * 20, "second one " * 30, ""]}
    p = tmp_path / f"c.{fmt}"
    ds = datasets.Dataset.from_dict(rows)
    {"jsonl": lambda: ds.to_json(p), "parquet": lambda: ds.to_parquet(p), "csv": lambda: ds.to_csv(p)}[fmt]()
    b = build_blocks(DataConfig(path=str(p), text_column="body", block_size=16, eval_fraction=0.0), TOK)
    expect = tokenize_and_pack([r for r in rows["body"] if r], TOK, 16, add_eos=True)
    assert torch.equal(b.train, expect)


def test_chat_template_renders_messages(tmp_path):
    tok = byte_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    p = tmp_path / "chat.jsonl"
    p.write_text(
        "\n".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello " * 5}]}) for i in range(30))
    )
    b = build_blocks(DataConfig(path=str(p), chat_template=True, block_size=64, eval_fraction=0.0), tok)
    assert tok.decode(b.train[0]).startswith("<user>hi 0\n<assistant>hello")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"path": "missing.txt"}, r"^data\.path: file 'missing\.txt' does not exist"),
        ({"path": "./nowhere"}, r"^data\.path: file '\./nowhere' does not exist"),
        ({"path": "EMPTY"}, r"^data\.path: corpus '.*empty\.txt' is empty"),
        ({"path": "SHORT", "block_size": 512}, r"^data\.block_size: corpus '.*short\.txt' gives only 0 block\(s\) of 512 tokens"),
        ({"path": "BADSUFFIX"}, r"^data\.path: '.*c\.docx' has suffix '\.docx'; expected one of"),
        ({"path": "python-docs", "text_column": "txt"}, r"^data\.text_column: column 'txt' not in 'python-docs' \(did you mean 'text'\?\); columns: text$"),
        ({"path": "python-docs", "chat_template": True, "messages_column": "text"}, r"^data\.chat_template: this tokenizer has no chat template"),
    ],
)
def test_data_errors_are_clear(tmp_path, kwargs, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("tiny")
    (tmp_path / "c.docx").write_text("x")
    names = {"EMPTY": "empty.txt", "SHORT": "short.txt", "BADSUFFIX": "c.docx"}
    kwargs = {**kwargs, "path": str(tmp_path / names[kwargs["path"]]) if kwargs["path"] in names else kwargs["path"]}
    with pytest.raises(DataError, match=message):
        build_blocks(DataConfig(**kwargs), TOK)

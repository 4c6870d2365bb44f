"""``qaft eval`` on a tiny model: the table, the JSON contract, and input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qaft.core.model import ModelConfig, load_model_and_tokenizer
from qaft.core.text import token_stream
from qaft.eval.perplexity import perplexity
from qaft.pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def texts(tmp_path):
    from pydoc_data.topics import topics

    keys = sorted(topics)
    (tmp_path / "calib.txt").write_text("\n".join(topics[k] for k in keys[:20]))
    (tmp_path / "test.txt").write_text("\n".join(topics[k] for k in keys[40:60]))
    return tmp_path


def argv(texts, *extra):
    return [
        "eval",
        str(ROOT / "configs" / "smoke.yaml"),
        f"eval.path={texts / 'test.txt'}",
        f"postpass.calibration_path={texts / 'calib.txt'}",
        "postpass.calibration_samples=4",
        "postpass.calibration_seq_len=64",
        "eval.windows=3",
        "eval.seq_len=64",
        "postpass.rank=4",
        *extra,
    ]


def test_eval_prints_the_protocol_and_writes_the_json_contract(texts, capsys):
    out = texts / "r.json"
    assert (
        main([*argv(texts, "training.seed=0", "postpass.reconstructor={name: aser, outliers: 4}"), "--methods", "fp,rtn,lqer,whiten,aser", "--json", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "3 windows x 64 tokens" in printed and "W4 per-channel sym, rank 4" in printed and "calibration 4 x 64" in printed
    report = json.loads(out.read_text())
    assert list(report["results"]) == ["fp", "rtn", "lqer", "whiten", "aser"]
    assert report["protocol"]["windows"] == 3 and report["protocol"]["tokens"] == 3 * 63
    assert all(isinstance(r["ppl"], float) and r["seconds"] > 0 for r in report["results"].values())
    assert len(report["results"]["lqer"]["layers"]) == 2 * 7 and report["results"]["fp"]["layers"] == []


def test_fp_perplexity_is_the_plain_protocol_number(texts, capsys):
    out = texts / "fp.json"
    torch.manual_seed(5)
    assert main([*argv(texts), "--methods", "fp", "--json", str(out)]) == 0
    torch.manual_seed(5)
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path="tiny-llama"))
    direct = perplexity(model, token_stream(str(texts / "test.txt"), tok, key="eval.path"), 64, 3, progress=False).ppl
    assert json.loads(out.read_text())["results"]["fp"]["ppl"] == pytest.approx(direct, rel=1e-6)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "fp,rtm"], r"--methods: unknown method 'rtm' \(did you mean 'rtn'\?\)"),
        (["eval.path=null"], r"eval\.path: not set"),
        (["eval.path=nope.raw"], r"eval\.path: file 'nope\.raw' does not exist"),
        (["SAME"], r"postpass\.calibration_path: the calibration text is the evaluation text"),
        (
            ["quant.weight.granularity=group", "quant.weight.group_size=48"],
            r"quant\.weight\.group_size: 48 does not divide the input width 64 of model\.layers\.0\.",
        ),
    ],
)
def test_eval_input_errors_exit_2(texts, capsys, extra, message):
    extra = [f"postpass.calibration_path={texts / 'test.txt'}" if e == "SAME" else e for e in extra]
    flags = [e for e in extra if e.startswith("--") or "=" not in e]
    rc = main([*argv(texts, *[e for e in extra if e not in flags]), *flags, *([] if "--methods" in flags else ["--methods", "fp,rtn"])])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    import re

    assert re.search(message, err), err


def test_float_propagation_shares_statistics_and_the_header_says_how_each_row_was_calibrated(texts, capsys):
    """``postpass.propagate=float``: the methods run together on one set of statistics, and each row's perplexity is
    what that method alone gives; the header names the propagation and the rows that read no statistics."""
    both, alone = texts / "both.json", texts / "alone.json"
    assert main([*argv(texts, "postpass.propagate=float"), "--methods", "fp,rtn,lqer,whiten,aser", "--json", str(both)]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert "float propagation" in head and "(rtn, lqer: read no statistics, not calibrated)" in head
    assert main([*argv(texts, "postpass.propagate=float"), "--methods", "aser", "--json", str(alone)]) == 0
    shared, own = json.loads(both.read_text())["results"], json.loads(alone.read_text())["results"]
    assert [shared[m]["calibration"] for m in shared] == ["none", "none", "none", "float, shared", "float, shared"]
    assert own["aser"]["calibration"] == "float" and shared["aser"]["ppl"] == own["aser"]["ppl"]

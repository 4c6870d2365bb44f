"""BOS where the model expects it: a tokenizer that starts every encoding with BOS (Gemma's) gets windows, calibration
samples and training blocks that start with it, as llama.cpp's perplexity tool does; one that adds none (SmolLM2's,
Qwen's) gets exactly the windows it always had. The protocol, the manifest and the card say which."""

from __future__ import annotations

import math

import pytest
import torch

from qaft.core.model import ModelConfig, byte_tokenizer, load_model_and_tokenizer
from qaft.core.text import Stream, bos_of, token_stream, windows_of
from qaft.eval.perplexity import perplexity
from qaft.quant.calibrate import calibration_ids
from qaft.trainer.data import tokenize_and_pack

TEXT = "the quick brown fox jumps over the lazy dog, and then it sleeps in the sun. " * 20


def test_bos_is_read_from_what_the_tokenizer_does():
    assert bos_of(byte_tokenizer()) is None
    tok = byte_tokenizer(bos="<bos>")
    assert bos_of(tok) == tok.bos_token_id == tok("a")["input_ids"][0]
    assert tok.bos_token_id not in tok("a", add_special_tokens=False)["input_ids"]


def test_windows_start_with_bos_and_cover_the_text_in_order():
    ids = torch.arange(100, 150)
    plain = windows_of(ids, 8, None)
    assert torch.equal(plain, ids[:48].view(6, 8))  # no BOS: as before, and a plain tensor never gets one
    with_bos = windows_of(Stream(ids, bos=7), 8, 3)
    assert with_bos[:, 0].tolist() == [7, 7, 7]
    assert torch.equal(with_bos[:, 1:].flatten(), ids[:21])  # BOS + the next 7 text tokens, window after window


def test_perplexity_with_bos_predicts_every_text_token_of_the_window_from_bos_on(tmp_path):
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path="tiny-gemma3"))
    (tmp_path / "t.txt").write_text(TEXT)
    stream = token_stream(str(tmp_path / "t.txt"), tok, key="eval.path")
    assert stream.bos == tok.bos_token_id
    r = perplexity(model, stream, 32, 3, progress=False)
    text_ids = torch.tensor(tok(TEXT, add_special_tokens=False)["input_ids"][: 3 * 31]).view(3, 31)
    nll = 0.0
    with torch.no_grad():
        for row in text_ids:  # by hand: the tokenizer's own encoding (BOS + text) of each window's text
            w = torch.tensor([tok.bos_token_id, *row.tolist()])
            nll += torch.nn.functional.cross_entropy(model(w[None]).logits[0, :-1], w[1:], reduction="sum").item()
    assert r.tokens == 3 * 31 and r.ppl == pytest.approx(math.exp(nll / r.tokens), rel=1e-5)


def test_training_blocks_and_calibration_samples_start_with_bos_only_where_the_tokenizer_adds_it(tmp_path):
    (tmp_path / "c.txt").write_text(TEXT)
    for tok, first in ((byte_tokenizer(bos="<bos>"), 261), (byte_tokenizer(), None)):
        blocks = tokenize_and_pack([TEXT], tok, 16, add_eos=True)
        calib = calibration_ids(str(tmp_path / "c.txt"), tok, 4, 16)
        body = tok(TEXT, add_special_tokens=False)["input_ids"]
        if first is None:
            assert blocks[0].tolist() == body[:16] and calib[1].tolist() == body[16:32]
        else:
            assert set(blocks[:, 0].tolist()) == set(calib[:, 0].tolist()) == {first}
            assert blocks[0, 1:].tolist() == body[:15] and calib[1, 1:].tolist() == body[15:30]


@pytest.mark.slow
def test_smollm2s_tokenizer_adds_no_bos_so_its_protocol_is_unchanged():
    from transformers import AutoTokenizer

    from qaft.core.model import resolve

    src = resolve(ModelConfig(name_or_path="smollm2-135m"))
    tok = AutoTokenizer.from_pretrained(src.location, gguf_file=src.gguf_file)  # the tokenizer alone, as qaft loads it
    assert bos_of(tok) is None and tok("The")["input_ids"] == tok("The", add_special_tokens=False)["input_ids"]


def test_the_manifest_the_card_and_the_gguf_file_say_windows_start_with_bos(make_cfg, tmp_path):
    import gguf

    from qaft.pipeline.commands import export_run, quantize_and_save

    (tmp_path / "eval.txt").write_text(TEXT)
    common = ("model.name_or_path=tiny-gemma3", "postpass.calibration_samples=4", "postpass.calibration_seq_len=32", "postpass.rank=4")
    common += (f"eval.path={tmp_path / 'eval.txt'}", "eval.seq_len=32", "eval.windows=2", "export.runtime_check=skip")
    for fmt in (("quant.weight.format=gguf", "quant.weight.gguf_type=Q4_0"), ("quant.weight.granularity=group", "quant.weight.group_size=32")):
        cfg = make_cfg(*common, *fmt, f"training.output_dir={tmp_path / fmt[0].rsplit('=')[-1]}")
        quantize_and_save(cfg, overwrite=False, progress=False)
        out, m = export_run(cfg, overwrite=False, progress=False)
        assert m["evaluation"]["protocol"]["bos"] is True
        assert "each starting with BOS" in (out / "README.md").read_text()
    reader = gguf.GGUFReader(next((tmp_path / "gguf").glob("**/model-Q4_0.gguf")))
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is True  # llama.cpp's own tools add it too

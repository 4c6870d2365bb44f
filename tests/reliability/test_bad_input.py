"""The bad-input matrix: every row is a user mistake that must end with exit code 2, one line naming the
problem (and the fix), no traceback, and every existing output byte-for-byte untouched.

The matrix is data (``MATRIX``): a later feature adds its rows here. Placeholders in ``argv``:
``CFG`` the config file of the case (the smoke config, pointed at the small corpus and at ``OUT``),
``OUT`` a folder holding a finished earlier run (checkpoints + final/), ``TMP`` the case's own folder.
``setup`` prepares the mistake (a broken file, a damaged checkpoint) before the outputs are fingerprinted."""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from qaft.pipeline.cli import main


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    message: str
    """A regex the one error line must contain."""
    setup: Callable[[Path, Path, Path], None] | None = None
    """``setup(cfg, out, tmp)``: make the mistake."""


def _write(text: str) -> Callable[[Path, Path, Path], None]:
    return lambda cfg, out, tmp: cfg.write_text(text)


def _truncate_adapter(cfg, out, tmp):
    f = out / "checkpoint-4" / "adapter" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])


def _drop_optimizer(cfg, out, tmp):
    (out / "checkpoint-4" / "accelerate" / "optimizer.bin").unlink()


def _empty_corpus(cfg, out, tmp):
    (tmp / "empty.txt").write_text("\n\n")


def _file_as_output(cfg, out, tmp):
    (tmp / "a-file").write_text("not a folder")


def _latin1_corpus(cfg, out, tmp):
    (tmp / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode() * 50 + "na\u00efve\n".encode("latin-1"))


def gguf_cut_in_its_metadata(path: Path) -> None:
    """A GGUF whose vocabulary metadata (20,000 tokens, as a real tokenizer's) is cut off in the middle, as the first
    megabytes of an interrupted download of a large-vocabulary model are."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_token_list([f"token-{i}" for i in range(20_000)])
    w.add_tensor("token_embd.weight", np.ones((64, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    path.write_bytes(path.read_bytes()[:100_000])


def _gguf(cfg, out, tmp):
    """A small, valid GGUF (one 64 x 64 float32 tensor), then the same cut short, one cut inside its metadata, and a
    text file named .gguf."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(tmp / "whole.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.ones((64, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = (tmp / "whole.gguf").read_bytes()
    (tmp / "cut.gguf").write_bytes(data[: len(data) - 5000])
    gguf_cut_in_its_metadata(tmp / "meta.gguf")
    (tmp / "text.gguf").write_text("<html>not found</html>")


def _damage_final(cfg, out, tmp):
    f = out / "final" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])


RESUME = "training.resume_from_checkpoint=true"
MATRIX: list[Case] = [
    # the config file itself
    Case("missing config", ("train", "TMP/nope.yaml"), r"config file '.*nope\.yaml' does not exist"),
    Case("malformed yaml", ("train", "CFG"), r"case\.yaml:\d+:\d+: invalid YAML", _write("model: {name_or_path: tiny-llama\ndata: [")),
    Case("not a mapping", ("train", "CFG"), r"case\.yaml: expected a mapping of sections", _write("- model\n- data\n")),
    # keys and values
    Case("unknown key", ("train", "CFG", "lora.rr=3"), r"lora\.rr: unknown key \(did you mean 'r'\?\)"),
    Case("misspelled section", ("train", "CFG", "trainng.max_steps=3"), r"trainng: unknown key \(did you mean 'training'\?\)"),
    Case("wrong type", ("train", "CFG", "training.max_steps=many"), r"training\.max_steps: .*int"),
    Case("negative size", ("train", "CFG", "data.block_size=-5"), r"data\.block_size: got -5"),
    Case("zero size", ("train", "CFG", "training.per_device_train_batch_size=0"), r"training\.per_device_train_batch_size: got 0"),
    Case("unparsable override value", ("train", "CFG", "lora.target_modules=[q_proj"), r"override 'lora\.target_modules=\[q_proj': value is not valid YAML"),
    Case("unknown choice", ("train", "CFG", "training.lr_scheduler_type=cosin"), r"training\.lr_scheduler_type: .*cosine"),
    Case("unknown callback", ("train", "CFG", "callbacks=[{name: npf}]"), r"callbacks\[0\]\.name: unknown callback 'npf' \(did you mean 'npft'\?\)"),
    Case("incompatible callbacks", ("train", "CFG", "callbacks=[{name: qat}, {name: npft}]"), r".*qat cannot be combined with npft"),
    Case(
        "unknown tiny model",
        ("train", "CFG", "model.name_or_path=tiny-lama", "training.output_dir=TMP/new"),
        r"model\.name_or_path: unknown tiny model 'tiny-lama'",
    ),
    # data
    Case("missing corpus", ("train", "CFG", "data.path=TMP/missing.txt", "training.output_dir=TMP/new"), r"data\.path: file '.*missing\.txt' does not exist"),
    Case(
        "empty corpus",
        ("train", "CFG", "data.path=TMP/empty.txt", "training.output_dir=TMP/new"),
        r"data\.block_size: corpus '.*empty\.txt' gives only 0 block\(s\) .*; use a smaller block_size or a larger corpus",
        _empty_corpus,
    ),
    Case(
        "corpus not UTF-8",
        ("train", "CFG", "data.path=TMP/latin1.txt", "training.output_dir=TMP/new"),
        r"data\.path: '.*latin1\.txt' is not UTF-8 text: byte 702 \(line 51\) is b'\\xef', not UTF-8; re-encode it, e\.g\. `iconv -f latin1",
        _latin1_corpus,
    ),
    # models
    Case(
        "GGUF cut short",
        ("train", "CFG", "model.name_or_path=TMP/cut.gguf", "training.output_dir=TMP/new"),
        r"model\.name_or_path: .*cut\.gguf is truncated: \d+ bytes, but its header lists tensor data up to byte \d+; download or copy it again",
        _gguf,
    ),
    Case(
        "GGUF cut inside its metadata",
        ("train", "CFG", "model.name_or_path=TMP/meta.gguf", "training.output_dir=TMP/new"),
        r"model\.name_or_path: .*meta\.gguf has a damaged or cut-short GGUF header \(100000 bytes; .*\); download or copy it again",
        _gguf,
    ),
    Case(
        "not a GGUF file",
        ("train", "CFG", "model.name_or_path=TMP/text.gguf", "training.output_dir=TMP/new"),
        r"model\.name_or_path: .*text\.gguf is not a GGUF file \(it starts with b'<htm'",
        _gguf,
    ),
    Case(
        "damaged safetensors in final/",
        ("quantize", "CFG", "model.name_or_path=OUT/final", "postpass.output_dir=TMP/pp"),
        r"model\.name_or_path: .*final/model\.safetensors is damaged \(",
        _damage_final,
    ),
    # outputs
    Case("previous run, no --overwrite", ("train", "CFG"), r"training\.output_dir: .*--overwrite"),
    Case("output is a file", ("train", "CFG", "training.output_dir=TMP/a-file"), r"training\.output_dir: .*not a folder", _file_as_output),
    # schemes
    Case(
        "group size does not divide",
        ("quantize", "CFG", "quant.weight.granularity=group", "quant.weight.group_size=48", "postpass.output_dir=TMP/pp"),
        r"quant\.weight\.group_size: 48 does not divide the input width 64 of .* and \d+ more .*e\.g\. 64",
    ),
    Case(
        "rank too large",
        ("quantize", "CFG", "postpass.rank=100", "postpass.output_dir=TMP/pp"),
        r"postpass\.rank: 100 exceeds min\(out, in\) = 32 of .*; use postpass\.rank <= 32",
    ),
    # checkpoints
    Case(
        "resume from a truncated adapter",
        ("train", "CFG", RESUME),
        r"checkpoint .*checkpoint-4 cannot be loaded .*delete it or resume from an older one",
        _truncate_adapter,
    ),
    Case("resume without the optimizer file", ("train", "CFG", RESUME), r"checkpoint .*checkpoint-4 cannot be loaded", _drop_optimizer),
    Case(
        "resume with a changed config",
        ("train", "CFG", RESUME, "lora.r=4"),
        r"checkpoint .*checkpoint-4 was made with a different config \(lora\.r\); resuming would not be exact",
    ),
    Case(
        "resume from a missing folder",
        ("train", "CFG", "training.resume_from_checkpoint=TMP/nope"),
        r"training\.resume_from_checkpoint: '.*nope' is not a folder",
    ),
    # later stages
    Case("export before quantize", ("export", "CFG", "postpass.output_dir=TMP/none", "export.dir=TMP/ex"), r".*(quantize|post-pass)"),
    # GGUF (#12)
    Case(
        "GGUF type the gguf package cannot quantize",
        ("quantize", "CFG", "quant.weight.format=gguf", "quant.weight.gguf_type=Q4_K", "postpass.output_dir=TMP/pp"),
        r"quant\.weight\.gguf_type: got 'Q4_K', expected .*Q4_0.*MXFP4",
    ),
    Case(
        "GGUF export of an int scheme",
        ("quantize", "CFG", "export.format=gguf", "postpass.output_dir=TMP/pp", "export.dir=TMP/ex", "--export"),
        r"export\.format: gguf files hold llama\.cpp's block grids, and this result is W4 per-channel sym; quantize with quant\.weight\.format=gguf",
    ),
    Case(
        "GGUF bits that contradict the type",
        ("quantize", "CFG", "quant.weight.format=gguf", "quant.weight.gguf_type=Q8_0", "quant.weight.bits=3", "postpass.output_dir=TMP/pp"),
        r"quant\.weight\.bits: got 3, but gguf_type Q8_0 implies 8; drop bits",
    ),
]


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory, corpus) -> tuple[dict, Path]:
    """A finished 4-step run with checkpoints 2 and 4, trained once and copied into every case."""
    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml").read_text())
    out = tmp_path_factory.mktemp("earlier") / "run"
    raw["data"]["path"] = str(corpus)
    raw["training"] |= {"output_dir": str(out), "max_steps": 4, "save_steps": 2, "eval_steps": None}
    cfg = out.parent / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["train", str(cfg)]) == 0
    return raw, out


def fingerprint(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its hash, except the lock file a writing command leaves beside its output folder
    (``.run.lock``: empty, never in the folder; deleting it on release would let two holders race)."""
    return {
        p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
        for p in sorted(root.rglob("*"))
        if not (p.parent == root and p.name.startswith(".") and p.name.endswith(".lock"))
    }


@pytest.mark.parametrize("case", MATRIX, ids=[c.id for c in MATRIX])
def test_bad_input_exits_2_with_one_line_and_touches_nothing(case, earlier_run, tmp_path, capsys):
    raw, earlier = earlier_run
    out = tmp_path / "run"
    shutil.copytree(earlier, out)
    cfg = tmp_path / "case.yaml"
    cfg.write_text(yaml.safe_dump(raw | {"training": raw["training"] | {"output_dir": str(out)}}))
    if case.setup:
        case.setup(cfg, out, tmp_path)
    before = fingerprint(tmp_path)
    argv = [a.replace("CFG", str(cfg)).replace("OUT", str(out)).replace("TMP", str(tmp_path)) for a in case.argv]
    rc = main(argv)
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("qaft: error: ")]
    assert rc == 2, stderr[-2000:]
    assert len(err) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert re.search(case.message, err[0]), err[0]
    assert fingerprint(tmp_path) == before  # nothing written, nothing removed

"""``qaft run``: all stages on a tiny model, resume by stage, ``--from``, config changes, and the report."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import qaft.pipeline.run as run_mod
from helpers import Killed, events, kill_after_checkpoint
from qaft.core.errors import CheckpointError
from qaft.export.exporter import load_export
from qaft.pipeline.cli import main
from qaft.pipeline.run import STAGES, run


@pytest.fixture
def run_file(smoke_raw, tmp_path):
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ev = tmp_path / "eval.txt"
    ev.write_text(text[-30_000:])  # the corpus fixture is the first 60 KB: no overlap
    raw = smoke_raw | {
        "training": smoke_raw["training"] | {"max_steps": 4, "save_steps": 2, "eval_steps": 2, "logging_steps": 1},
        "callbacks": [{"name": "telemetry", "every": 1}],
        "postpass": {"rank": 4, "calibration_samples": 4, "calibration_seq_len": 64, "reconstructor": "l2qer"},
        "tune": {"steps": 4, "seq_len": 64, "learning_rate": 1.0e-2, "save_steps": 2, "max_eval_blocks": 2},
        "eval": {"path": str(ev), "windows": 4, "seq_len": 64},
        "run": {"rtn_bits": [3]},
    }
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def quiet(*_a, **_k) -> None:
    pass


def mtimes(out: Path) -> dict[str, float]:
    return {s: (out / "stages" / f"{s}.json").stat().st_mtime_ns for s in STAGES if (out / "stages" / f"{s}.json").exists()}


def test_run_end_to_end_then_resume_by_stage(run_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls: list[str] = []
    for stage, fn in list(run_mod.RUNNERS.items()):
        monkeypatch.setitem(run_mod.RUNNERS, stage, lambda p, fn=fn, stage=stage: (calls.append(stage), fn(p))[1])

    killer, recorded_tune = pytest.MonkeyPatch(), run_mod.RUNNERS["tune"]

    def tune_then_die(p):  # the tune stage dies right after its first checkpoint (train's checkpoints are not touched)
        kill_after_checkpoint(killer, 2)
        return recorded_tune(p)

    monkeypatch.setitem(run_mod.RUNNERS, "tune", tune_then_die)
    with pytest.raises(Killed):
        run(run_file, [], echo=quiet)
    killer.undo()
    monkeypatch.setitem(run_mod.RUNNERS, "tune", recorded_tune)
    assert calls == ["train", "quantize", "tune"] and sorted(mtimes(out)) == ["quantize", "train"]
    assert (out / "tune" / "checkpoint-2").is_dir() and not (out / "tune" / "final").exists() and not (out / "export").exists()

    before = mtimes(out)
    calls.clear()
    run(run_file, [], echo=quiet)
    assert calls == ["tune", "export", "eval", "report"]  # nothing finished is redone
    assert {k: v for k, v in mtimes(out).items() if k in before} == before
    assert [r["step"] for r in events(out / "tune", "resume")] == [2]  # the killed stage went on from what it had written
    for stage in ("train", "quantize", "tune", "export", "eval", "report"):  # each record says what its stage took
        record = json.loads((out / "stages" / f"{stage}.json").read_text())
        assert record["seconds"] > 0 and 0.05 < record["peak_rss_gib"] < 64 and record["peak_rss_of"] == "stage", record

    # a kill inside the export, after it wrote part of its files: the stage is redone whole
    import qaft.export.exporter as exporter

    real_write, partial = exporter.manifest.write, tmp_path / "partial"

    def die_mid_export(root, record):
        shutil.copytree(root, partial)  # what a SIGKILL would have left behind: the temp folder, half written
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter.manifest, "write", die_mid_export)
    with pytest.raises(KeyboardInterrupt):
        run(run_file, [], start="export", echo=quiet)
    monkeypatch.setattr(exporter.manifest, "write", real_write)
    shutil.copytree(partial, out / ".tmp-export")
    assert (out / ".tmp-export" / "base").is_dir() and not (out / "stages" / "export.json").exists()
    earlier = (out / "export" / "manifest.json").stat().st_mtime_ns  # the previous run's export is still in place
    calls.clear()
    run(run_file, [], echo=quiet)
    assert calls == ["export", "eval", "report"] and not (out / ".tmp-export").exists()
    assert (out / "export" / "manifest.json").stat().st_mtime_ns > earlier
    load_export(out / "export")  # whole: every file matches its manifest hash
    assert json.loads((out / "export" / "manifest.json").read_text())["method"] == "rtn+l2qer+kd"  # the export ships the tuned result

    ev = json.loads((out / "eval.json").read_text())
    table = {(r["model"], r["method"], r["scheme"]): r["ppl"] for r in ev["rows"]}
    for key in [
        ("original", "fp", None),
        ("original", "rtn", "W4 per-channel sym"),
        ("original", "rtn", "W3 per-channel sym"),
        ("fine-tuned", "fp", None),
        ("fine-tuned", "rtn", "W4 per-channel sym"),
        ("fine-tuned", "rtn+l2qer r4", "W4 per-channel sym"),
        ("fine-tuned", "rtn+l2qer+kd r4", "W4 per-channel sym"),
        ("fine-tuned", "export-base", "W4 per-channel sym"),
        ("fine-tuned", "export", "W4 per-channel sym"),
    ]:
        assert key in table, (key, sorted(table))
    assert table[("fine-tuned", "fp", None)] < table[("original", "fp", None)]  # the fine-tuning did something
    assert table[("fine-tuned", "rtn", "W3 per-channel sym")] != table[("fine-tuned", "rtn", "W4 per-channel sym")]  # really another grid

    # the report's export rows are what `qaft eval --export` prints for the same folder
    from qaft.pipeline.commands import compare

    direct = compare(run_mod.Pipeline(run_mod.load_config(run_file), out).tuned(), [], export=out / "export", progress=False)
    assert direct["results"]["export"]["ppl"] == table[("fine-tuned", "export", "W4 per-channel sym")]
    # ... because the eval stage took them from the export's record (measured there on the same protocol), not again
    recorded = json.loads((out / "export" / "manifest.json").read_text())["evaluation"]["ppl"]
    assert [r["seconds"] for r in ev["rows"] if r["method"].startswith("export")] == [None, None]
    assert table[("fine-tuned", "export-base", "W4 per-channel sym")] == recorded["base"] and table[("fine-tuned", "fp", None)] == recorded["float"]
    md = (out / "report" / "report.md").read_text()
    assert f"{table[('fine-tuned', 'export', 'W4 per-channel sym')]:.2f}" in md
    page = (out / "report" / "index.html").read_text()
    for section in (
        "Perplexity",
        "Training curves",
        "Callback telemetry",
        "Per-layer quantization error",
        "Tuning curves",
        "Per-block output error: closed form vs tuned",
        "Singular-value spectra",
        "Export: size and reload parity",
        "Config",
    ):
        assert f"<h2>{section}" in page, section
    assert page.count("data:image/png;base64,") >= 4

    # --from eval redoes eval and report only
    calls.clear()
    run(run_file, [], start="eval", echo=quiet)
    assert calls == ["eval", "report"]

    # a config change behind a finished stage names the keys and the stage to redo from
    with pytest.raises(CheckpointError, match=r"config changed since stage 'quantize' finished \(postpass\.rank\); rerun with --from quantize"):
        run(run_file, ["postpass.rank=2"], echo=quiet)
    calls.clear()
    run(run_file, ["postpass.rank=2"], start="quantize", echo=quiet)
    assert calls == ["quantize", "tune", "export", "eval", "report"]
    assert json.loads((out / "quantized" / "qaft_quant.json").read_text())["rank"] == 2
    assert json.loads((out / "tune" / "final" / "qaft_quant.json").read_text())["rank"] == 2  # tuned again, from the new result
    with pytest.raises(CheckpointError, match=r"config changed since stage 'tune' finished \(tune\.temperature\); rerun with --from tune"):
        run(run_file, ["postpass.rank=2", "tune.temperature=2.0"], echo=quiet)


@pytest.mark.browser
def test_the_report_renders_with_every_image_in_headless_chromium(run_file, tmp_path):
    run(run_file, [], echo=quiet)
    render_headless(tmp_path / "run" / "report" / "index.html")


def render_headless(page: Path) -> None:
    """Open the report in headless chromium and check every image decoded (skip only when no chromium exists)."""
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        pytest.skip("chromium is not installed (.ci/run installs it with apt); the report's rendering was not checked")
    dom = subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    n = page.read_text().count("<img ")
    assert n >= 4 and f'data-images="{n}"' in dom, dom[:500]
    assert dom.count('data-decoded="1"') == n and 'data-decoded="0"' not in dom


def test_a_foreign_output_folder_is_not_touched_without_overwrite(run_file, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    (out / "final" / "keep.txt").write_text("a previous qaft train result")
    assert main(["run", str(run_file)]) == 2
    assert "not written by `qaft run`" in capsys.readouterr().err
    assert (out / "final" / "keep.txt").read_text() == "a previous qaft train result"


def test_overwrite_removes_what_qaft_wrote_and_nothing_else(run_file, tmp_path):
    from qaft.pipeline.config import load_config
    from qaft.pipeline.run import prepare

    out = tmp_path / "run"
    for d in ("final", "checkpoint-2", "stages", "quantized", "export", "report", ".tmp-checkpoint-4"):
        (out / d).mkdir(parents=True)
    for f in ("metrics.jsonl", "eval.json", "stages/train.json", "notes.txt"):
        (out / f).write_text("x")
    prepare(load_config(run_file), overwrite=True, start=None)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "stages"]  # a foreign file stays
    assert [p.name for p in (out / "stages").iterdir()] == ["run.yaml"]  # no stage record survives

"""Same config + seed → the same metrics.jsonl (timings aside) and the same adapter bytes, on CPU, with
callbacks that draw random numbers (NPFT's noise, LoRA dropout) and with evaluation and checkpoints on."""

from __future__ import annotations

import json

import pytest

from helpers import adapter_tensors, assert_same_tensors, without_timing
from qaft.trainer.loop import fit

TIMING = ("tokens_per_s", "s_per_step", "npft/noise_s")


@pytest.mark.parametrize("callbacks", ["[{name: telemetry}]", "[{name: npft, criterion: magnitude, ratio: 0.05, rounds: 2}, {name: telemetry}]"])
def test_two_runs_of_one_config_are_identical(make_cfg, tmp_path, callbacks):
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        fit(
            make_cfg(
                "training.max_steps=6",
                "training.save_steps=3",
                "training.eval_steps=3",
                "training.logging_steps=1",
                f"callbacks={callbacks}",
                f"training.output_dir={out}",
            )
        )
    rows = [
        without_timing([{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in (out / "metrics.jsonl").read_text().splitlines()])
        for out in runs
    ]
    assert rows[0] == rows[1] and len(rows[0]) >= 6
    assert_same_tensors(adapter_tensors(runs[0]), adapter_tensors(runs[1]))
    assert_same_tensors(adapter_tensors(runs[0], "checkpoint-3/adapter"), adapter_tensors(runs[1], "checkpoint-3/adapter"))

"""Where numbers go: ``output_dir/metrics.jsonl`` (one JSON object per event), accelerate trackers, console.

Only the main process writes. On a terminal a tqdm bar shows loss, lr, tokens/s and ETA; without
one (CI, ``nohup``) each log event is one plain line instead, so logs stay readable.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) and (abs(v) >= 1e-3 or v == 0) else f"{v:.3e}"
    return str(v)


class MetricsLogger:
    def __init__(self, accelerator: Any, output_dir: str | Path, *, start_step: int, total_steps: int, append: bool):
        self.acc = accelerator
        self.main = accelerator.is_main_process
        self.path = Path(output_dir) / METRICS_FILE
        self._file = open(self.path, "a" if append else "w", encoding="utf-8") if self.main else None
        self._tty = sys.stderr.isatty()
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True) if self.main and self._tty else None

    def log(self, event: str, step: int, values: Mapping[str, float]) -> None:
        """Record one event (``train``, ``eval``, ``resume``...) for ``step``; every process may call it."""
        if not self.main:
            return
        record = {"event": event, "step": step, **{k: (float(v) if not isinstance(v, (str, bool, int)) else v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numeric = {f"{event}/{k}" if event != "train" else k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numeric and self.acc.trackers:
            self.acc.log(numeric, step=step)
        self.echo(f"[{event} step {step}] " + " ".join(f"{k}={_fmt(v)}" for k, v in values.items()), bar_ok=event == "train")

    def echo(self, line: str, bar_ok: bool = False) -> None:
        """A console line; with a progress bar, routine train lines only update the bar."""
        if not self.main:
            return
        if self._bar is not None:
            if not bar_ok:
                self._bar.write(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def progress(self, step: int, **postfix: float) -> None:
        """Move the bar every step (so its ETA is current); the postfix changes at log events."""
        if self._bar is not None:
            self._bar.n = step
            if postfix:
                self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self.acc.trackers:
            self.acc.end_training()


class Throughput:
    """Steps, tokens/s and s/step over the interval since the last ``lap``."""

    def __init__(self) -> None:
        self._t, self._tokens, self._steps = time.perf_counter(), 0, 0

    def add(self, tokens: int) -> None:
        self._tokens += tokens
        self._steps += 1

    def lap(self) -> dict[str, float]:
        now = time.perf_counter()
        dt = max(now - self._t, 1e-9)
        out = {"steps": self._steps, "tokens_per_s": self._tokens / dt, "s_per_step": dt / max(self._steps, 1)}
        self._t, self._tokens, self._steps = now, 0, 0
        return out

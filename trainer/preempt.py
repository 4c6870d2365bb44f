"""Preemption: SIGTERM / SIGINT noted by a handler and acted on between optimizer steps.

A scheduler's SIGTERM (SLURM, Kubernetes, spot instances) normally kills the process and loses every
step since the last checkpoint. Under ``training.save_on_signal`` the handler only records the signal; the
loop finishes the step it is in (an eval or a checkpoint save under way completes too), writes a
checkpoint, logs a ``preempted`` event and stops with exit 128 + the signal number (143, 130). A second
SIGINT while that happens gets the default action at once, so a user at a terminal can still force a stop;
a repeated SIGTERM is ignored, because launchers forward the scheduler's signal (torchrun's agent sends its
workers SIGTERM when it receives one itself, and SIGKILLs them after its own timeout anyway). Under several
processes every rank learns of the signal at the same step (one max-reduce of a scalar per step), so all of
them save together and none waits in a collective the others never enter.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """Context manager: installs the handlers on enter (main thread only), restores the previous ones on exit."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _note(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:  # Ctrl-C again: the default action, now
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.signum = self.signum or signum

    def __enter__(self) -> StopRequests:
        if self.enabled:
            self._previous = {s: signal.signal(s, self._note) for s in SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def agreed(self, acc: Any) -> int | None:
        """The signal every process stops on at this step (the largest number any of them received), or None."""
        if not self.enabled:
            return None
        if acc.num_processes == 1:
            return self.signum
        flag = torch.tensor([self.signum or 0], device=acc.device)
        got = int(acc.reduce(flag, reduction="max").item())  # type: ignore[no-untyped-call]
        return got or None

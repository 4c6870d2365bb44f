"""``python -m qaft.pipeline.launcher TORCHRUN_ARGS``: torchrun (``torch.distributed.run``) whose exit status tells a
preemption as a single process's does, 128 + the signal (143 for SIGTERM, 130 for SIGINT).

torchrun's agent, sent SIGTERM by a scheduler (``scancel``, a pod's termination), passes it on to its workers,
waits while each rank saves the step in flight and exits 143, and then raises ``SignalException``: exit 1 with a
traceback, which a scheduler or a retry loop reads as a crash. ``launch/train.sh`` starts multi-process CPU runs
through this module instead. Any other failure (a rank that crashed: ``ChildFailedError``) is torchrun's own."""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main as torchrun


def run(argv: list[str] | None = None) -> int:
    try:
        torchrun(argv)
    except SignalException as e:
        print(f"qaft: the launch was stopped by {e.sigval.name}; each rank said above what it saved", file=sys.stderr)
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(run())

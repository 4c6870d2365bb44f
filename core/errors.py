"""Errors a user can act on. The CLI prints them as one line each and exits with the class's ``exit_code``: 2 for a
problem with the input, 3 for one with the machine (a full disk, a read-only folder, an output folder in use), 128 +
the signal number for a preemption that saved a checkpoint; anything else is a bug (exit 1)."""

from __future__ import annotations


class QaftError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in qaft."""

    exit_code = 2


class ConfigError(QaftError):
    """One or more invalid config entries, collected so the user fixes them in one go."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class DataError(QaftError):
    """A corpus that is missing, empty, too short, or lacks the configured column."""


class ModelError(QaftError):
    """A model that cannot be found or loaded as configured."""


class CheckpointError(QaftError):
    """A checkpoint or output folder that is missing, incomplete, or incompatible with the config."""


class DivergedError(QaftError):
    """Training produced non-finite gradients more often than ``training.max_nonfinite_steps`` allows."""


class PreflightError(QaftError):
    """A problem found before any work starts (a missing package, a blocking doctor finding)."""


class ExportError(QaftError):
    """An export that cannot be written or does not verify: no post-pass result, a scheme the format
    cannot express, a tampered file, reload parity beyond tolerance."""


class EnvironmentProblem(QaftError):
    """The machine, not the input: a write failed for lack of space or permission, or another qaft process holds
    the output folder. Exit 3: worth retrying once the cause is gone (a scheduler can tell it from a bad config)."""

    exit_code = 3


class Preempted(QaftError):
    """SIGTERM or SIGINT arrived; the loop finished its step and saved a checkpoint. Exit 128 + the signal number
    (143, 130), what shells and schedulers expect of a process that a signal stopped."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum

"""Errors a user can act on. The CLI prints them as one line each and exits 2; anything else is a bug (exit 1)."""

from __future__ import annotations


class QaftError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in qaft."""


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
    """An environment problem found before any work starts (missing package, output folder in use)."""


class ExportError(QaftError):
    """An export that cannot be written or does not verify: no post-pass result, a scheme the format
    cannot express, a tampered file, reload parity beyond tolerance."""

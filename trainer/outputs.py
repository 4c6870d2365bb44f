"""The output-folder policy: never clobber a result by accident, and decide fresh start vs resume.

Checked twice: read-only before any model is loaded (so a mistake costs nothing), then, on the
main process only, ``clear=True`` removes qaft's own previous outputs when ``--overwrite`` was
given. Only names qaft writes are removed, never foreign files, even if ``output_dir`` is ``.``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from qaft.core.errors import CheckpointError
from qaft.core.io import TMP_PREFIX, remove_stale_temps

from .checkpoint import latest_checkpoint, list_checkpoints
from .config import TrainConfig
from .metrics import METRICS_FILE

OWNED = ("final", METRICS_FILE, "runs")


def prepare_output_dir(cfg: TrainConfig, *, overwrite: bool, clear: bool) -> Path | None:
    """Return the checkpoint to resume from (or None for a fresh start); raise if that would lose a result."""
    out = Path(cfg.training.output_dir)
    resume = cfg.training.resume_from_checkpoint
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"training.output_dir: {out} exists and is not a folder; choose another path")
    if isinstance(resume, str):
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"training.resume_from_checkpoint: {resume!r} is not a folder; give a checkpoint-N folder or true for the newest")
        if path.name.startswith(TMP_PREFIX):
            raise CheckpointError(f"training.resume_from_checkpoint: {resume!r} is a half-written checkpoint; give a complete checkpoint-N folder")
        chosen: Path | None = path
    elif resume is True:
        chosen = latest_checkpoint(out)
    else:
        chosen = None
        previous = [p.name for p in list_checkpoints(out)] + (["final"] if (out / "final").exists() else [])
        if previous and not overwrite:
            what = "a finished run (final/)" if "final" in previous else f"checkpoints of an unfinished run ({previous[-1]})"
            raise CheckpointError(
                f"training.output_dir: {out} already holds {what}; pass --overwrite to replace it, "
                "training.resume_from_checkpoint=true to continue it, or choose another output_dir"
            )
    if clear:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)
        if chosen is None and overwrite:
            for p in list_checkpoints(out) + [out / n for n in OWNED]:
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
    return chosen

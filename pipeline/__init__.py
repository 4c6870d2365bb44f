"""The application: CLI, ``qaft run`` (stages), ``qaft doctor``, the report."""

STAGES = ("train", "quantize", "tune", "export", "eval", "report")
"""The stages of ``qaft run``, in order (here, not in ``run``, so the CLI's ``--help`` lists them without importing torch)."""

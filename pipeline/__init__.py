"""The application: CLI, `qaft run` (stages), `qaft doctor`, the report."""

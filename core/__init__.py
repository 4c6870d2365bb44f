"""Foundations every other package uses: errors, typed config machinery, atomic I/O, registries, model loading, text."""

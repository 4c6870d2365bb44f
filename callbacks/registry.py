"""The callback registry: YAML ``callbacks: [{name: telemetry, every: 5}]`` finds classes here.

Each callback gets its own ``torch.Generator``, seeded from the run seed, the rank and its name, so
callbacks never draw from (or perturb) the global RNG, and a resume restores their streams exactly.
"""

from __future__ import annotations

import zlib

import torch

from qaft.core.registry import Registry, Spec

from .base import Callback

CALLBACKS: Registry[type[Callback]] = Registry("callback", mapping_only=True)


def create(spec: Spec, *, seed: int, rank: int) -> Callback:
    """Instantiate ``spec`` with its own generator."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + rank * 7919 + zlib.crc32(spec.name.encode())) % 2**63)
    return CALLBACKS.create(spec, generator=g)

"""Closed registry of callbacks by name: YAML ``callbacks: [{name: telemetry, ...}]`` finds them here."""

from __future__ import annotations

import zlib
from typing import Any

import torch

from qaft.core.errors import ConfigError
from qaft.core.typed import suggest

from .base import Callback

_REGISTRY: dict[str, type[Callback]] = {}


def register(cls: type[Callback]) -> type[Callback]:
    """Add a callback class under ``cls.name``; names are unique."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"callback name {cls.name!r} is registered twice ({_REGISTRY[cls.name].__module__}, {cls.__module__})")
    _REGISTRY[cls.name] = cls
    return cls


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str, where: str = "callbacks") -> type[Callback]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"{where}.name: unknown callback {name!r}{suggest(name, _REGISTRY)}") from None


def create(name: str, options: Any, *, seed: int, rank: int) -> Callback:
    """Instantiate with its own generator, seeded from the run seed, the rank and the name."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + rank * 7919 + zlib.crc32(name.encode())) % 2**63)
    return get(name)(options, generator=g)

"""What the machine computes fast: bfloat16 matmuls need hardware support, and hosts of one kind differ.

On a CPU with ``avx512_bf16`` or ``amx_bf16`` (recent Xeon / EPYC) a bf16 matmul runs ~2-3x faster than
fp32; on AVX2-only CPUs torch emulates it and bf16 is ~5x *slower*. So ``auto`` settings read the flags
(``/proc/cpuinfo`` on Linux) and never assume; on CUDA they ask torch.

``QAFT_BF16=on|off`` in the environment decides ``auto`` instead of the hardware (an explicit ``true`` / ``false``
in a config still wins): the test suite runs its tiny-model tier both ways on every host, so a tolerance that
holds on one numeric path only is caught where it is written, not on the first host of the other kind.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import torch

from qaft.core.errors import ConfigError

BF16_FLAGS = ("amx_bf16", "avx512_bf16")
OVERRIDE = "QAFT_BF16"
_SWITCH = {"on": True, "off": False}


@cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def bf16_is_fast() -> tuple[bool, str]:
    """``(use bf16 autocast, why)`` for this machine's training device, unless ``QAFT_BF16`` decides."""
    forced = os.environ.get(OVERRIDE, "").strip().lower()
    if forced:
        if forced not in _SWITCH:
            raise ConfigError(f"{OVERRIDE}={forced!r} in the environment: expected on or off (or unset it to let the hardware decide)")
        return _SWITCH[forced], f"{OVERRIDE}={forced} in the environment"
    if torch.cuda.is_available():
        ok = torch.cuda.is_bf16_supported()
        return ok, f"CUDA {'with' if ok else 'without'} bf16 support"
    found = [f for f in BF16_FLAGS if f in cpu_flags()]
    if found:
        return True, f"CPU has {', '.join(found)}"
    return False, "CPU has no bf16 units (no avx512_bf16 / amx_bf16): bf16 would be emulated and slower"


def resolve_bf16(setting: bool | str) -> tuple[bool, str]:
    """A ``true | false | auto`` setting, resolved, with the reason."""
    if setting == "auto":
        use, why = bf16_is_fast()
        return use, f"auto: {why}"
    return bool(setting), "set in the config"


def precision(setting: bool | str) -> str:
    """What a ``bf16`` setting resolves to, in words, for run headers and the doctor."""
    use, why = resolve_bf16(setting)
    return f"{'bf16 autocast' if use else 'float32'} ({why})"

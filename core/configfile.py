"""YAML config files: read, apply dotted command-line overrides, compare, dump.

``read_yaml(path)`` turns every failure into one line with the file position; ``apply_overrides``
applies ``a.b=value`` items (values parsed by ``yaml.safe_load``, so ``lora.r=16`` is an int and
``lora.target_modules=[q_proj,v_proj]`` a list; list items by index: ``callbacks.0.every=2``). The
typed construction is ``typed.parse``; ``diff_configs`` names the dotted keys two plain trees differ in.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .typed import to_plain


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``a.b.c=value`` applied; list items are addressed by index."""
    out = copy.deepcopy(raw)
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. training.max_steps=20")
            continue
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as e:
            problems.append(f"override {item!r}: value is not valid YAML ({str(e).splitlines()[0]})")
            continue
        node: Any = out
        *parents, leaf = key.split(".")
        for depth, part in enumerate(parents):
            here = ".".join(parents[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    problems.append(f"override {item!r}: {here} is not an index of the {len(node)}-item list")
                    break
                node = node[int(part)]
            elif isinstance(node, dict):
                if node.get(part) is None:  # absent, or an empty section (`lora:` in YAML)
                    node[part] = {}
                node = node[part]
            else:
                problems.append(f"override {item!r}: {here} holds the value {node!r}, not a section")
                break
        else:
            if isinstance(node, list):
                if not leaf.isdigit() or int(leaf) >= len(node):
                    problems.append(f"override {item!r}: {leaf} is not an index of the {len(node)}-item list")
                    continue
                node[int(leaf)] = value
            elif isinstance(node, dict):
                node[leaf] = value
            else:
                problems.append(f"override {item!r}: {'.'.join(parents)} holds the value {node!r}, not a section")
    if problems:
        raise ConfigError(problems)
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning every failure into a one-line ConfigError with the file position."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass the path to a YAML file such as configs/smoke.yaml")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        raise ConfigError(f"{where}: invalid YAML: {e.problem}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of sections (model, data, training, ...), got {type(raw).__name__}")
    return raw


def dump(cfg: Any) -> str:
    """A config dataclass as YAML; ``typed.parse`` of it gives back an equal value."""
    return yaml.safe_dump(to_plain(cfg), sort_keys=False)


def diff_configs(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config trees."""
    keys = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += diff_configs(va, vb, key + ".")
        elif va != vb:
            keys.append(key)
    return keys

"""``docs/config.md``, generated from the config dataclasses' attribute docstrings and the registries.

``python -m qaft.pipeline.reference > docs/config.md`` writes it; a test checks the file holds exactly
this text, so the documentation cannot drift from the code. A field that names a registry entry
(``callbacks``, ``postpass.quantizer``, ``postpass.reconstructor``) lists every registered entry with its
options, so a new method is documented by registering it.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Any

import yaml

from qaft.core.registry import Registry
from qaft.core.typed import to_plain, type_name

from .config import Config

HEADER = """# Configuration reference

Generated from the code by `python -m qaft.pipeline.reference` (a test checks this file equals its
output). One YAML file holds these sections; any key can be overridden on the command line as a
dotted `key=value` (values parsed as YAML: `lora.r=16`, `lora.target_modules=[q_proj,v_proj]`;
list items by index: `callbacks.0.every=2`). Unknown keys, wrong types and out-of-range values are
reported all at once, one line each, before anything runs.
"""


def attribute_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the string literal that follows each annotated assignment (base classes included)."""
    docs: dict[str, str] = {}
    for klass in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(getattr(nxt, "value", None), ast.Constant)
            ):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _yaml(v: object) -> str:
    return "`" + yaml.safe_dump(to_plain(v), default_flow_style=True).strip().removesuffix("...").strip() + "`"


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return _yaml(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return _yaml(f.default_factory())
    return "*required*"


def registry_of(tp: Any) -> Registry | None:
    """The registry a field's values name (``Annotated[Spec, REGISTRY]``, its ``optional()``, or a tuple of those)."""
    if typing.get_origin(tp) is tuple:
        return registry_of(typing.get_args(tp)[0])
    if typing.get_origin(tp) is typing.Annotated:
        for meta in typing.get_args(tp)[1:]:
            if isinstance(meta, Registry):
                return meta
            if isinstance(getattr(meta, "registry", None), Registry):
                return meta.registry
    return None


def _table(cls: type, prefix: str) -> list[str]:
    hints = typing.get_type_hints(cls, include_extras=True)
    docs = attribute_docs(cls)
    rows, nested, registries = [], [], []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            nested.append((tp, f"{prefix}{f.name}."))
            continue
        kind = type_name(tp).replace("|", "\\|")  # a pipe would end the markdown cell
        rows.append(f"| `{prefix}{f.name}` | {kind} | {_default(f)} | {docs.get(f.name, '')} |")
        if (reg := registry_of(tp)) is not None:
            registries.append((reg, f"{prefix}{f.name}"))
    out = ["| key | type | default | meaning |", "|---|---|---|---|", *rows] if rows else []
    for reg, key in registries:
        out += ["", *entries(reg, key)]
    for tp, p in nested:
        out += ["", *_table(tp, p)]
    return out


def entries(reg: Registry, key: str) -> list[str]:
    """Every registered entry a key can name, with its options (``key.<option>``)."""
    lines = [f"`{key}` entries:", ""]
    for name in reg.names():
        entry = reg.get(name)
        summary = (inspect.getmodule(entry).__doc__ or "").strip().splitlines()[0]
        options = reg.options_type(name)
        lines.append(f"- `{name}`: {summary}")
        if dataclasses.fields(options):
            lines += ["", *_table(options, f"{key}.")]
        lines.append("")
    return lines


def reference() -> str:
    docs = attribute_docs(Config)
    hints = typing.get_type_hints(Config, include_extras=True)
    lines = [HEADER]
    for f in dataclasses.fields(Config):
        lines += [f"## `{f.name}`", "", docs.get(f.name, ""), ""]
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            extra = (tp.__doc__ or "").strip().splitlines()[0] if tp.__doc__ and not tp.__doc__.startswith(tp.__name__ + "(") else ""
            lines += ([extra, ""] if extra else []) + _table(tp, f"{f.name}.") + [""]
        else:
            lines += ["A list; each entry is `{name: ..., <options>}`.", "", *entries(registry_of(tp), f"{f.name}[]")]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(reference(), end="")

"""The README's config reference, generated from the dataclasses' attribute docstrings.

``python -m qaft.trainer.reference`` prints it; a test checks the README holds exactly this
text, so the documentation cannot drift from the code.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing

import yaml

from qaft.callbacks import get, names

from qaft.trainer.config import Config
from qaft.core.typed import _type_name, to_plain


def attribute_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the string literal that follows each annotated assignment."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
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


def _table(cls: type, prefix: str) -> list[str]:
    hints = typing.get_type_hints(cls, include_extras=True)
    docs = attribute_docs(cls)
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            nested.append((tp, f"{prefix}{f.name}."))
            continue
        kind = _type_name(tp).replace("|", "\\|")  # a pipe would end the markdown cell
        rows.append(f"| `{prefix}{f.name}` | {kind} | {_default(f)} | {docs.get(f.name, '')} |")
    out = ["| key | type | default | meaning |", "|---|---|---|---|", *rows] if rows else []
    for tp, p in nested:
        out += ["", *_table(tp, p)]
    return out


def reference() -> str:
    docs = attribute_docs(Config)
    hints = typing.get_type_hints(Config, include_extras=True)
    lines = []
    for f in dataclasses.fields(Config):
        lines += [f"#### `{f.name}`: {docs.get(f.name, '')}", ""]
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            extra = (tp.__doc__ or "").strip().splitlines()[0] if tp.__doc__ and not tp.__doc__.startswith(tp.__name__ + "(") else ""
            lines += ([extra, ""] if extra else []) + _table(tp, f"{f.name}.") + [""]
        else:
            lines += ["A list; each entry is `{name: ..., <options>}`. Registered callbacks:", ""]
            for n in names():
                cls = get(n)
                summary = (inspect.getmodule(cls).__doc__ or "").strip().splitlines()[0]
                lines += [f"- `{n}`: {summary}", "", *_table(cls.Options, "callbacks[].")] + [""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(reference(), end="")

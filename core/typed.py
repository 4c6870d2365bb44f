"""Build frozen dataclasses from plain YAML data, collecting every problem with a suggestion.

Why not pydantic: the config is a handful of frozen dataclasses whose fields carry attribute
docstrings; this 200-line checker gives exact messages (key, got, expected, closest valid key)
without a second model layer. Range constraints ride on ``Annotated[int, Ge(1)]``; a value that
names a registry entry rides on ``Annotated[Spec, REGISTRY]`` (any metadata object with a
``convert(value, key, problems)`` method parses the value itself, see ``registry``).

Field metadata (``field(metadata=...)``, read with ``flag``) keeps facts about a key beside it:
``RESUMABLE`` marks keys a checkpoint may be resumed under with another value, ``NO_EFFECT`` keys that
never change any result (logging, where outputs go), and ``STAGE`` on the root config's sections
says which ``qaft run`` stage reads them.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, Union

from .errors import ConfigError


@dataclass(frozen=True)
class Bound:
    """A numeric bound for ``Annotated`` fields: ``Annotated[float, Ge(0.0), Le(1.0)]``."""

    op: str
    value: float

    def check(self, x: float) -> bool:
        return {"ge": x >= self.value, "gt": x > self.value, "le": x <= self.value, "lt": x < self.value}[self.op]

    def __str__(self) -> str:
        return {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}[self.op] + f" {self.value:g}"


def Ge(v: float) -> Bound:  # noqa: N802 - reads like a type annotation
    return Bound("ge", v)


def Gt(v: float) -> Bound:  # noqa: N802
    return Bound("gt", v)


def Le(v: float) -> Bound:  # noqa: N802
    return Bound("le", v)


def Lt(v: float) -> Bound:  # noqa: N802
    return Bound("lt", v)


def suggest(key: str, valid: typing.Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest valid spelling, or a list of the valid ones."""
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (valid: {', '.join(valid)})" if len(valid) <= 16 else ""


def type_name(tp: Any) -> str:
    """How a type reads in messages and the generated reference."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        converter = next((b for b in typing.get_args(tp)[1:] if hasattr(b, "convert")), None)
        return getattr(converter, "description", None) or type_name(typing.get_args(tp)[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " | ".join(repr(m.value) for m in tp)
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


class Invalid(Exception):
    """Raised after a problem was recorded in ``problems``; unwinds to ``parse``. Converters raise it too."""


class Converter(Protocol):
    """``Annotated`` metadata that parses a value itself (a registry: a name or ``{name: ..., <options>}``)."""

    def convert(self, value: Any, key: str, problems: list[str]) -> Any: ...


RESUMABLE = "resumable"
"""Field metadata: a checkpoint may be resumed with another value of this key and stay exact."""
NO_EFFECT = "no_effect"
"""Field metadata: the key changes no result (logging, trackers, resume mode), so no ``qaft run`` stage is redone for it."""
STAGE = "stage"
"""Field metadata of a root-config section: the first ``qaft run`` stage that reads it."""


def flag(f: dataclasses.Field, name: str) -> Any:
    """A field's metadata entry (``None`` when absent)."""
    return f.metadata.get(name)


def flagged_keys(cls: type, name: str, prefix: str = "") -> set[str]:
    """Dotted keys under ``cls`` whose field carries metadata ``name`` (nested dataclasses included)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out: set[str] = set()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if flag(f, name):
            out.add(key)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out |= flagged_keys(tp, name, key + ".")
    return out


def _convert(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Return ``value`` as type ``tp``; raise Invalid after recording the problem."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *bounds = typing.get_args(tp)
        converter = next((b for b in bounds if hasattr(b, "convert")), None)
        if converter is not None:
            return converter.convert(value, key, problems)
        out = _convert(value, base, key, problems)
        for b in bounds:
            if isinstance(b, Bound) and out is not None and not b.check(out):
                problems.append(f"{key}: got {value!r}, expected a value {b}")
                raise Invalid
        return out
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return _convert(value, a, key, [])
            except Invalid:
                continue
        problems.append(f"{key}: got {value!r}, expected {type_name(tp)}")
        raise Invalid
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        problems.append(f"{key}: got {value!r}, expected {type_name(tp)}" + (suggest(str(value), map(str, choices)) if isinstance(value, str) else ""))
        raise Invalid
    if origin is tuple:
        (item,) = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            problems.append(f"{key}: got {value!r}, expected {type_name(tp)}")
            raise Invalid
        return tuple(_convert(v, item, f"{key}[{i}]", problems) for i, v in enumerate(value))
    if hasattr(tp, "from_plain"):  # types that parse themselves (e.g. callbacks looked up by name)
        return tp.from_plain(value, key, problems)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key, problems)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            problems.append(f"{key}: got {value!r}, expected {type_name(tp)}" + suggest(str(value), [str(m.value) for m in tp]))
            raise Invalid from None
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML reads "1e-4" (no dot) as a string; accept it as the float the user meant.
            return float(value)
        except ValueError:
            pass
    if tp is Any or (isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        return value
    problems.append(f"{key}: got {value!r}, expected {type_name(tp)}")
    raise Invalid


def build(cls: type, data: Any, where: str, problems: list[str]) -> Any:
    """Construct dataclass ``cls`` from a mapping, appending one line per problem to ``problems``."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        problems.append(f"{where or 'config'}: got {type(data).__name__} {data!r}, expected a mapping of {cls.__name__} keys")
        raise Invalid
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    ok = True
    for k, v in data.items():
        key = f"{where}.{k}" if where else str(k)
        if k not in fields:
            problems.append(f"{key}: unknown key{suggest(str(k), fields)}")
            ok = False
            continue
        try:
            kwargs[k] = _convert(v, hints[k], key, problems)
        except Invalid:
            ok = False
    for name, f in fields.items():
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{where + '.' if where else ''}{name}: required key is missing")
            ok = False
    if not ok:
        raise Invalid
    try:
        return cls(**kwargs)
    except (ValueError, ConfigError) as e:  # cross-field rules from __post_init__: "field: message"
        for line in str(e).splitlines():
            problems.append(f"{where}.{line}" if where else line)
        raise Invalid from None


def parse(cls: type, data: Any, where: str = "") -> Any:
    """Build ``cls`` from ``data`` or raise one ConfigError listing every problem found."""
    problems: list[str] = []
    try:
        return build(cls, data, where, problems)
    except Invalid:
        raise ConfigError(problems) from None


def to_plain(obj: Any) -> Any:
    """Dataclass/enum/tuple tree → YAML-safe dicts, lists and scalars (inverse of ``parse``)."""
    if hasattr(obj, "to_plain") and not isinstance(obj, type):
        return obj.to_plain()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (tuple, list)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj

"""One registry per extension point (callbacks, weight quantizers, reconstructors, export formats).

A method is one file that defines a class with a typed ``Options`` dataclass and calls
``REGISTRY.register(Cls)``. A config names it as a string (``quantizer: gptq``) or as a mapping with
its options (``quantizer: {name: gptq, damp: 0.05}``); ``Registry.convert`` parses either into a
``Spec`` with typed options, collecting problems with suggestions like every other config key.
Fields declare this as ``Annotated[Spec, REGISTRY]`` (see ``typed``), so the config's choices, the
CLI help, the generated reference and the contract tests are all read from the registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .errors import ConfigError
from .typed import Invalid, build, suggest, to_plain

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class NoOptions:
    """For entries that take no options."""


@dataclass(frozen=True)
class Spec:
    """A registry entry chosen by a config, with its typed options."""

    name: str
    options: Any = NoOptions()

    def to_plain(self) -> str | dict[str, Any]:
        """The bare name when the entry has no options (``reconstructor: l2qer``), else ``{name: ..., <options>}``."""
        fields = [f for f in dataclasses.fields(self.options) if f.init]
        return self.name if not fields else {"name": self.name, **to_plain(self.options)}


class Registry(Generic[T]):
    """Entries by name. Each entry has an ``Options`` dataclass (``NoOptions`` when it takes none)."""

    def __init__(self, kind: str, *, mapping_only: bool = False):
        self.kind = kind
        self.description = f"name of a {kind}" + ("" if mapping_only else " or {name: ..., <options>}")
        """How the field reads in the generated config reference."""
        """What an entry is, for messages: ``callback``, ``weight quantizer``..."""
        self.mapping_only = mapping_only
        """Entries must be written ``{name: ...}`` (a list of callbacks reads better that way)."""
        self._entries: dict[str, T] = {}

    def register(self, entry: T, name: str | None = None) -> T:
        """Add ``entry`` under ``name`` (default: its ``name`` attribute); usable as a class decorator."""
        key = name or entry.name
        if key in self._entries and self._entries[key] is not entry:
            raise ValueError(f"{self.kind} {key!r} is registered twice")
        self._entries[key] = entry
        return entry

    @contextmanager
    def registered(self, entry: T, name: str | None = None) -> Iterator[T]:
        """``entry`` registered inside the block only (tests, examples): the registry is as before afterwards."""
        key = name or entry.name
        self.register(entry, key)
        try:
            yield entry
        finally:
            del self._entries[key]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str, where: str = "name") -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(f"{where}: unknown {self.kind} {name!r}{suggest(name, self._entries)}") from None

    def options_type(self, name: str) -> type:
        return getattr(self._entries[name], "Options", NoOptions)

    def spec(self, name: str, **options: Any) -> Spec:
        """A ``Spec`` for code (tests, defaults): options by keyword, validated like config input."""
        self.get(name)
        problems: list[str] = []
        try:
            return Spec(name, build(self.options_type(name), options, name, problems))
        except Invalid:
            raise ConfigError(problems) from None

    def create(self, spec: Spec | str, *args: Any, **kwargs: Any) -> Any:
        """An instance of the entry ``spec`` names, built with its options (``spec`` may be a bare name: default options)."""
        spec = self.spec(spec) if isinstance(spec, str) else spec
        return self.get(spec.name)(spec.options, *args, **kwargs)

    def convert(self, value: Any, key: str, problems: list[str]) -> Spec:
        """``typed``'s hook for ``Annotated[Spec, registry]`` fields: a name or ``{name: ..., <options>}``."""
        if isinstance(value, str) and not self.mapping_only:
            value = {"name": value}
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            example = f"{{name: {self.names()[0]}}}" if self._entries else "{name: ...}"
            form = "a mapping with a 'name' key" if self.mapping_only else "a name or a mapping with a 'name' key"
            problems.append(f"{key}: got {value!r}, expected {form}, e.g. {example}")
            raise Invalid
        name = value["name"]
        if name not in self._entries:
            problems.append(f"{key}.name: unknown {self.kind} {name!r}{suggest(name, self._entries)}")
            raise Invalid
        given = {k: v for k, v in value.items() if k != "name"}
        options_type = self.options_type(name)
        if given and not dataclasses.fields(options_type):
            problems.extend(f"{key}.{k}: {self.kind} {name!r} takes no options" for k in given)
            raise Invalid
        return Spec(name, build(options_type, given, key, problems))

    def optional(self) -> Optional:
        """A converter for fields that may also be ``none`` / null (``reconstructor: none``)."""
        return Optional(self)


@dataclass(frozen=True)
class Optional:
    """``Annotated[Spec | None, REGISTRY.optional()]``: ``none`` or null means no entry."""

    registry: Registry

    @property
    def description(self) -> str:
        return self.registry.description + " | none"

    def convert(self, value: Any, key: str, problems: list[str]) -> Spec | None:
        return None if value is None or value == "none" else self.registry.convert(value, key, problems)

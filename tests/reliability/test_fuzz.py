"""Property-based fuzzing of the config loader (whole YAML files and whole config trees): it either
returns a Config or raises a QaftError whose every line is non-empty. Never another exception.
(The override parser is fuzzed in ``tests/test_config.py::test_fuzzed_overrides_never_crash``.)"""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qaft.callbacks import CALLBACKS
from qaft.core.errors import QaftError
from qaft.pipeline.config import config_from_dict, dump_config, load_config

MINIMAL = {"model": {"name_or_path": "tiny-llama"}, "data": {"path": "python-docs"}}


def _leaves(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        out += _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
    return out


# every real dotted key of the resolved default config, so the fuzzer reaches every field's coercion
KEYS = _leaves(yaml.safe_load(dump_config(config_from_dict(MINIMAL, []))))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=16),
    st.sampled_from(["auto", "group", "channel", "mxint", "int", "-1", "1e-3", "[1,2]", "{}"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=6)
callback = st.fixed_dictionaries(
    {"name": st.one_of(st.sampled_from(CALLBACKS.names()), st.text(max_size=6))},
    optional={"every": values, "ratio": values, "layers": values, "interval": values, "init": values},
)


def _set(tree: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for p in path:
        nxt = tree.get(p)
        if not isinstance(nxt, dict):
            nxt = tree[p] = {}
        tree = nxt
    tree[last] = value


def _check(load) -> None:
    try:
        load()
    except QaftError as e:
        assert str(e).strip() and all(line.strip() for line in str(e).splitlines())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS), values), max_size=5), st.one_of(st.none(), st.lists(callback, max_size=3), values))
def test_fuzzed_config_trees_validate_or_raise_a_clear_error(pairs, callbacks):
    tree = yaml.safe_load(yaml.safe_dump(MINIMAL))
    for key, value in pairs:
        _set(tree, key, value)
    if callbacks is not None:
        tree["callbacks"] = callbacks
    _check(lambda: config_from_dict(tree, []))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.text(max_size=200),
        st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
        st.builds(lambda t, junk: yaml.safe_dump(t) + junk, st.just(MINIMAL), st.text(max_size=40)),
    )
)
def test_fuzzed_yaml_files_load_or_raise_a_clear_error(text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        _check(lambda: load_config(path))

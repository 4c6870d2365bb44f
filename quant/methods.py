"""Post-pass methods as ``qaft eval --methods`` names them: a weight quantizer × an optional reconstructor.

Names, all generated from the two registries: ``fp`` (no quantization); a quantizer alone (``rtn``,
``gptq``); a reconstructor on RTN (``l2qer``, ``aser``; ``rtn+aser`` is accepted for ``aser``); or
``<quantizer>+<reconstructor>`` (``gptq+aser``). A method takes its options from the config when the
config names the same quantizer or reconstructor (``postpass.quantizer: {name: gptq, act_order: true}``
makes ``--methods gptq+l2qer`` use act-order), and the registered defaults otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from qaft.core.errors import ConfigError
from qaft.core.registry import Spec
from qaft.core.typed import suggest

from .config import PostpassConfig
from .quantizers import QUANTIZERS
from .reconstructors import RECONSTRUCTORS

FLOAT = "fp"


@dataclass(frozen=True)
class Method:
    quantizer: Spec
    reconstructor: Spec | None

    @property
    def name(self) -> str:
        if self.reconstructor is None:
            return self.quantizer.name
        return self.reconstructor.name if self.quantizer.name == "rtn" else f"{self.quantizer.name}+{self.reconstructor.name}"

    @property
    def label(self) -> str:
        """``quantizer+reconstructor`` as the quantized folder's record writes it (``rtn+none``)."""
        return f"{self.quantizer.name}+{self.reconstructor.name if self.reconstructor else 'none'}"


def names() -> list[str]:
    """Every method name, in the order the CLI help lists them."""
    quantizers, reconstructors = QUANTIZERS.names(), RECONSTRUCTORS.names()
    rtn_first = sorted(quantizers, key=lambda q: q != "rtn")
    return [FLOAT, *rtn_first, *reconstructors, *(f"{q}+{r}" for q in rtn_first if q != "rtn" for r in reconstructors)]


def of_config(postpass: PostpassConfig) -> Method:
    """The method the config's ``postpass`` section describes."""
    return Method(postpass.quantizer, postpass.reconstructor)


def resolve(name: str, postpass: PostpassConfig) -> Method | None:
    """``Method`` for a name (``None`` for ``fp``), with the config's options where it names the same entries."""
    if name == FLOAT:
        return None
    q, _, r = name.rpartition("+") if "+" in name else ("", "", name)
    if not q and name in QUANTIZERS:
        q, r = name, ""
    quantizer = postpass.quantizer if postpass.quantizer.name == (q or "rtn") else QUANTIZERS.spec(q or "rtn")
    if not r:
        return Method(quantizer, None)
    recon = postpass.reconstructor if postpass.reconstructor is not None and postpass.reconstructor.name == r else RECONSTRUCTORS.spec(r)
    return Method(quantizer, recon)


def parse_list(text: str) -> list[str]:
    """``--methods fp,rtn,gptq+l2qer`` → names, each checked (one line per unknown name, with a suggestion)."""
    valid = names()
    items = [m.strip() for m in text.split(",") if m.strip()]
    items = [m.removeprefix("rtn+") for m in items]
    bad = [m for m in items if m not in valid]
    if bad or not items:
        raise ConfigError([f"--methods: unknown method {m!r}{suggest(m, valid)}" for m in bad] or ["--methods: give at least one method"])
    return items

"""Fan one loop event out to every configured callback, in config order, namespacing what they return."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from qaft.core.errors import CheckpointError

from .base import Callback, Context


class CallbackList:
    def __init__(self, callbacks: Sequence[Callback] = ()):
        self.callbacks = list(callbacks)

    def __iter__(self):
        return iter(self.callbacks)

    def __len__(self) -> int:
        return len(self.callbacks)

    def on_train_begin(self, ctx: Context) -> None:
        for cb in self.callbacks:
            cb.on_train_begin(ctx)

    def on_step_begin(self, ctx: Context) -> None:
        for cb in self.callbacks:
            cb.on_step_begin(ctx)

    def loss_terms(self, ctx: Context, batch: Mapping[str, torch.Tensor], outputs: Any) -> dict[str, torch.Tensor]:
        return {f"{cb.name}/{k}": v for cb in self.callbacks for k, v in cb.loss_terms(ctx, batch, outputs).items()}

    def on_gradients(self, ctx: Context) -> None:
        for cb in self.callbacks:
            cb.on_gradients(ctx)

    def on_step_end(self, ctx: Context) -> dict[str, float]:
        return {f"{cb.name}/{k}": v for cb in self.callbacks for k, v in cb.on_step_end(ctx).items()}

    def on_evaluate(self, ctx: Context, metrics: Mapping[str, float]) -> dict[str, float]:
        return {f"{cb.name}/{k}": v for cb in self.callbacks for k, v in cb.on_evaluate(ctx, metrics).items()}

    def on_train_end(self, ctx: Context) -> None:
        for cb in self.callbacks:
            cb.on_train_end(ctx)

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {cb.name: cb.state_dict() for cb in self.callbacks}

    def load_state_dict(self, states: Mapping[str, Mapping[str, Any]]) -> None:
        have, want = set(states), {cb.name for cb in self.callbacks}
        if have != want:
            raise CheckpointError(
                f"checkpoint holds callback states {sorted(have)} but the config lists {sorted(want)}: "
                "resume with the callbacks the run was started with, or start a new run with --overwrite"
            )
        for cb in self.callbacks:
            cb.load_state_dict(states[cb.name])

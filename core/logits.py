"""Next-token losses without the whole logits tensor.

A causal LM's head gives each position one score per vocabulary entry: at Gemma 3's 262k entries one 512-token
window's logits are 0.5 GB in float32, and a loss keeps two or three such tensors (the float copy, the log-softmax,
its gradient), several times the 270M-parameter model's own size. Here the model runs up to its head, whose input is
captured (the head itself answers a one-column placeholder), and the head and the loss then run over chunks of
positions; with gradients on, each chunk's gradient with respect to the head's input is taken right away (a loss at
one position reads that position alone), so nothing vocabulary-sized is kept for the backward. One chunk's logits
exist at a time; values and gradients equal the whole-tensor form to rounding.

What transformers applies after the head is restated per architecture: nothing for Llama, Mistral, Qwen 2/3 and
Phi-3, Gemma 2/3's final soft-capping. Any other architecture (e.g. Cohere's ``logit_scale``, Granite's
``logits_scaling``) has its whole logits made by its own forward (``post_head`` is None for it), then chunked alike;
so does a model whose head DeepSpeed ZeRO-3 shards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK = 128
"""Positions per chunk: 128 × 262k float32 ≈ 134 MB for Gemma 3's vocabulary."""

PLAIN = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "opt"})
SOFT_CAPPED = frozenset({"gemma2", "gemma3", "gemma3_text"})


def post_head(config) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the architecture's forward does to the head's output, or None where qaft does not know it."""
    kind = getattr(config, "model_type", None)
    if kind in PLAIN:
        return lambda x: x
    if kind in SOFT_CAPPED:
        cap = getattr(config, "final_logit_softcapping", None)
        return (lambda x: torch.tanh(x / cap) * cap) if cap else (lambda x: x)
    return None


@contextmanager
def _head_input(model: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """While open, the output head records its input and returns a ``[..., 1]`` placeholder instead of the logits."""
    head = model.get_output_embeddings()
    box: dict[str, torch.Tensor] = {}

    def forward(x: torch.Tensor) -> torch.Tensor:
        box["h"] = x
        device = x.device.type  # the head runs later under the autocast the model's forward ran under (bf16 matmuls)
        box["autocast"] = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        return x[..., :1]

    head.forward = forward
    try:
        yield box
    finally:
        del head.forward  # the class's own forward again


def _sharded(head: torch.nn.Module) -> bool:
    """DeepSpeed ZeRO-3 holds each weight as a shard, whole only inside its module's forward: the head applied again
    outside the model's forward (the chunks, and a checkpoint's recompute in the backward) met the shard in the ZeRO-3
    tests. Such a model makes its logits in its own forward."""
    return any(hasattr(p, "ds_id") for p in head.parameters())


def head_of(model: torch.nn.Module, input_ids: torch.Tensor | None = None, **inputs: torch.Tensor) -> Head:
    """One forward up to the head: its input and the head (with what follows it), or, for an architecture whose
    post-head transform is unknown, the whole logits and the identity. ``inputs``: instead of ``input_ids``
    (``inputs_embeds``). ``model`` may be wrapped (DDP, DeepSpeed): the forward goes through the wrapper."""
    inner = getattr(model, "module", model)
    post = post_head(getattr(inner, "config", None))
    if post is None or _sharded(inner.get_output_embeddings()):
        return Head(model(input_ids=input_ids, use_cache=False, **inputs).logits, lambda x: x)
    head = inner.get_output_embeddings()
    with _head_input(inner) as box:
        model(input_ids=input_ids, use_cache=False, **inputs)
    device, dtype, enabled = box["autocast"]

    def apply(h: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            return post(head(h))

    return Head(box["h"], apply, head_trains=any(p.requires_grad for p in head.parameters()))


@dataclass
class Head:
    """The head's input ``[batch, T, hidden]`` and the head; ``logits`` are computed (whole) only when asked for."""

    hidden: torch.Tensor
    apply: Callable[[torch.Tensor], torch.Tensor]
    head_trains: bool = False
    """The head has parameters that train (LoRA on ``lm_head``): chunks are checkpointed and recomputed instead."""

    @cached_property
    def logits(self) -> torch.Tensor:
        return self.apply(self.hidden)

    def chunks(self, fn: Callable[..., torch.Tensor], *per_position: torch.Tensor, positions: int | None = None, chunk: int | None = None) -> torch.Tensor:
        """``fn(logits, *others)`` over chunks of the first ``positions`` positions (default ``T - 1``: those that
        predict a next token), joined along positions. Where gradients flow, each chunk's gradient is taken at once
        (``_PerPosition``), or, when the head itself trains, the chunk is checkpointed: one chunk's logits at a time."""
        n = self.hidden.shape[1] - 1 if positions is None else positions
        chunk = chunk or CHUNK
        grad = torch.is_grad_enabled() and self.hidden.requires_grad

        def piece(h: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
            return fn(self.apply(h), *others)

        if grad and not self.head_trains:  # the usual case: each chunk's gradient is taken in the forward (no recompute)
            return _PerPosition.apply(self.hidden, piece, n, chunk, *per_position)
        parts = []
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            args = (self.hidden[:, a:b], *(x[:, a:b] for x in per_position))
            parts.append(checkpoint(piece, *args, use_reentrant=False) if grad else piece(*args))
        return torch.cat(parts, dim=1)


class _PerPosition(torch.autograd.Function):
    """``fn`` per position over chunks, its gradient with respect to the head's input taken chunk by chunk in the
    forward: a loss at one position depends on that position's hidden state alone, so the backward only scales the
    stored per-position gradients by the incoming ones. Each chunk's logits are made once (a checkpoint would make
    them again in the backward: for Gemma 3, whose head costs more than its decoder, ~1.4x a tuning step)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, piece: Callable[..., torch.Tensor], n: int, chunk: int, *per_position: torch.Tensor) -> torch.Tensor:
        values, grad = [], torch.zeros_like(hidden)
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            h = hidden[:, a:b].detach().requires_grad_(True)
            with torch.enable_grad():
                v = piece(h, *(x[:, a:b] for x in per_position))
                (grad[:, a:b],) = torch.autograd.grad(v.sum(), h)
            values.append(v.detach())
        ctx.save_for_backward(grad)
        ctx.inputs = 4 + len(per_position)
        return torch.cat(values, dim=1)

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        (grad,) = ctx.saved_tensors
        out = torch.zeros_like(grad)
        n = upstream.shape[1]
        out[:, :n] = grad[:, :n] * upstream.to(grad.dtype).unsqueeze(-1)
        return (out, *[None] * (ctx.inputs - 1))


def next_token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per position, float32: ``[batch, n, vocab]``, ``[batch, n]`` → ``[batch, n]``."""
    return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


def token_nll(model: torch.nn.Module, input_ids: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
    """Next-token NLL at every predicted position, ``[batch, T - 1]`` float32; differentiable where grad is enabled.
    ``inputs``: what the model reads instead of ``input_ids`` (``inputs_embeds``); ``input_ids`` are the targets."""
    return head_of(model, **(inputs or {"input_ids": input_ids})).chunks(next_token_losses, input_ids[:, 1:])


@dataclass
class LMOutputs:
    """A causal LM's training outputs with the loss computed in chunks: ``loss`` (the mean next-token NLL, as
    transformers' with ``labels=input_ids``) and, only if something reads them, the whole ``logits``."""

    loss: torch.Tensor
    head: Head

    @property
    def logits(self) -> torch.Tensor:
        return self.head.logits


def lm_outputs(model: torch.nn.Module, input_ids: torch.Tensor) -> LMOutputs:
    head = head_of(model, input_ids)
    return LMOutputs(head.chunks(next_token_losses, input_ids[:, 1:]).mean(), head)

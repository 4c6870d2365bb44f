"""The distillation loss, ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` per position, without vocabulary-sized temporaries.

Written the obvious way (``log_softmax`` of both, ``exp``, difference, product), autograd keeps five
float32 ``[positions, vocab]`` tensors alive until the backward: for SmolLM2's 49k vocabulary and a
2 × 256 batch that is ~0.5 GB, more than the model's own weights in bf16. Here the forward and the
backward each walk the positions in chunks and keep only the two logits tensors the model made
anyway; the backward recomputes the gradient, ``∂/∂s = T · (softmax(s/T) − softmax(t/T))`` per
position. Equal to the obvious form to float32 rounding, in value and gradient (tests). ``qaft tune`` calls it on
chunks of positions (``core.logits``), so not even the whole logits tensors exist at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 64
"""Positions per chunk: 64 × 49k float32 ≈ 12.6 MB per temporary."""


def _rows(x: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(x.float() / temperature, dim=-1)


class _KD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        out = torch.empty(student.shape[0], dtype=torch.float32, device=student.device)
        for i in range(0, student.shape[0], CHUNK):
            s, t = _rows(student[i : i + CHUNK], temperature), _rows(teacher[i : i + CHUNK], temperature)
            out[i : i + CHUNK] = temperature**2 * (t.exp() * (t - s)).sum(-1)
        ctx.save_for_backward(student, teacher)
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        student, teacher = ctx.saved_tensors
        temperature = ctx.temperature
        out = torch.empty_like(student)
        for i in range(0, student.shape[0], CHUNK):
            s, t = _rows(student[i : i + CHUNK], temperature), _rows(teacher[i : i + CHUNK], temperature)
            out[i : i + CHUNK] = (temperature * (s.exp() - t.exp()) * grad[i : i + CHUNK, None]).to(student.dtype)
        return out, None, None


def kd_per_position(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` over the vocabulary at each position (``[..., vocab]`` → ``[...]``,
    float32); differentiable in ``student`` only (the teacher is a target)."""
    lead = student.shape[:-1]
    flat = _KD.apply(student.reshape(-1, student.shape[-1]), teacher.detach().reshape(-1, teacher.shape[-1]), temperature)
    return flat.reshape(lead)


@torch.no_grad()
def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``kd_per_position`` averaged over every position of the batch."""
    return kd_per_position(student, teacher, temperature).mean()

"""Learning-rate schedules: ``transformers.get_scheduler``'s shape over the whole run, or restarted per phase."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import torch
from transformers import get_scheduler

from .config import TrainingConfig


def build_scheduler(opt: torch.optim.Optimizer, t: TrainingConfig, max_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """``t.lr_scheduler_type`` with ``t.warmup_ratio`` of ``max_steps`` warming up."""
    return get_scheduler(t.lr_scheduler_type, opt, num_warmup_steps=math.ceil(t.warmup_ratio * max_steps), num_training_steps=max_steps)


def phased_scheduler(opt: torch.optim.Optimizer, t: TrainingConfig, starts: Sequence[int], max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """One ``t.lr_scheduler_type`` schedule per phase ``[starts[i], starts[i + 1])`` (the last ends at ``max_steps``),
    each with its own warm-up and decay: block-wise tuning trains one layer per phase, and a layer that starts
    late in one run-long cosine would only ever see a small learning rate."""
    ends = [*starts[1:], max_steps]
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=t.learning_rate)  # polynomial reads the peak lr from it
    shapes = [build_scheduler(probe, t, max(end - start, 1)).lr_lambdas[0] for start, end in zip(starts, ends)]

    def factor(step: int) -> float:
        i = max(bisect.bisect_right(starts, step) - 1, 0)
        return shapes[i](step - starts[i])

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)

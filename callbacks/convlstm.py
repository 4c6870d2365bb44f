"""A Conv-LSTM encoder–forecaster over token sequences (Shi et al., 2015), for temporal distillation.

Inputs are sequences of feature maps ``[batch, time, channels, tokens]``; the gates are 1-D
convolutions over the token axis, so each token's state depends on its neighbours. Peephole
connections (the cell state feeding the input, forget and output gates) are real ``nn.Parameter``s,
one weight per hidden channel broadcast over tokens, so they train and are saved (the official TSKD
code computed them from unregistered tensors that never learned).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvLSTMCell(nn.Module):
    def __init__(self, in_channels: int, hidden: int, kernel: int):
        super().__init__()
        self.hidden = hidden
        self.gates = nn.Conv1d(in_channels + hidden, 4 * hidden, kernel, padding=kernel // 2)
        self.peep_i = nn.Parameter(torch.zeros(hidden, 1))
        self.peep_f = nn.Parameter(torch.zeros(hidden, 1))
        self.peep_o = nn.Parameter(torch.zeros(hidden, 1))

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        i, f, g, o = self.gates(torch.cat([x, h], dim=1)).chunk(4, dim=1)
        i = torch.sigmoid(i + self.peep_i * c)
        f = torch.sigmoid(f + self.peep_f * c)
        c = f * c + i * torch.tanh(g)
        o = torch.sigmoid(o + self.peep_o * c)
        return o * torch.tanh(c), c


class ConvLSTMForecaster(nn.Module):
    """Encode a sequence of ``[batch, channels, tokens]`` maps, forecast the next one (non-negative)."""

    def __init__(self, channels: int, hidden: int = 16, kernel: int = 3):
        super().__init__()
        self.encoder = ConvLSTMCell(channels, hidden, kernel)
        self.forecaster = ConvLSTMCell(hidden, hidden, kernel)
        self.head = nn.Conv1d(hidden, channels, 1)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """``seq``: ``[batch, time, channels, tokens]`` → ``[batch, channels, tokens]``."""
        b, _, _, t = seq.shape
        h = c = seq.new_zeros(b, self.encoder.hidden, t)
        for step in seq.unbind(1):
            h, c = self.encoder(step, (h, c))
        h, c = self.forecaster(h, (h, c))  # one step ahead, seeded with the encoder's state
        return F.softplus(self.head(h))  # increments and gaps are magnitudes

"""The demo's teacher (a small 1-D CNN) and student (an MLP); both expose ``features`` and ``fc``."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class TeacherCNN1d(nn.Module):
    """Three 1-D convolutions, global max pooling, a hidden linear layer (the penultimate feature)
    and a linear head. Max pooling over positions makes it shift-invariant, which MNIST-1D rewards.

    Args:
        num_classes: Number of classes.
        channels: Channels of the first two convolutions (the third has twice as many).
        feat_dim: Size of the penultimate feature that the relation loss sees.
        pool_positions: Positions left after max pooling; 1 (global) for MNIST-1D, 8 for the
            flattened 8x8 digits, where position carries the class (one pooled value per image row).

    Shape:
        input [B, L] -> logits [B, num_classes]; ``features`` gives [B, feat_dim].
    """

    def __init__(self, num_classes: int = 10, channels: int = 32, feat_dim: int = 128, pool_positions: int = 1) -> None:
        super().__init__()
        pool = "maxpool" if pool_positions == 1 else f"maxpool{pool_positions}"
        self.arch = f"cnn1d({channels}-{channels}-{2 * channels},k5-5-3,{pool})-{feat_dim}-{num_classes}"
        self.body = nn.Sequential(
            nn.Conv1d(1, channels, 5, padding=2),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 5, padding=2),
            nn.ReLU(),
            nn.Conv1d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveMaxPool1d(pool_positions),
            nn.Flatten(),
            nn.Linear(2 * channels * pool_positions, feat_dim),
            nn.ReLU(),
        )
        self.fc = nn.Linear(feat_dim, num_classes)
        self.feat_dim = feat_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate feature, the input of ``fc``."""
        return self.body(x.unsqueeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class StudentMLP(nn.Module):
    """A plain ReLU MLP, e.g. 40-100-100-10; the last hidden layer is the penultimate feature.

    Args:
        input_dim: Input size.
        hidden: Widths of the hidden layers.
        num_classes: Number of classes.

    Shape:
        input [B, D] -> logits [B, num_classes]; ``features`` gives [B, hidden[-1]].
    """

    def __init__(self, input_dim: int, hidden: Sequence[int] = (100, 100), num_classes: int = 10) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("hidden must list at least one layer width")
        layers: list[nn.Module] = []
        width = input_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)
        self.feat_dim = width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate feature, the input of ``fc``."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

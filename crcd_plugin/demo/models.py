"""The demo's teachers (small 1-D CNNs) and student (an MLP); all expose ``features`` and ``fc``.

``TEACHER_ARCHS`` names the teachers that ``build_teacher`` makes and the tuning run chooses from.
"""

from __future__ import annotations

from typing import Sequence, Union

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


class StridedCNN1d(nn.Module):
    """Strided 1-D convolutions whose flattened output map is the penultimate feature, then a
    linear head: no pooling and no hidden FC layer, so the feature keeps where along the signal
    each pattern sits (the relation loss sees a 160-d feature on MNIST-1D's 40-long inputs).

    Args:
        input_dim: Input length ``L``.
        num_classes: Number of classes.
        channels: Channels of every convolution.
        layers: Number of convolutions (kernel 5, stride 2, padding 2: each halves the length).

    Shape:
        input [B, L] -> logits [B, num_classes]; ``features`` gives [B, channels * ceil(L / 2**layers)].
    """

    def __init__(self, input_dim: int, num_classes: int = 10, channels: int = 32, layers: int = 3) -> None:
        super().__init__()
        convs: list[nn.Module] = []
        width, length = 1, input_dim
        for _ in range(layers):
            convs += [nn.Conv1d(width, channels, 5, stride=2, padding=2), nn.ReLU()]
            width, length = channels, (length + 1) // 2
        self.body = nn.Sequential(*convs, nn.Flatten())
        self.feat_dim = channels * length
        self.fc = nn.Linear(self.feat_dim, num_classes)
        self.arch = f"cnn1d({'-'.join([str(channels)] * layers)},k5,s2,flatten)-{self.feat_dim}-{num_classes}"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate feature, the input of ``fc``: the flattened last convolution map."""
        return self.body(x.unsqueeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


Teacher = Union[StridedCNN1d, TeacherCNN1d]

# Teachers the tuning run compares (by the validation accuracy of the students they teach).
TEACHER_ARCHS = ("strided", "strided64", "maxpool")


def build_teacher(arch: str, input_dim: int, num_classes: int, dataset: str = "mnist1d") -> Teacher:
    """Make an untrained teacher by name.

    Args:
        arch: ``"strided"`` (``StridedCNN1d``, 32 channels, about 12k parameters), ``"strided64"``
            (the same with 64 channels, 320-d feature) or ``"maxpool"`` (``TeacherCNN1d``, global max
            pooling and a 128-d FC feature; on digits it pools to 8 positions, one per image row).
        input_dim: Input length.
        num_classes: Number of classes.
        dataset: Dataset name (``"digits"`` changes the max-pool teacher's pooling).

    Returns:
        The teacher module, with ``features``, ``fc``, ``feat_dim`` and an ``arch`` string.

    Raises:
        ValueError: On an unknown ``arch``.
    """
    if arch == "strided":
        return StridedCNN1d(input_dim, num_classes, channels=32)
    if arch == "strided64":
        return StridedCNN1d(input_dim, num_classes, channels=64)
    if arch == "maxpool":
        # Position matters in flattened 8x8 digits, so their teacher pools per image row, not globally.
        return TeacherCNN1d(num_classes, pool_positions=8 if dataset == "digits" else 1)
    raise ValueError(f"teacher arch must be one of {TEACHER_ARCHS}, got {arch!r}")


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

"""The tiny problem shared by the distributed examples: generated data, MLPs and a quick teacher.

Small on purpose, so that two processes on two CPU cores finish in seconds.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

SAMPLES, DIM, CLASSES = 1200, 20, 10


def make_data(seed: int = 0) -> TensorDataset:
    """The same dataset in every process: inputs ``[N, 20]``, labels ``[N]`` and dataset indices ``[N]``."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(CLASSES, DIM, generator=g) * 1.5
    y = torch.randint(0, CLASSES, (SAMPLES,), generator=g)
    x = centers[y] + torch.randn(SAMPLES, DIM, generator=g) * 1.5
    return TensorDataset(x, y, torch.arange(SAMPLES))


def mlp(width: int) -> nn.Sequential:
    """``Linear-ReLU-Linear-ReLU-Linear``: the classifier head is module ``"4"``."""
    return nn.Sequential(
        nn.Linear(DIM, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, CLASSES)
    )


def train_teacher(data: TensorDataset, device: torch.device) -> nn.Module:
    """A quick teacher, trained identically in every process (same seed, full batch)."""
    torch.manual_seed(0)
    teacher = mlp(64).to(device)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    x, y = data.tensors[0].to(device), data.tensors[1].to(device)
    for _ in range(40):
        optimizer.zero_grad()
        F.cross_entropy(teacher(x), y).backward()
        optimizer.step()
    return teacher


def accuracy(model: nn.Module, data: TensorDataset, device: torch.device) -> float:
    """Training-set accuracy of ``model`` (a demo: the data has no held-out split)."""
    x, y = data.tensors[0].to(device), data.tensors[1].to(device)
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())

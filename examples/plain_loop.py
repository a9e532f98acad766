"""CRCD in a plain PyTorch loop: train a small teacher, then distil it into a smaller student.

Synthetic data generated on the spot (no download); CPU, under a minute on 2 cores:

    python examples/plain_loop.py

The distillation-specific lines are marked ``# CRCD``.
"""

import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from crcd_plugin import CRCDConfig, CRCDDistiller, RelationConfig

NUM_FEATURES, NUM_CLASSES, EPOCHS = 16, 10, 10


def make_data(num_samples: int, seed: int) -> TensorDataset:
    """Labels from a fixed random non-linear function of Gaussian inputs."""
    rule = torch.Generator().manual_seed(0)
    w1 = torch.randn(NUM_FEATURES, 16, generator=rule)
    w2 = torch.randn(16, NUM_CLASSES, generator=rule)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, NUM_FEATURES, generator=g)
    y = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
    return TensorDataset(x, y, torch.arange(num_samples))  # the index feeds CRCD's memory bank


class MLP(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        layers, dim = [], NUM_FEATURES
        for _ in range(depth):
            layers += [nn.Linear(dim, width), nn.BatchNorm1d(width), nn.ReLU()]
            dim = width
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    x, y, _ = data.tensors
    return (model(x).argmax(dim=1) == y).float().mean().item()


def train(model: nn.Module, loader: DataLoader, distiller: Optional[CRCDDistiller] = None) -> None:
    params = (distiller or model).parameters()
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, EPOCHS)
    for epoch in range(EPOCHS):
        (distiller or model).train()
        if distiller is not None:
            distiller.set_progress(epoch)  # CRCD: w(t) = 1, then 0 in the last 4% of epochs
        for x, y, index in loader:
            if distiller is not None:
                loss = distiller(x, y, index)["loss"]  # CRCD: CE + KD + CRCD feature + gradient terms
            else:
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        lr_schedule.step()


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny models: extra threads only add overhead
    train_set, test_set = make_data(4000, seed=1), make_data(2000, seed=2)
    loader = DataLoader(train_set, batch_size=64, shuffle=True, drop_last=True)

    start = time.perf_counter()
    teacher = MLP(width=256, depth=2)
    train(teacher, loader)
    print(f"teacher  (256x2): test accuracy {accuracy(teacher, test_set):.3f}")

    torch.manual_seed(1)
    baseline = MLP(width=16, depth=2)
    train(baseline, loader)
    print(f"student  (16x2), CE only: test accuracy {accuracy(baseline, test_set):.3f}")

    torch.manual_seed(1)
    student = MLP(width=16, depth=2)
    config = CRCDConfig(
        gradient_element=True, schedule="step", schedule_until=0.96,
        # Fewer negatives/anchors and a smaller embedding than the reference (K=500, A=B, d=128): CPU budget.
        relation=RelationConfig(num_negatives=64, num_anchors=16, embed_dim=64),
    )
    distiller = CRCDDistiller(student, teacher, "fc", "fc", config, num_samples=len(train_set), total_steps=EPOCHS)
    train(student, loader, distiller)
    print(f"student  (16x2), CRCD:    test accuracy {accuracy(student, test_set):.3f}")
    torch.save(distiller.student_state_dict(), "/tmp/crcd_student.pt")  # CRCD: export the student only
    print(f"total time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

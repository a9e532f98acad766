"""The placeholders that documentation snippets may use without defining them, page by page.

A page's python blocks run top to bottom in one fresh namespace (tests/test_docs.py), like a
notebook a reader types in. That namespace starts with the placeholders this file lists for the
page, and nothing else: no ``torch``, no ``nn``, nothing from ``crcd_plugin``. A snippet imports
what it uses, as a reader's script would. The placeholders stand for what the reader already has:
their models, their data, their loop's variables.

To let a page use a new placeholder, add its name to the page's entry in ``PAGES`` (and, for a new
kind of object, to ``placeholders()``). Keep the lists short: a name that a snippet could define in
one line belongs in the snippet.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# page name -> the placeholders its snippets use. A page that is not listed gets none.
PAGES: Dict[str, List[str]] = {
    "README.md": ["student", "teacher", "train_set", "loader", "epochs", "student_dim", "teacher_dim",
                  "student_feat", "teacher_feat", "task_loss"],
    "index.md": ["student", "teacher", "loader", "epochs", "student_feat", "teacher_feat", "task_loss"],
    "api.md": ["student_dim", "teacher_dim", "student_feat", "teacher_feat", "index", "train_set"],
    "distiller.md": [],
    "distributed.md": ["student", "teacher", "train_set", "loader", "epochs"],
    "huggingface.md": [],
    "lightning.md": ["student", "teacher", "loader"],
    "reliability.md": ["student", "teacher", "train_set", "student_dim", "teacher_dim", "x", "y", "index"],
    "teacher-cache.md": ["student", "teacher", "train_set", "loader", "epochs", "x", "y", "index"],
    "timm.md": [],
}


class Net(nn.Module):
    """A tiny classifier with an ``fc`` head, like torchvision's ResNets: ``[B, 16] -> [B, 10]``."""

    def __init__(self, width: int, in_dim: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_dim, width), nn.ReLU())
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def placeholders() -> Dict[str, object]:
    """Every placeholder, freshly made (seeded): models, an indexed dataset, one batch, features."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 16), torch.randint(0, 10, (64,))
    train_set = TensorDataset(x, y, torch.arange(64))  # (input, label, dataset index)
    return {
        "student": Net(8),
        "teacher": Net(32),
        "train_set": train_set,
        "loader": DataLoader(train_set, batch_size=16, shuffle=True),
        "epochs": 2,
        "x": x[:16],
        "y": y[:16],
        "index": torch.arange(16),
        "student_dim": 8,
        "teacher_dim": 32,
        "student_feat": torch.randn(16, 8, requires_grad=True),
        "teacher_feat": torch.randn(16, 32),
        "task_loss": torch.zeros((), requires_grad=True),
    }


def namespace_for(page: str) -> Dict[str, object]:
    """A fresh namespace with the placeholders of ``page`` (a file name such as ``"index.md"``)."""
    every = placeholders()
    return {name: every[name] for name in PAGES.get(page, [])}

"""CRCD in a PyTorch Lightning script: one callback, the LightningModule unchanged.

    python examples/lightning_train.py

Offline: scikit-learn's handwritten digits (1797 images of 8x8, shipped with the package; 1437 for
training, 360 held out). One plain LightningModule class serves three runs: a wide teacher, a narrow
student with cross-entropy alone, and the same student with ``CRCDCallback(teacher, ...)`` added to
``Trainer(callbacks=...)``: KD, the CRCD feature and gradient elements (in-batch negatives, the
library's default) and the reference's step schedule over optimizer steps.
"""

import argparse
import tempfile
from collections import OrderedDict

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from crcd_plugin.config import CRCDConfig, RelationConfig
from crcd_plugin.integrations.lightning import CRCDCallback


class DigitClassifier(L.LightningModule):
    """A plain LightningModule: it knows nothing of distillation."""

    def __init__(self, width: int, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(OrderedDict(
            body=nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()),
            fc=nn.Linear(width, 10),   # the classifier head: its input is the distilled feature
        ))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss                    # the task loss; CRCDCallback adds KD and CRCD to it

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def digits(seed: int = 0):
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return TensorDataset(x[:1437], y[:1437]), TensorDataset(x[1437:], y[1437:])


def fit(module: L.LightningModule, train, val, epochs: int, callbacks=()) -> float:
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, callbacks=list(callbacks), logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tempfile.mkdtemp(),
    )
    trainer.fit(module, DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=360))
    return float(trainer.callback_metrics["val_acc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: more threads only add overhead
    train, val = digits()

    L.seed_everything(0, verbose=False)
    teacher = DigitClassifier(width=256)
    print(f"teacher accuracy {fit(teacher, train, val, args.epochs):.3f}")

    L.seed_everything(1, verbose=False)
    print(f"student (CE alone) accuracy {fit(DigitClassifier(width=16), train, val, args.epochs):.3f}")

    L.seed_everything(1, verbose=False)
    student = DigitClassifier(width=16)
    crcd = CRCDCallback(
        teacher.net, student_classifier="net.fc", teacher_classifier="fc",   # dotted paths of the classifier heads
        config=CRCDConfig(gradient_element=True, schedule="step", relation=RelationConfig(embed_dim=32)),
    )
    print(f"student (CRCD) accuracy {fit(student, train, val, args.epochs, callbacks=[crcd]):.3f}")
    torch.save(student.net.state_dict(), f"{tempfile.mkdtemp()}/student.pt")   # the student alone: no teacher


if __name__ == "__main__":
    main()

"""The CIFAR-100 recipe of the CRCD paper: train a teacher, or distil a student with CRCD.

Real data needs torchvision and a network (CIFAR-100 is downloaded on first use); ``--synthetic``
runs the same code on random tensors, and ``--smoke`` runs a couple of such steps, for checking
an installation without a GPU or a download. See README.md next to this file.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset


def _load_models_module() -> Any:
    # Loaded by path under a unique name: a plain `import models` could pick up another
    # example's models.py when several examples share one interpreter (pytest, notebooks).
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models.py")
    spec = importlib.util.spec_from_file_location("crcd_cifar100_models", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


_models = sys.modules.get("crcd_cifar100_models") or _load_models_module()
MODEL_NAMES: List[str] = _models.MODEL_NAMES
create_model = _models.create_model

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
CIFAR100_TRAIN_SIZE = 50_000
NUM_CLASSES = 100


@dataclass
class Recipe:
    """Hyperparameters of the paper's CIFAR-100 recipe; the defaults are the reference values."""

    epochs: int = 250
    batch_size: int = 64
    lr: float = 0.05
    lr_milestones: Tuple[int, ...] = (150, 180, 210)
    lr_decay: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    gamma: float = 1.0  # cross-entropy weight
    alpha: float = 0.9  # KD weight
    beta: float = 1.0  # CRCD feature-element weight
    gradient_weight: float = 1.0  # CRCD gradient-element weight
    kd_temperature: float = 4.0
    crcd_temperature: float = 0.05
    num_negatives: int = 500
    bank_momentum: float = 0.5
    embed_dim: int = 128
    gradient_element: bool = True
    distill_until: float = 0.96  # fraction of training with distillation on; CE alone afterwards


# --------------------------------------------------------------------------------------- data


class IndexedDataset(Dataset):
    """Wraps a ``(image, label)`` dataset to yield ``(image, label, index)``.

    The index is the sample's position in the training set: the CRCD memory bank keeps one row
    per training sample and needs it to read and update that row.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Tuple[Tensor, int, int]:
        image, label = self.dataset[index]
        return image, label, index


class RandomCifar(Dataset):
    """Random CIFAR-shaped data, ``(image [3, 32, 32], label, index)``, fixed by ``seed``."""

    def __init__(self, size: int, num_classes: int = NUM_CLASSES, seed: int = 0) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(size, 3, 32, 32, generator=generator)
        self.labels = torch.randint(0, num_classes, (size,), generator=generator)

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, index: int) -> Tuple[Tensor, int, int]:
        return self.images[index], int(self.labels[index]), index


def cifar100_datasets(root: str) -> Tuple[Dataset, Dataset]:
    """CIFAR-100 train (crop + flip, indexed) and test sets; downloads into ``root`` if needed."""
    from torchvision import datasets, transforms  # only real data needs torchvision

    normalize = transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD)
    train_transform = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    test_transform = transforms.Compose([transforms.ToTensor(), normalize])
    train = datasets.CIFAR100(root, train=True, download=True, transform=train_transform)
    test = datasets.CIFAR100(root, train=False, download=True, transform=test_transform)
    return IndexedDataset(train), IndexedDataset(test)


def make_loaders(
    synthetic: bool,
    batch_size: int,
    data_dir: str = "./data",
    workers: int = 4,
    synthetic_size: int = 256,
) -> Tuple[DataLoader, DataLoader]:
    """Train and test loaders of ``(image, label, index)`` batches."""
    if synthetic:
        train_set: Dataset = RandomCifar(synthetic_size, seed=0)
        test_set: Dataset = RandomCifar(max(batch_size, synthetic_size // 4), seed=1)
        workers = 0
    else:
        train_set, test_set = cifar100_datasets(data_dir)
    pin = torch.cuda.is_available()
    train_loader = DataLoader(
        train_set, batch_size=batch_size, shuffle=True, num_workers=workers,
        pin_memory=pin, drop_last=True,
    )
    test_loader = DataLoader(
        test_set, batch_size=max(batch_size, 100), shuffle=False, num_workers=workers,
        pin_memory=pin,
    )
    return train_loader, test_loader


# ---------------------------------------------------------------------------------- objectives


class CrossEntropyObjective(nn.Module):
    """Teacher training: plain cross-entropy, with the distiller's call and output shape.

    ``forward(images, labels, index=...)`` returns ``{"loss", "task_loss", "logits"}`` so that
    one training loop serves both modes.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def set_progress(self, step: int) -> None:
        """No schedule to advance: the teacher trains on CE alone."""

    def forward(self, images: Tensor, labels: Tensor, index: Optional[Tensor] = None) -> Dict[str, Tensor]:
        logits = self.model(images)
        loss = F.cross_entropy(logits, labels)
        return {"loss": loss, "task_loss": loss, "logits": logits}


def load_teacher(arch: str, checkpoint: Optional[str], device: torch.device) -> nn.Module:
    """Build the teacher and load its weights (a checkpoint written by ``--mode teacher``)."""
    teacher = create_model(arch, NUM_CLASSES)
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        saved_arch = state.get("arch", arch)
        if saved_arch != arch:
            raise ValueError(f"--teacher is {arch!r} but {checkpoint} holds a {saved_arch!r}")
        teacher.load_state_dict(state["model"])
    teacher.to(device).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


def build_distiller(
    student: nn.Module, teacher: nn.Module, recipe: Recipe, num_samples: int
) -> nn.Module:
    """The library's ``CRCDDistiller`` configured with the reference recipe.

    Args:
        student: The student; its classifier is ``.fc``.
        teacher: The frozen teacher; its classifier is ``.fc``.
        recipe: Loss weights, temperatures, CRCD options and the number of epochs, which the
            distillation-weight schedule counts in.
        num_samples: Rows of the memory bank, the size of the training set.

    Returns:
        The distiller; call ``distiller.set_progress(epoch)`` at the start of every epoch.
    """
    from crcd_plugin import CRCDConfig, CRCDDistiller, RelationConfig

    config = CRCDConfig(
        task_weight=recipe.gamma,
        kd_weight=recipe.alpha,
        feature_weight=recipe.beta,
        kd_temperature=recipe.kd_temperature,
        gradient_element=recipe.gradient_element,
        gradient_weight=recipe.gradient_weight,
        schedule="step",
        schedule_until=recipe.distill_until,
        relation=RelationConfig(
            embed_dim=recipe.embed_dim,
            negatives="bank",
            num_negatives=recipe.num_negatives,
            temperature=recipe.crcd_temperature,
            objective="nce",
            momentum=recipe.bank_momentum,
        ),
    )
    return CRCDDistiller(
        student,
        teacher,
        student_classifier="fc",
        teacher_classifier="fc",
        config=config,
        num_samples=num_samples,
        total_steps=recipe.epochs,
    )


def trainable_parameters(objective: nn.Module) -> List[nn.Parameter]:
    """Student weights plus the CRCD embedding heads; the frozen teacher is left out."""
    return [p for p in objective.parameters() if p.requires_grad]


def make_optimizer(objective: nn.Module, recipe: Recipe) -> torch.optim.SGD:
    """SGD with the recipe's learning rate, momentum and weight decay over the trainable parameters."""
    return torch.optim.SGD(
        trainable_parameters(objective),
        lr=recipe.lr,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
    )


# -------------------------------------------------------------------------------------- loop


def train_step(
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Sequence[Tensor],
    device: torch.device,
) -> Dict[str, float]:
    """One SGD step on one ``(images, labels, index)`` batch; returns the loss components."""
    images, labels, index = (t.to(device, non_blocking=True) for t in batch)
    out = objective(images, labels, index=index)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    optimizer.step()
    return {k: float(v.detach()) for k, v in out.items() if k != "logits" and torch.is_tensor(v)}


def train_one_epoch(
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[Sequence[Tensor]],
    device: torch.device,
    max_steps: Optional[int] = None,
) -> Dict[str, float]:
    """Train for one epoch (or ``max_steps`` steps); returns the mean of each loss component."""
    objective.train()
    totals: Dict[str, float] = {}
    steps = 0
    for batch in loader:
        for key, value in train_step(objective, optimizer, batch, device).items():
            totals[key] = totals.get(key, 0.0) + value
        steps += 1
        if max_steps is not None and steps >= max_steps:
            break
    return {key: value / max(steps, 1) for key, value in totals.items()}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Sequence[Tensor]], device: torch.device) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = total = 0
    for images, labels, _ in loader:
        images, labels = images.to(device), labels.to(device)
        correct += int((model(images).argmax(1) == labels).sum())
        total += labels.numel()
    return 100.0 * correct / max(total, 1)


# ----------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    defaults = Recipe()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("teacher", "distill"), default="teacher")
    parser.add_argument("--model", choices=MODEL_NAMES, default=None,
                        help="the network to train (default: resnet32x4 as teacher, resnet8x4 as student)")
    parser.add_argument("--teacher", choices=MODEL_NAMES, default="resnet32x4",
                        help="teacher architecture in distill mode")
    parser.add_argument("--teacher-ckpt", default=None, help="checkpoint written by --mode teacher")
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--output-dir", default="./runs/cifar100")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic", action="store_true",
                        help="random CIFAR-shaped data instead of CIFAR-100 (no download)")
    parser.add_argument("--synthetic-size", type=int, default=256)
    parser.add_argument("--smoke", action="store_true",
                        help="a couple of steps on random data: --synthetic, 1 epoch, 2 steps")
    parser.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--lr-milestones", type=int, nargs="+", default=list(defaults.lr_milestones))
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--gamma", type=float, default=defaults.gamma, help="cross-entropy weight")
    parser.add_argument("--alpha", type=float, default=defaults.alpha, help="KD weight")
    parser.add_argument("--beta", type=float, default=defaults.beta, help="CRCD feature-element weight")
    parser.add_argument("--gradient-weight", type=float, default=defaults.gradient_weight,
                        help="CRCD gradient-element weight")
    parser.add_argument("--kd-temperature", type=float, default=defaults.kd_temperature)
    parser.add_argument("--crcd-temperature", type=float, default=defaults.crcd_temperature)
    parser.add_argument("--num-negatives", type=int, default=defaults.num_negatives)
    parser.add_argument("--bank-momentum", type=float, default=defaults.bank_momentum)
    parser.add_argument("--embed-dim", type=int, default=defaults.embed_dim)
    parser.add_argument("--no-gradient-element", dest="gradient_element", action="store_false",
                        help="distil the feature element only")
    parser.add_argument("--distill-until", type=float, default=defaults.distill_until,
                        help="fraction of training with KD/CRCD on (CE alone afterwards)")
    return parser


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    return Recipe(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_milestones=tuple(args.lr_milestones),
        weight_decay=args.weight_decay,
        gamma=args.gamma,
        alpha=args.alpha,
        beta=args.beta,
        gradient_weight=args.gradient_weight,
        kd_temperature=args.kd_temperature,
        crcd_temperature=args.crcd_temperature,
        num_negatives=args.num_negatives,
        bank_momentum=args.bank_momentum,
        embed_dim=args.embed_dim,
        gradient_element=args.gradient_element,
        distill_until=args.distill_until,
    )


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the recipe; returns a summary (final losses, accuracies, checkpoint path)."""
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.synthetic = True
        args.epochs = 1
        args.max_steps = args.max_steps or 2
        args.batch_size = min(args.batch_size, 8)
        args.synthetic_size = min(args.synthetic_size, 64)
    if args.mode == "distill" and args.teacher_ckpt is None and not args.synthetic:
        raise SystemExit("--mode distill needs --teacher-ckpt (a checkpoint from --mode teacher)")
    recipe = recipe_from_args(args)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model_name = args.model or ("resnet32x4" if args.mode == "teacher" else "resnet8x4")

    train_loader, test_loader = make_loaders(
        args.synthetic, recipe.batch_size, args.data_dir, args.workers, args.synthetic_size
    )
    num_samples = len(train_loader.dataset)  # type: ignore[arg-type]
    model = create_model(model_name, NUM_CLASSES).to(device)
    if args.mode == "teacher":
        objective: nn.Module = CrossEntropyObjective(model)
    else:
        if args.teacher_ckpt is None:
            print("warning: no --teacher-ckpt, distilling from a randomly initialised teacher")
        teacher = load_teacher(args.teacher, args.teacher_ckpt, device)
        objective = build_distiller(model, teacher, recipe, num_samples).to(device)
    optimizer = make_optimizer(objective, recipe)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(recipe.lr_milestones), gamma=recipe.lr_decay
    )

    os.makedirs(args.output_dir, exist_ok=True)
    tag = model_name if args.mode == "teacher" else f"{model_name}_from_{args.teacher}"
    checkpoint_path = os.path.join(args.output_dir, f"{args.mode}_{tag}.pt")
    print(f"{args.mode}: {model_name}, {num_samples} training samples, device {device}, "
          f"{recipe.epochs} epochs of batch {recipe.batch_size}")
    best = accuracy = 0.0
    losses: Dict[str, float] = {}
    for epoch in range(recipe.epochs):
        objective.set_progress(epoch)  # w(t): KD and CRCD on until 96% of training, then CE alone
        start = time.time()
        losses = train_one_epoch(objective, optimizer, train_loader, device, args.max_steps)
        scheduler.step()
        accuracy = evaluate(model, test_loader, device)
        best = max(best, accuracy)
        shown = " ".join(f"{k}={v:.4f}" for k, v in losses.items())
        print(f"epoch {epoch + 1}/{recipe.epochs} {shown} top1={accuracy:.2f} best={best:.2f} "
              f"lr={optimizer.param_groups[0]['lr']:.4g} ({time.time() - start:.1f}s)")
        # The student's weights alone, so a student checkpoint loads into a bare model (or
        # serves as a teacher); the distiller's heads, memory and schedule are saved beside them.
        state: Dict[str, Any] = {"arch": model_name, "model": model.state_dict(),
                                 "epoch": epoch + 1, "accuracy": accuracy,
                                 "recipe": dataclasses.asdict(recipe)}
        if args.mode == "distill":
            state["distiller"] = objective.crcd_state_dict()
        torch.save(state, checkpoint_path)
    summary = {"mode": args.mode, "model": model_name, "losses": losses,
               "final_top1": accuracy, "best_top1": best, "checkpoint": checkpoint_path}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()

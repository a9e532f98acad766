"""Training loops of the demo: the teacher once (cached on disk), then each student method.

Students train through ``CRCDDistiller``, the path a user's loop takes. The teacher is frozen, so
its penultimate features over the training set are computed once and stand behind its own
classifier (``_PrecomputedTeacher``): the distiller's hooks see exactly what a live teacher gives,
and a student step pays for the student and the loss terms only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from crcd_plugin.config import CRCDConfig
from crcd_plugin.demo.data import DataConfig, Dataset, augment
from crcd_plugin.demo.models import StudentMLP, Teacher, build_teacher
from crcd_plugin.teacher import TensorTeacher

logger = logging.getLogger(__name__)

METHODS = ("ce", "kd", "crd", "crcd", "crcd_grad")


@dataclass(frozen=True)
class TeacherConfig:
    """Teacher architecture and training recipe (part of the teacher cache key).

    Args:
        arch: Teacher architecture, one of ``models.TEACHER_ARCHS``.
        epochs: Training epochs.
        batch_size: Mini-batch size.
        lr: Peak learning rate of the one-cycle schedule (AdamW).
        weight_decay: AdamW weight decay.
    """

    arch: str = "strided"
    epochs: int = 30
    batch_size: int = 100
    lr: float = 1e-2
    weight_decay: float = 1e-4


@dataclass(frozen=True)
class TrainConfig:
    """What every student method shares: architecture, data budget and optimiser.

    Args:
        hidden: Hidden widths of the student MLP.
        epochs: Training epochs.
        batch_size: Mini-batch size.
        lr: Peak learning rate (AdamW, cosine decay to zero).
        weight_decay: AdamW weight decay.
        augment: Train on a fresh random view of every batch (:func:`~crcd_plugin.demo.data.augment`);
            the teacher then runs live on each view, unless the run distils from a teacher cache,
            which holds one fixed (un-augmented) view per sample.
    """

    hidden: tuple[int, ...] = (100, 100)
    epochs: int = 30
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    augment: bool = False


@dataclass
class RunResult:
    """Outcome of one student (or teacher) run."""

    method: str
    seed: int
    acc: float
    curve: list[float] = field(default_factory=list)
    epoch_times: list[float] = field(default_factory=list)

    @property
    def time_per_epoch(self) -> float:
        """Median epoch time in seconds (robust to other load on the machine)."""
        ts = sorted(self.epoch_times)
        return ts[len(ts) // 2] if ts else float("nan")


@dataclass
class TeacherOutputs:
    """Frozen teacher outputs over the training set, computed once.

    Shape:
        logits [N, C], features [N, Dt]; ``head`` maps ``[B, Dt] -> [B, C]``.
    """

    logits: torch.Tensor
    features: torch.Tensor
    head: nn.Linear
    acc: float
    arch: str
    model: Optional[nn.Module] = None  # the frozen teacher itself, for runs that need it live


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` in eval mode."""
    was_training = model.training
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was_training)
    return acc


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=generator)
    # Drop a last batch under half size (the relation loss wants a few anchors), but keep at least one.
    return [perm[i : i + batch_size] for i in range(0, max(n - batch_size // 2, 1), batch_size)]


def train_teacher(
    data: Dataset,
    data_cfg: DataConfig,
    cfg: TeacherConfig = TeacherConfig(),
    seed: int = 0,
    cache_dir: Optional[Path] = None,
    progress: bool = True,
    tag: str = "",
) -> tuple[Teacher, float]:
    """Train the teacher ``cfg.arch``, or load it from ``cache_dir`` (keyed by data config, recipe, seed).

    Args:
        data: Dataset to train on (its train split) and score on (its test split).
        data_cfg: The dataset's config (part of the cache key).
        cfg: Teacher recipe.
        seed: Seed of initialisation and data order.
        cache_dir: Folder of cached teachers; ``None`` disables caching.
        progress: Show a progress bar.
        tag: Extra cache-key text for derived datasets (e.g. the tuning run's train/val split).

    Returns:
        The teacher in eval mode and its accuracy on ``data``'s test split.
    """
    torch.manual_seed(seed)
    teacher = build_teacher(cfg.arch, data.input_dim, data.num_classes, data_cfg.name)
    recipe = {"data": asdict(data_cfg), "recipe": asdict(cfg), "seed": seed, "arch": teacher.arch, "tag": tag}
    blob = json.dumps(recipe, sort_keys=True)
    key = f"teacher-{data_cfg.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"
    path = None if cache_dir is None else Path(cache_dir) / f"{key}.pt"
    if path is not None and path.exists():
        teacher.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        logger.info("teacher loaded from %s", path)
    else:
        from tqdm.auto import tqdm

        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(teacher.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = cfg.epochs * len(_batches(len(data.y_train), cfg.batch_size, torch.Generator()))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
        teacher.train()
        for _ in tqdm(range(cfg.epochs), desc="teacher", disable=not progress, leave=False):
            for idx in _batches(len(data.y_train), cfg.batch_size, gen):
                loss = F.cross_entropy(teacher(data.x_train[idx]), data.y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(teacher.state_dict(), path)
            logger.info("teacher cached at %s", path)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, accuracy(teacher, data.x_test, data.y_test)


@torch.no_grad()
def teacher_outputs(teacher: Teacher, data: Dataset, acc: float) -> TeacherOutputs:
    """Precompute the frozen teacher's logits and penultimate features over the training set."""
    feats = teacher.features(data.x_train)
    head = nn.Linear(teacher.fc.in_features, teacher.fc.out_features)
    head.load_state_dict(teacher.fc.state_dict())
    head.requires_grad_(False)
    return TeacherOutputs(
        logits=head(feats), features=feats, head=head, acc=acc, arch=str(teacher.arch), model=teacher
    )


def _teacher_for(teacher: TeacherOutputs, train: TrainConfig, source: Optional[Any]) -> tuple[Any, Optional[str]]:
    """What stands in the teacher's place in the distiller, and its classifier's path (``None``: its own).

    ``source`` (a :class:`~crcd_plugin.TeacherCache`) wins; otherwise the precomputed features as a
    :class:`~crcd_plugin.teacher.TensorTeacher` (in eval mode the teacher is deterministic, so
    ``head(features[index])`` is exactly its forward on un-augmented batches, and a step pays for
    the student and the losses only), or the live teacher when every batch is a new random view.
    """
    if source is not None:
        return source, None
    if train.augment:
        if teacher.model is None:
            raise ValueError("augmented training needs the teacher model live (TeacherOutputs.model is None)")
        return teacher.model, "fc"
    return TensorTeacher(teacher.features, teacher.head), None


def method_config(method: str, base: CRCDConfig) -> Optional[CRCDConfig]:
    """The ``CRCDConfig`` a method trains with, from the run's ``base`` (the library's defaults unless
    the demo says otherwise): KD alone, CRD (no anchors), CRCD, CRCD + gradient element; ``None``
    for CE (no distiller at all)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "ce":
        return None
    if method == "kd":
        return base.replace(feature_weight=0.0, gradient_element=False)
    if method == "crd":
        return base.replace(relation=base.relation.replace(anchored=False), gradient_element=False)
    return base.replace(gradient_element=method == "crcd_grad")


def train_student(
    method: str,
    data: Dataset,
    teacher: Optional[TeacherOutputs],
    train: TrainConfig,
    config: CRCDConfig,
    seed: int,
    on_epoch: Optional[Callable[[int, float], None]] = None,
    num_samples: bool = False,
    teacher_source: Optional[Any] = None,
) -> RunResult:
    """Train one student with ``method`` through ``CRCDDistiller`` (CE alone: a plain loop).

    For a given ``seed`` the student initialisation and the data order are identical across
    methods (separate generators; the CRCD heads are seeded separately).

    Args:
        method: One of ``METHODS``.
        data: Dataset; ``x_test``/``y_test`` is the split that is scored.
        teacher: Precomputed teacher outputs (``None`` only for ``ce``).
        train: Shared training settings.
        config: The distillation settings of the run (see :func:`method_config`).
        seed: Seed of initialisation and data order.
        on_epoch: Called with ``(epoch, accuracy)`` after each epoch (progress bars).
        num_samples: Give the distiller the dataset size, so that the memory bank serves the
            negatives (otherwise what ``config`` resolves without an index).
        teacher_source: A :class:`~crcd_plugin.TeacherCache` of the teacher over the training set
            to distil from instead of the teacher (see :func:`_teacher_for` for the default).

    Returns:
        The run's final accuracy, curve and epoch times.
    """
    from crcd_plugin import CRCDDistiller

    method_cfg = method_config(method, config)
    if method_cfg is not None and teacher is None:
        raise ValueError(f"method {method!r} needs teacher outputs")
    torch.manual_seed(seed)
    student = StudentMLP(data.input_dim, train.hidden, data.num_classes)
    order = torch.Generator().manual_seed(seed)
    distiller = None
    params = list(student.parameters())
    if method_cfg is not None:
        assert teacher is not None
        torch.manual_seed(seed + 7919)
        teacher_module, teacher_classifier = _teacher_for(teacher, train, teacher_source)
        distiller = CRCDDistiller(
            student, teacher_module, "fc", teacher_classifier, config=method_cfg,
            num_samples=len(data.y_train) if num_samples else None,
        )
        params = [p for p in distiller.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    steps_per_epoch = len(_batches(len(data.y_train), train.batch_size, torch.Generator()))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=train.epochs * steps_per_epoch)

    result = RunResult(method=method, seed=seed, acc=float("nan"))
    x_all, y_all = data.x_train, data.y_train
    views = torch.Generator().manual_seed(seed + 104729)  # the same random views for every method
    for epoch in range(train.epochs):
        if distiller is not None:
            distiller.train()
            distiller.set_progress(epoch)
        student.train()
        start = time.perf_counter()
        for idx in _batches(len(y_all), train.batch_size, order):
            x, y = x_all[idx], y_all[idx]
            if train.augment:
                x = augment(x, views)
            if distiller is None:
                loss = F.cross_entropy(student(x), y)
            else:
                loss = distiller(x, y, idx)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        result.epoch_times.append(time.perf_counter() - start)
        acc = accuracy(student, data.x_test, data.y_test)
        result.curve.append(acc)
        if on_epoch is not None:
            on_epoch(epoch, acc)
    result.acc = result.curve[-1]
    return result

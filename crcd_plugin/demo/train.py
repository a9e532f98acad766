"""Training loops of the demo: the teacher once (cached on disk), then each student method.

Students train on precomputed teacher outputs: the teacher is frozen, so its logits and
penultimate features over the training set are computed once, and a student step costs only the
student and the loss terms. The loss terms are the library's own pieces, ``functional.kd_loss``,
``CRCDLoss`` and ``gradients`` (what ``CRCDDistiller`` combines), used directly on the precomputed
teacher outputs so that no step pays for a teacher forward.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from crcd_plugin.demo.data import DataConfig, Dataset
from crcd_plugin.demo.models import StudentMLP, Teacher, build_teacher
from crcd_plugin.functional import kd_loss

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
    """

    hidden: tuple[int, ...] = (100, 100)
    epochs: int = 30
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4


@dataclass(frozen=True)
class MethodSettings:
    """Loss settings of one method; which fields matter depends on the method.

    Args:
        gamma: Weight of the cross-entropy term (every method but ``ce``, where it is 1).
        alpha: Weight of the KD term (``kd`` and every relational method).
        kd_temperature: KD softmax temperature.
        beta: Weight of the relation term on features (CRD or CRCD).
        beta_grad: Weight of the relation term on gradients (``crcd_grad`` only).
        distill_until: Fraction of training with the distillation terms on; afterwards CE alone
            (the paper's ``w(t)`` schedule; 1.0 keeps them on throughout).
        temperature: Relation-loss temperature ``tau``.
        embed_dim: Embedding size ``d`` of the relation heads.
        negatives: Where negatives come from: ``"bank"`` (one memory row per training sample),
            ``"queue"`` (the last ``queue_size`` embeddings) or ``"batch"`` (the other samples).
        num_negatives: Negatives ``K`` per sample: drawn from the bank, or a random subset of the
            queue (``K >= queue_size`` takes the whole queue); ignored with ``"batch"``.
        num_anchors: Anchors ``A`` per batch (``None``: the whole batch; ignored by CRD).
        objective: ``"nce"`` or ``"infonce"``.
        momentum: Memory-bank momentum.
        memory_init: Memory bank's start, ``"first_write"`` (rows right from their first write)
            or ``"cold"`` (the reference: random rows, blended into by the first write).
        symmetric: Add the teacher-side relation loss (``CRCDLoss(symmetric=...)``).
        queue_size: Queue length for ``negatives="queue"``.
        share_negatives: Bank: draw the ``K`` negatives once per step for the whole batch
            (``CRCDLoss(share_negatives=True)``, the shared-candidate kernels) instead of per sample.
    """

    gamma: float = 1.0
    alpha: float = 1.0
    kd_temperature: float = 4.0
    beta: float = 0.5
    beta_grad: float = 0.5
    distill_until: float = 1.0
    temperature: float = 0.1
    embed_dim: int = 64
    num_negatives: int = 256
    num_anchors: Optional[int] = 8
    objective: str = "infonce"
    momentum: float = 0.5
    negatives: str = "bank"
    memory_init: str = "first_write"
    symmetric: bool = True
    queue_size: int = 1024
    share_negatives: bool = False


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
        logits [N, C], features [N, Dt]; ``head_weight`` [C, Dt].
    """

    logits: torch.Tensor
    features: torch.Tensor
    head_weight: torch.Tensor
    acc: float
    arch: str


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
    return TeacherOutputs(
        logits=teacher.fc(feats),
        features=feats,
        head_weight=teacher.fc.weight.detach().clone(),
        acc=acc,
        arch=str(teacher.arch),
    )


def _relation_loss(
    student_dim: int, teacher_dim: int, num_samples: int, cfg: MethodSettings, anchored: bool
) -> nn.Module:
    from crcd_plugin.loss import CRCDLoss

    negatives: dict = {"negatives": cfg.negatives}
    if cfg.negatives == "bank":
        negatives.update(num_samples=num_samples, num_negatives=cfg.num_negatives, momentum=cfg.momentum)
        negatives.update(memory_init=cfg.memory_init, share_negatives=cfg.share_negatives)
    elif cfg.negatives == "queue":
        subset = cfg.num_negatives if cfg.num_negatives < cfg.queue_size else None
        negatives.update(queue_size=cfg.queue_size, num_negatives=subset)
    # The demo's inputs are known valid (indices from a permutation of the training set, finite
    # features from a small MLP and a frozen teacher), so the per-call value checks, which cost a
    # host sync and a dozen small ops per call, are off: the loss and the updates are the same.
    return CRCDLoss(
        student_dim,
        teacher_dim,
        embed_dim=cfg.embed_dim,
        num_anchors=cfg.num_anchors if anchored else None,
        temperature=cfg.temperature,
        objective=cfg.objective,  # type: ignore[arg-type]  # checked by CRCDLoss
        symmetric=cfg.symmetric,
        anchored=anchored,
        on_nonfinite="skip",
        check_index=False,
        **negatives,
    )


def train_student(
    method: str,
    data: Dataset,
    teacher: Optional[TeacherOutputs],
    train: TrainConfig,
    settings: MethodSettings,
    seed: int,
    on_epoch: Optional[Callable[[int, float], None]] = None,
) -> RunResult:
    """Train one student with ``method`` and return its per-epoch test-accuracy curve.

    For a given ``seed`` the student initialisation and the data order are identical across
    methods (separate generators; the loss modules are seeded separately).

    Args:
        method: One of ``METHODS``.
        data: Dataset; ``x_test``/``y_test`` is the split that is scored (validation when tuning).
        teacher: Precomputed teacher outputs (``None`` only for ``ce``).
        train: Shared training settings.
        settings: The method's loss settings.
        seed: Seed of initialisation and data order.
        on_epoch: Called with ``(epoch, accuracy)`` after each epoch (progress bars).

    Returns:
        The run's final accuracy, curve and epoch times.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "ce" and teacher is None:
        raise ValueError(f"method {method!r} needs teacher outputs")
    torch.manual_seed(seed)
    student = StudentMLP(data.input_dim, train.hidden, data.num_classes)
    order = torch.Generator().manual_seed(seed)

    relations: dict[str, nn.Module] = {}
    if teacher is not None and method in ("crd", "crcd", "crcd_grad"):
        torch.manual_seed(seed + 7919)
        n, dt = len(data.y_train), teacher.features.shape[1]
        relations["feature"] = _relation_loss(student.feat_dim, dt, n, settings, anchored=method != "crd")
        if method == "crcd_grad":
            relations["gradient"] = _relation_loss(student.feat_dim, dt, n, settings, anchored=True)
    params = list(student.parameters()) + [p for m in relations.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    steps_per_epoch = len(_batches(len(data.y_train), train.batch_size, torch.Generator()))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=train.epochs * steps_per_epoch)
    distill_epochs = math.ceil(settings.distill_until * train.epochs)

    if method == "crcd_grad":
        from crcd_plugin.gradients import linear_cross_entropy_feature_grad, student_gradient_element

    result = RunResult(method=method, seed=seed, acc=float("nan"))
    x_all, y_all = data.x_train, data.y_train
    for epoch in range(train.epochs):
        distill = epoch < distill_epochs
        student.train()
        for m in relations.values():
            m.train()
        start = time.perf_counter()
        for idx in _batches(len(y_all), train.batch_size, order):
            x, y = x_all[idx], y_all[idx]
            feat = student.features(x)
            logits = student.fc(feat)
            loss = F.cross_entropy(logits, y)
            if teacher is not None and method != "ce" and distill:
                kd = kd_loss(logits, teacher.logits[idx], settings.kd_temperature)
                loss = settings.gamma * loss + settings.alpha * kd
                if "feature" in relations:
                    loss = loss + settings.beta * relations["feature"](feat, teacher.features[idx], index=idx)
                if "gradient" in relations:
                    g_s = student_gradient_element(student.fc, feat, y, logits=logits)
                    g_t = linear_cross_entropy_feature_grad(teacher.logits[idx], teacher.head_weight, y)
                    loss = loss + settings.beta_grad * relations["gradient"](g_s, g_t, index=idx)
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

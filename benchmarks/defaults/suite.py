"""The defaults suite (v2): teacher/student/data settings and one training run.

Every setting is offline and CPU-sized: MNIST-1D (generated, several generation settings, two of
them with 10k+ training samples and a BatchNorm CNN student) and scikit-learn's bundled digits,
each split into train / validation / test. Teachers are trained once per setting and cached;
students train with SGD (momentum 0.9, cosine) at two learning rates per setting: CE's best on
validation and one about 3.3x lower. A run is one student, one seed, one learning rate and one
method: an external anchor written here from its paper, independent of the library (``ce``,
``kd``: Hinton / RepDistiller KD, ``lskd``: logit-standardised KD of Sun et al., CVPR 2024), or a
``CRCDConfig`` run through ``CRCDDistiller`` (CRD is one: ``relation.anchored=False``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crcd_plugin import CRCDDistiller
from crcd_plugin.config import CRCDConfig

CACHE = Path(__file__).resolve().parent / ".cache"


@dataclass(frozen=True)
class Setting:
    """One teacher/student/data combination of the suite."""

    name: str
    data: str  # "digits" or "mnist1d"
    teacher: str  # see build_model
    student: str
    epochs: int
    num_train: int = 0  # mnist1d: generated sizes (train / val / test); digits: 60/20/20 of 1797
    num_val: int = 0
    num_test: int = 0
    mnist1d: Tuple[Tuple[str, Any], ...] = ()  # overrides of mnist1d's generation arguments
    batch_size: int = 64

    def key(self) -> str:
        """Hash of what fixes the data and the teacher (not the student's budget)."""
        fields = {k: v for k, v in asdict(self).items() if k not in ("student", "epochs", "batch_size")}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


SETTINGS: Tuple[Setting, ...] = (
    # The new-user report: a small CNN teacher and a 64-8-10 MLP on digits.
    Setting("digits-cnn-mlp8", "digits", "cnn_pool8", "mlp:8", epochs=20),
    Setting("digits-mlp-mlp32", "digits", "mlp:256-256", "mlp:32", epochs=20),
    Setting("m1d-strided-mlp", "mnist1d", "strided:32", "mlp:64-64", epochs=15,
            num_train=3000, num_val=1000, num_test=1000),
    Setting("m1d-noisy-maxpool-cnn", "mnist1d", "cnn_pool1", "cnn:8", epochs=15,
            num_train=3000, num_val=1000, num_test=1000,
            mnist1d=(("corr_noise_scale", 0.4), ("iid_noise_scale", 0.05))),
    Setting("m1d-shift-wide-cnn", "mnist1d", "strided:64", "cnn:8", epochs=15,
            num_train=3000, num_val=1000, num_test=1000,
            mnist1d=(("max_translation", 24), ("shear_scale", 0.5), ("final_seq_length", 60))),
    Setting("m1d-small-mlp", "mnist1d", "strided:32", "mlp:32", epochs=20,
            num_train=1200, num_val=600, num_test=1000, mnist1d=(("scale_coeff", 0.6),)),
    # BatchNorm CNN students on 10k+ generated samples (v2).
    Setting("m1d-10k-bncnn", "mnist1d", "strided:64", "bncnn:16", epochs=8,
            num_train=10000, num_val=2000, num_test=2000),
    Setting("m1d-12k-shift-bncnn", "mnist1d", "strided:64", "bncnn:8", epochs=8,
            num_train=12000, num_val=2000, num_test=2000,
            mnist1d=(("max_translation", 24), ("corr_noise_scale", 0.3), ("final_seq_length", 60))),
)
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data(setting: Setting) -> Data:
    """The setting's three splits (cached on disk)."""
    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"data-{setting.data}-{setting.key()}.npz"
    if not path.exists():
        if setting.data == "digits":
            from sklearn.datasets import load_digits

            x, y = load_digits(return_X_y=True)
            perm = np.random.default_rng(0).permutation(len(y))
            x, y = x[perm], y[perm]
            n_tr, n_val = int(0.6 * len(y)), int(0.2 * len(y))
            x = (x - x[:n_tr].mean()) / x[:n_tr].std()
            splits = (x[:n_tr], y[:n_tr], x[n_tr:n_tr + n_val], y[n_tr:n_tr + n_val],
                      x[n_tr + n_val:], y[n_tr + n_val:])
        else:
            from mnist1d.data import get_dataset_args, make_dataset

            args = get_dataset_args()
            for name, value in setting.mnist1d:
                setattr(args, name, value)
            total = setting.num_train + setting.num_val + setting.num_test
            args.num_samples = int(math.ceil(total / 10) * 10)
            args.train_split = (setting.num_train + setting.num_val) / args.num_samples
            args.seed = 42
            raw = make_dataset(args)
            x, y = raw["x"], raw["y"]
            n_tr = setting.num_train
            splits = (x[:n_tr], y[:n_tr], x[n_tr:], y[n_tr:], raw["x_test"][: setting.num_test],
                      raw["y_test"][: setting.num_test])
        np.savez(path, *splits)
    arrays = np.load(path)
    tensors = [torch.as_tensor(arrays[f"arr_{i}"]) for i in range(6)]
    xs = [t.float() for t in tensors[0::2]]
    ys = [t.long() for t in tensors[1::2]]
    return Data(xs[0], ys[0], xs[1], ys[1], xs[2], ys[2])


class MLP(nn.Module):
    def __init__(self, input_dim: int, hidden: Sequence[int], num_classes: int = 10) -> None:
        super().__init__()
        layers, width = [], input_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class CNN1d(nn.Module):
    """1-D CNN: ``pool=1`` global max pooling + FC feature; ``pool=8`` keeps 8 positions;
    ``strided`` flattens the last strided map (no pooling)."""

    def __init__(self, input_dim: int, channels: int, kind: str, num_classes: int = 10) -> None:
        super().__init__()
        if kind == "strided":
            layers, length = [], input_dim
            for i in range(3):
                layers += [nn.Conv1d(1 if i == 0 else channels, channels, 5, stride=2, padding=2), nn.ReLU()]
                length = (length + 1) // 2
            self.body = nn.Sequential(*layers, nn.Flatten())
            width = channels * length
        else:
            pool = int(kind)
            self.body = nn.Sequential(
                nn.Conv1d(1, channels, 5, padding=2), nn.ReLU(),
                nn.Conv1d(channels, 2 * channels, 3, padding=1), nn.ReLU(),
                nn.AdaptiveMaxPool1d(pool), nn.Flatten(),
                nn.Linear(2 * channels * pool, 64), nn.ReLU(),
            )
            width = 64
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x.unsqueeze(1)))


class BNCNN1d(nn.Module):
    """A BatchNorm student: two strided conv-BN-ReLU blocks, global average pooling, ``fc``."""

    def __init__(self, channels: int, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=2), nn.BatchNorm1d(channels), nn.ReLU(),
            nn.Conv1d(channels, 2 * channels, 3, stride=2, padding=1), nn.BatchNorm1d(2 * channels), nn.ReLU(),
            nn.Conv1d(2 * channels, 2 * channels, 3, stride=2, padding=1), nn.BatchNorm1d(2 * channels), nn.ReLU(),
            nn.AdaptiveAvgPool1d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(2 * channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x.unsqueeze(1)))


def build_model(spec: str, input_dim: int) -> nn.Module:
    """``mlp:H1-H2``, ``cnn:C`` (a small strided student CNN), ``bncnn:C`` (BatchNorm student),
    ``strided:C``, ``cnn_poolP``."""
    kind, _, arg = spec.partition(":")
    if kind == "bncnn":
        return BNCNN1d(int(arg))
    if kind == "mlp":
        return MLP(input_dim, [int(h) for h in arg.split("-")])
    if kind == "cnn":
        return CNN1d(input_dim, int(arg), "strided")
    if kind == "strided":
        return CNN1d(input_dim, int(arg), "strided")
    if kind.startswith("cnn_pool"):
        return CNN1d(input_dim, 32, kind[len("cnn_pool"):])
    raise ValueError(f"unknown model spec {spec!r}")


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(-1) == y).float().mean())


class Student(nn.Module):
    """The student behind a keyword interface, so that a batch can carry its dataset index."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.model(x)


class CachedTeacher(nn.Module):
    """The frozen teacher's features over the training set, computed once, behind its own ``fc``.

    In eval mode the teacher is deterministic, so ``fc(features[index])`` is exactly what a live
    forward of the same samples gives, and the distiller's hooks on ``fc`` see the same feature and
    logits; a search step then pays for the student and the losses only.
    """

    def __init__(self, teacher: nn.Module, x_train: torch.Tensor) -> None:
        super().__init__()
        captured = []
        handle = teacher.fc.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        with torch.no_grad():
            teacher(x_train)
        handle.remove()
        self.register_buffer("features", captured[0])
        self.fc = teacher.fc

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features[index])


def load_teacher(setting: Setting, data: Data) -> nn.Module:
    """The setting's teacher, trained once (AdamW, one-cycle, 30 epochs) and cached."""
    path = CACHE / f"teacher-{setting.key()}.pt"
    torch.manual_seed(1234)
    teacher = build_model(setting.teacher, data.x_train.shape[1])
    if path.exists():
        teacher.load_state_dict(torch.load(path))
        return teacher.eval()
    epochs, batch = 30, 64
    steps = epochs * math.ceil(len(data.y_train) / batch)
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-2, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        teacher.train()
        for idx in torch.randperm(len(data.y_train), generator=gen).split(batch):
            loss = F.cross_entropy(teacher(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    torch.save(teacher.state_dict(), path)
    return teacher.eval()


@dataclass
class RunSpec:
    """One student run: ``anchor`` (``"ce"``, ``"kd"``, ``"lskd"``) or a ``config`` (through
    ``CRCDDistiller``); ``bank`` passes ``num_samples`` and indices."""

    setting: str
    seed: int
    lr: float
    split: str = "val"  # "val" (choices) or "test" (reporting)
    config: Optional[Dict[str, Any]] = None  # CRCDConfig fields; "relation" a dict of RelationConfig fields
    anchor: Optional[str] = None
    bank: bool = False
    tag: str = ""

    def key(self) -> str:
        blob = {k: v for k, v in asdict(self).items() if k != "tag"}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class RunResult:
    key: str
    tag: str
    setting: str
    seed: int
    lr: float
    split: str
    acc: float
    epoch_time: float  # median seconds per training epoch
    max_loss: float
    diverged: bool
    final: Dict[str, float] = field(default_factory=dict)  # last epoch's mean of each loss component


# Every field a candidate leaves out takes this value, whatever the library's defaults are when the
# suite runs: a run's cache key (its candidate dict) then always means the same run.
BASE = {"task_weight": 1.0, "kd_weight": 0.0, "kd_temperature": 4.0, "kd_standardize": False, "feature_weight": 0.0,
        "gradient_element": False, "gradient_weight": 0.3, "gradient_normalization": "batch", "schedule": "constant"}
BASE_RELATION = {"embed_dim": 64, "temperature": 0.1, "num_anchors": 2, "symmetric": False, "negatives": "batch",
                 "objective": "infonce"}


def make_config(fields: Dict[str, Any]) -> CRCDConfig:
    from crcd_plugin.config import RelationConfig

    fields = dict(fields)
    relation = RelationConfig(**dict(BASE_RELATION, **fields.pop("relation", {})))
    return CRCDConfig(relation=relation, **dict(BASE, **fields))


def make_distiller(student: nn.Module, teacher: nn.Module, config: CRCDConfig, num_samples: Optional[int]):
    """``CRCDDistiller`` for ``config``: the student behind :class:`Student`, the cached teacher."""
    return CRCDDistiller(student, teacher, "model.fc", "fc", config=config, num_samples=num_samples)


def _standardize(z: torch.Tensor) -> torch.Tensor:
    return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-7)


def _kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p_s = F.log_softmax(student / temperature, dim=-1)
    p_t = F.softmax(teacher / temperature, dim=-1)
    return F.kl_div(log_p_s, p_t, reduction="none").sum(1).mean() * temperature**2


def anchor_loss(
    name: str, logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """The external anchors, as their papers' code writes them (not through the library)."""
    ce = F.cross_entropy(logits, y)
    if name == "ce":
        return {"loss": ce}
    if name == "kd":  # Hinton KD as RepDistiller / mdistiller run it: 0.1 CE + 0.9 KL(T = 4) * T^2
        kd = _kl(logits, teacher_logits, 4.0)
        return {"loss": 0.1 * ce + 0.9 * kd, "task_loss": ce, "kd_loss": kd}
    if name == "lskd":  # Sun et al. (CVPR 2024), their CIFAR-100 KD runs: 0.1 CE + 9 KL(z-scored, T = 2) * T^2
        kd = _kl(_standardize(logits), _standardize(teacher_logits), 2.0)
        return {"loss": 0.1 * ce + 9.0 * kd, "task_loss": ce, "kd_loss": kd}
    raise ValueError(f"unknown anchor {name!r}")


def run(spec: RunSpec) -> RunResult:
    """Train one student and evaluate it on ``spec.split``."""
    torch.set_num_threads(1)
    setting = SETTINGS_BY_NAME[spec.setting]
    data = load_data(setting)
    teacher = load_teacher(setting, data)
    torch.manual_seed(spec.seed)
    student = build_model(setting.student, data.x_train.shape[1])
    wrapped, cached = Student(student), CachedTeacher(teacher, data.x_train)
    n = len(data.y_train)
    distiller = None
    if spec.config is not None:
        distiller = make_distiller(wrapped, cached, make_config(spec.config), n if spec.bank else None)
        params = list(distiller.parameters())
    else:
        params = list(student.parameters())
        with torch.no_grad():
            teacher_logits = cached.fc(cached.features)
    params = [p for p in params if p.requires_grad]
    steps_per_epoch = math.ceil(n / setting.batch_size)
    opt = torch.optim.SGD(params, lr=spec.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, setting.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(spec.seed)  # the batch order: the same for every method
    times, max_loss, diverged, final = [], 0.0, False, {}
    for _ in range(setting.epochs):
        (distiller or student).train()
        sums: Dict[str, float] = {}
        start = time.perf_counter()
        for idx in torch.randperm(n, generator=gen).split(setting.batch_size):
            x, y = data.x_train[idx], data.y_train[idx]
            if distiller is None:
                parts = anchor_loss(spec.anchor or "ce", student(x), teacher_logits[idx], y)
            else:
                parts = distiller({"x": x, "index": idx}, y, idx if spec.bank else None)
            loss = parts["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for name, value in parts.items():
                if name != "logits":
                    sums[name] = sums.get(name, 0.0) + float(value.detach())
        times.append(time.perf_counter() - start)
        final = {name: total / steps_per_epoch for name, total in sums.items()}
        max_loss = max(max_loss, final["loss"])
        if not math.isfinite(final["loss"]):
            diverged = True
            break
    x_eval, y_eval = (data.x_val, data.y_val) if spec.split == "val" else (data.x_test, data.y_test)
    acc = accuracy(student, x_eval, y_eval) if not diverged else 0.0
    # A run whose accuracy falls to chance while CE-level training is possible has diverged too
    # (the loss can stay finite while the weights blow up); run.py flags those against CE.
    return RunResult(spec.key(), spec.tag, spec.setting, spec.seed, spec.lr, spec.split, acc,
                     float(np.median(times)), max_loss, diverged, final)

"""Offline datasets for the demo: MNIST-1D built procedurally, or scikit-learn's bundled digits.

Nothing here touches the network. Generated arrays are cached on disk, keyed by their config.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

logger = logging.getLogger(__name__)

DATASETS = ("mnist1d", "digits")


@dataclass(frozen=True)
class DataConfig:
    """What defines a dataset instance; its hash keys the on-disk caches.

    Args:
        name: ``"mnist1d"`` (procedural, 40-long signals) or ``"digits"`` (8x8 images, flattened).
        num_train: Training samples (the validation split is carved from these).
        num_test: Test samples, never used for any choice of settings.
        seed: Seed of the generator (MNIST-1D) or of the train/test split (digits).
    """

    name: str = "mnist1d"
    num_train: int = 4000
    num_test: int = 1000
    seed: int = 42

    def key(self) -> str:
        """Short stable hash of the config, used in cache file names."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


@dataclass
class Dataset:
    """Tensors of one dataset instance.

    Shape:
        x_train: [N, L] float32, y_train: [N] int64, x_test: [M, L], y_test: [M].
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_dim(self) -> int:
        """Length of one input vector."""
        return int(self.x_train.shape[1])


def augment(x: torch.Tensor, generator: torch.Generator, shift: int = 2, noise: float = 0.1) -> torch.Tensor:
    """One random view of a batch of signals ``[B, L]``: each row circularly shifted by up to
    ``shift`` positions either way, plus Gaussian noise of std ``noise`` (inputs have std ~1).

    MNIST-1D's own generator already shifts and corrupts its templates, so these are views of the
    kind the data set varies by; on digits' flattened 8x8 images the shift moves pixels along rows.
    """
    rows = torch.arange(x.shape[0]).unsqueeze(1)
    offsets = torch.randint(-shift, shift + 1, (x.shape[0], 1), generator=generator)
    columns = (torch.arange(x.shape[1]).unsqueeze(0) - offsets) % x.shape[1]
    return x[rows, columns] + noise * torch.randn(x.shape, generator=generator)


def _make_mnist1d(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # Only the procedural generator is used; get_dataset() would download a pickle.
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    total = cfg.num_train + cfg.num_test
    # make_dataset draws num_samples // 10 per class; ask for a multiple of 10 and cut after.
    args.num_samples = int(np.ceil(total / 10) * 10)
    args.train_split = cfg.num_train / args.num_samples
    args.seed = cfg.seed
    raw = make_dataset(args)
    return raw["x"], raw["y"], raw["x_test"][: cfg.num_test], raw["y_test"][: cfg.num_test]


def _make_digits(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    if cfg.num_train + cfg.num_test > len(y):
        raise ValueError(
            f"digits has {len(y)} samples; num_train + num_test = {cfg.num_train + cfg.num_test} is too many"
        )
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, train_size=cfg.num_train, test_size=cfg.num_test, stratify=y, random_state=cfg.seed
    )
    mean, std = x_tr.mean(), x_tr.std()
    return (x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te


def load_dataset(cfg: DataConfig, cache_dir: Optional[Path] = None) -> Dataset:
    """Build (or read from cache) the dataset described by ``cfg``.

    Args:
        cfg: Dataset description.
        cache_dir: Folder for the ``.npz`` cache; ``None`` disables caching.

    Returns:
        The dataset as float32/int64 tensors.

    Raises:
        ValueError: On an unknown dataset name or impossible sizes.
    """
    if cfg.name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {cfg.name!r}")
    if cfg.num_train < 10 or cfg.num_test < 10:
        raise ValueError(f"need at least 10 train and 10 test samples, got {cfg.num_train} and {cfg.num_test}")
    path = None if cache_dir is None else Path(cache_dir) / f"data-{cfg.name}-{cfg.key()}.npz"
    if path is not None and path.exists():
        logger.info("dataset read from cache %s", path)
        arrays = np.load(path)
        x_tr, y_tr, x_te, y_te = (arrays[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    else:
        maker = _make_mnist1d if cfg.name == "mnist1d" else _make_digits
        x_tr, y_tr, x_te, y_te = maker(cfg)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
            logger.info("dataset cached at %s", path)
    return Dataset(
        x_train=torch.as_tensor(x_tr, dtype=torch.float32),
        y_train=torch.as_tensor(y_tr, dtype=torch.int64),
        x_test=torch.as_tensor(x_te, dtype=torch.float32),
        y_test=torch.as_tensor(y_te, dtype=torch.int64),
        num_classes=10,
    )


def split_validation(data: Dataset, fraction: float, seed: int = 0) -> Dataset:
    """Carve a validation split out of the training data; it takes the place of the test split.

    Used by the tuning run so that no setting is ever chosen on test data.

    Args:
        data: The full dataset.
        fraction: Share of the training samples moved to validation, in (0, 1).
        seed: Seed of the split.

    Returns:
        A dataset whose ``x_test``/``y_test`` are the validation samples.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must lie in (0, 1), got {fraction}")
    n = len(data.y_train)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * fraction))
    val, tr = perm[:n_val], perm[n_val:]
    return Dataset(data.x_train[tr], data.y_train[tr], data.x_train[val], data.y_train[val], data.num_classes)

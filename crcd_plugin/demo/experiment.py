"""One demo experiment: dataset -> cached teacher -> every student method over several seeds -> summary."""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from crcd_plugin.config import CRCDConfig
from crcd_plugin.demo.data import DataConfig, Dataset, load_dataset, split_validation
from crcd_plugin.demo.train import (
    RunResult,
    TeacherConfig,
    TeacherOutputs,
    TrainConfig,
    teacher_outputs,
    train_student,
    train_teacher,
)
from crcd_plugin.teacher_cache import TeacherCache

logger = logging.getLogger(__name__)

# Paired comparisons reported next to the table: (method, baseline).
PAIRS = (
    ("ce", "kd"),
    ("crd", "kd"),
    ("crcd", "kd"),
    ("crcd_grad", "kd"),
    ("crcd", "crd"),
    ("crcd_grad", "crd"),
    ("crcd_grad", "crcd"),
)


def prepare(
    data_cfg: DataConfig,
    teacher_cfg: TeacherConfig,
    cache_dir: Optional[Path],
    validation_fraction: Optional[float] = None,
    progress: bool = True,
) -> tuple[Dataset, TeacherOutputs]:
    """Dataset and frozen teacher outputs; with ``validation_fraction`` the test split is replaced
    by a validation split of the training data and the teacher is trained without it.

    Returns:
        The dataset the students see and the precomputed teacher outputs on its training split.
    """
    data = load_dataset(data_cfg, cache_dir)
    tag = ""
    if validation_fraction is not None:
        data = split_validation(data, validation_fraction, seed=0)
        tag = f"val{validation_fraction}"
    teacher, acc = train_teacher(data, data_cfg, teacher_cfg, seed=0, cache_dir=cache_dir, progress=progress, tag=tag)
    logger.info("teacher %s accuracy %.4f", "validation" if tag else "test", acc)
    return data, teacher_outputs(teacher, data, acc)


def teacher_cache(data: Dataset, data_cfg: DataConfig, teacher: TeacherOutputs, directory: Path) -> TeacherCache:
    """The teacher's :class:`~crcd_plugin.TeacherCache` over the (un-augmented) training split,
    opened from ``directory`` when one for this data set and teacher is there, else built there.

    A cache that no longer opens (another library version, an unfinished build) is rebuilt: for the
    demo it is a derived file, one teacher pass over the training set away.
    """
    if teacher.model is None:
        raise ValueError("a teacher cache needs the teacher model (TeacherOutputs.model is None)")
    model, size = teacher.model, len(data.y_train)
    path = Path(directory) / f"teacher-cache-{data_cfg.key()}-{TeacherCache.fingerprint_of(model)[:12]}"
    try:
        return TeacherCache.open(path, teacher=model, num_samples=size, classifier="fc")
    except (FileNotFoundError, ValueError) as error:
        logger.info("building the teacher cache at %s (%s)", path, error)
    loader = [(data.x_train[i : i + 512], data.y_train[i : i + 512], torch.arange(i, min(i + 512, size)))
              for i in range(0, size, 512)]
    return TeacherCache.build(path, model, loader, "fc", num_samples=size)


def run_methods(
    data: Dataset,
    teacher: TeacherOutputs,
    train: TrainConfig,
    config: CRCDConfig,
    methods: Sequence[str],
    seeds: Sequence[int],
    progress: bool = True,
    desc: str = "students",
    teacher_source: Optional[Any] = None,
) -> dict[str, list[RunResult]]:
    """Train every method on every seed (seed-major, so machine load hits all methods alike);
    ``teacher_source``: a :class:`~crcd_plugin.TeacherCache` to distil from (see ``train_student``).

    Returns:
        ``{method: [RunResult per seed]}``.
    """
    from tqdm.auto import tqdm

    results: dict[str, list[RunResult]] = {m: [] for m in methods}
    with tqdm(total=len(methods) * len(seeds) * train.epochs, desc=desc, unit="ep", disable=not progress) as bar:
        for seed in seeds:
            for method in methods:
                bar.set_postfix_str(f"{method} seed {seed}")

                def tick(epoch: int, acc: float, label: str = f"{method} seed {seed}") -> None:
                    bar.update(1)
                    bar.set_postfix_str(f"{label} acc {acc:.3f}")

                run = train_student(
                    method, data, teacher, train, config, seed, on_epoch=tick, teacher_source=teacher_source
                )
                results[method].append(run)
                logger.info("%s seed %d: acc %.4f, %.3f s/epoch", method, seed, run.acc, run.time_per_epoch)
    return results


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(results: Mapping[str, Sequence[RunResult]]) -> dict:
    """Per-method accuracy statistics, timings, curves, and paired differences on shared seeds.

    Returns:
        ``{"students": {...}, "paired_differences": {...}}``; std is the sample std over seeds, and
        the paired difference's ``se`` is ``stdev(diffs) / sqrt(n)``.
    """
    students = {}
    for method, runs in results.items():
        accs = [r.acc for r in runs]
        mean, std = _mean_std(accs)
        students[method] = {
            "accs": accs,
            "mean": mean,
            "std": std,
            "seeds": [r.seed for r in runs],
            "time_per_epoch_s": statistics.median(r.time_per_epoch for r in runs),
            "curves": [r.curve for r in runs],
        }
    paired = {}
    for method, base in PAIRS:
        if method not in results or base not in results:
            continue
        by_seed = {r.seed: r.acc for r in results[base]}
        diffs = [r.acc - by_seed[r.seed] for r in results[method] if r.seed in by_seed]
        if not diffs:
            continue
        mean, std = _mean_std(diffs)
        paired[f"{method}-{base}"] = {"diffs": diffs, "mean": mean, "se": std / math.sqrt(len(diffs)), "n": len(diffs)}
    return {"students": students, "paired_differences": paired}

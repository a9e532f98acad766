"""Command line of the demo: ``crcd-demo`` / ``python -m crcd_plugin.demo``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:
    from crcd_plugin.demo.data import DataConfig
    from crcd_plugin.demo.train import TrainConfig

logger = logging.getLogger("crcd_plugin.demo")

# What the ``demo`` extra installs (pyproject.toml): the data generators, progress bars and plots.
DEMO_MODULES = ("numpy", "mnist1d", "sklearn", "tqdm", "matplotlib")
DEMO_INSTALL = 'pip install "crcd-plugin[demo]"'


def missing_demo_modules() -> list:
    """The modules of the ``demo`` extra that cannot be imported here."""
    missing = []
    for module in DEMO_MODULES:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken or shadowed installation
            found = False
        if not found:
            missing.append(module)
    return missing


def default_cache_dir() -> Path:
    """``$CRCD_CACHE`` or ``~/.cache/crcd-plugin``: generated datasets and trained teachers."""
    return Path(os.environ.get("CRCD_CACHE", Path.home() / ".cache" / "crcd-plugin"))


def build_parser() -> argparse.ArgumentParser:
    """The demo's argument parser."""
    from crcd_plugin.demo.models import TEACHER_ARCHS
    from crcd_plugin.demo.train import METHODS

    p = argparse.ArgumentParser(
        prog="crcd-demo",
        description="Distil a 1-D CNN teacher into an MLP student with CE, KD, CRD, CRCD and CRCD+gradient, "
        "offline on MNIST-1D (generated) or scikit-learn digits, over several seeds.",
    )
    p.add_argument("--dataset", choices=("mnist1d", "digits"), default="mnist1d")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds; default 5, --quick 3")
    p.add_argument("--first-seed", type=int, default=0, help="seeds run from here (e.g. for a fresh replication)")
    p.add_argument("--epochs", type=int, default=None, help="student epochs (default 40, --quick 12)")
    p.add_argument(
        "--teacher",
        choices=TEACHER_ARCHS,
        default=None,
        help="teacher architecture (default: strided, the flattened-conv-map teacher)",
    )
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list out of {','.join(METHODS)}")
    p.add_argument("--out", type=Path, default=Path("crcd-demo-results"), help="output folder")
    p.add_argument("--quick", action="store_true", help="a short run (fewer epochs), under ~90 s")
    p.add_argument("--num-train", type=int, default=None, help="training samples (MNIST-1D: generated)")
    p.add_argument("--num-test", type=int, default=None, help="test samples")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="shared student learning rate")
    p.add_argument("--hidden", default=None, help="student hidden widths, e.g. 100,100")
    p.add_argument(
        "--augment",
        action="store_true",
        help="train students on random views (shift + noise) of every batch; the teacher runs live on each view",
    )
    p.add_argument(
        "--teacher-cache",
        action="store_true",
        help="distil from a TeacherCache (built once in the cache dir) instead of the teacher: one fixed, "
        "un-augmented view per sample",
    )
    p.add_argument("--cache-dir", type=Path, default=None, help="default: $CRCD_CACHE or ~/.cache/crcd-plugin")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the dataset/teacher cache")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps timings stable)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log diagnostics")
    return p


def _configs(args: argparse.Namespace) -> tuple["DataConfig", "TrainConfig", tuple[str, ...], tuple[int, ...]]:
    """Dataset, shared training config, methods and seeds from the defaults and the flags."""
    from crcd_plugin.demo import config
    from crcd_plugin.demo.train import METHODS

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods must be a comma list out of {METHODS}, got {args.methods!r}")
    data_cfg = config.DEFAULT_DATA[args.dataset]
    if args.num_train is not None or args.num_test is not None:
        data_cfg = dataclasses.replace(
            data_cfg,
            num_train=args.num_train if args.num_train is not None else data_cfg.num_train,
            num_test=args.num_test if args.num_test is not None else data_cfg.num_test,
        )
    train = config.DEFAULT_TRAIN
    epochs = args.epochs if args.epochs is not None else (config.QUICK_EPOCHS if args.quick else train.epochs)
    overrides: dict[str, Any] = {"epochs": epochs, "augment": args.augment}
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    if args.lr is not None:
        overrides["lr"] = args.lr
    if args.hidden is not None:
        try:
            overrides["hidden"] = tuple(int(h) for h in args.hidden.split(","))
        except ValueError:
            raise ValueError(f"--hidden must be comma-separated widths such as 100,100, got {args.hidden!r}") from None
    train = dataclasses.replace(train, **overrides)
    seeds = args.seeds if args.seeds is not None else (config.QUICK_SEEDS if args.quick else config.DEFAULT_SEEDS)
    if seeds < 1 or train.epochs < 1 or train.batch_size < 1:
        raise ValueError(
            f"--seeds, --epochs and --batch-size must be >= 1, got {seeds}, {train.epochs} and {train.batch_size}"
        )
    if not train.lr > 0:
        raise ValueError(f"--lr must be > 0, got {train.lr}")
    return data_cfg, train, methods, tuple(range(args.first_seed, args.first_seed + seeds))


def _teacher_outputs_text(cache: bool, augment: bool) -> str:
    if cache:
        where = "a TeacherCache built once over the un-augmented training set (one fixed view per sample)"
    elif augment:
        where = "the live teacher on every augmented view"
    else:
        where = "precomputed once over the training set (teacher frozen)"
    return f"{where}; every method but ce trains through CRCDDistiller"


def run_demo(args: argparse.Namespace) -> dict:
    """Run the demo described by parsed ``args``; writes results.json and results.png to ``args.out``.

    Returns:
        The results dictionary that was written.
    """
    import tempfile

    import torch

    from crcd_plugin.demo import config, report
    from crcd_plugin.demo.experiment import prepare, run_methods, summarize, teacher_cache

    data_cfg, train, methods, seeds = _configs(args)
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    args.out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    started = time.perf_counter()
    teacher_cfg = config.DEFAULT_TEACHER
    if args.teacher is not None:
        teacher_cfg = dataclasses.replace(teacher_cfg, arch=args.teacher)
    data, teacher = prepare(data_cfg, teacher_cfg, cache_dir, progress=progress)
    prepared = time.perf_counter() - started
    print(f"{data_cfg.name}: {len(data.y_train)} train / {len(data.y_test)} test, teacher test acc {teacher.acc:.4f} "
          f"({prepared:.1f} s for data + teacher)", flush=True)
    with tempfile.TemporaryDirectory(prefix="crcd-demo-") as scratch:
        source = teacher_cache(data, data_cfg, teacher, cache_dir or Path(scratch)) if args.teacher_cache else None
        runs = run_methods(data, teacher, train, config.DEMO_CONFIG, methods, seeds, progress=progress,
                           teacher_source=source)
    summary = summarize(runs)
    results = {
        "dataset": data_cfg.name,
        "teacher": {"arch": teacher.arch, "acc": teacher.acc},
        "students": summary["students"],
        "paired_differences": summary["paired_differences"],
        "config": {
            "data": dataclasses.asdict(data_cfg),
            "teacher": dataclasses.asdict(teacher_cfg),
            "train": dataclasses.asdict(train),
            "student_arch": f"mlp {data.input_dim}-{'-'.join(map(str, train.hidden))}-{data.num_classes}",
            "crcd_config": dataclasses.asdict(config.DEMO_CONFIG),
            "methods": list(methods),
            "seeds": list(seeds),
            "threads": torch.get_num_threads(),
            "teacher_outputs": _teacher_outputs_text(args.teacher_cache, train.augment),
        },
        "wall_time_s": time.perf_counter() - started,
    }
    print(report.format_table(results))
    json_path = report.write_json(results, args.out)
    png_path = report.plot(results, args.out)
    print(f"wrote {json_path} and {png_path} ({results['wall_time_s']:.1f} s in all)")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``crcd-demo``."""
    missing = missing_demo_modules()
    if missing:
        print(f"crcd-demo: error: the demo needs {', '.join(missing)}, which the library alone does not install; "
              f"install the demo extra: {DEMO_INSTALL}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(max(1, args.threads))
    # Denormal floats slow CPU kernels down by orders of magnitude; the relation loss can produce them.
    torch.set_flush_denormal(True)
    try:
        run_demo(args)
    except ValueError as error:
        print(f"crcd-demo: error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:  # a dependency the check above does not know of
        print(f"crcd-demo: error: {error}; install the demo extra: {DEMO_INSTALL}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The tuning run behind the demo's defaults: ``python -m crcd_plugin.demo.tune`` or ``crcd-demo --tune``.

Every choice is made on a validation split carved from the training data (20%), with its own
teacher trained without those samples, on seeds that the demo's evaluation does not use. The search
is greedy and small (a few minutes on 2 CPU cores): shared learning rate (CE and KD), then KD's
weight and temperature, then each relational method's own settings on top of the chosen KD, then
the distillation schedule. Each method gets the same kind of search, so every baseline is at its
best too. The winners are printed as Python to paste into ``crcd_plugin/demo/config.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

from crcd_plugin.demo.train import MethodSettings, TrainConfig

logger = logging.getLogger(__name__)

VALIDATION_FRACTION = 0.2
TUNING_SEEDS = (100, 101)


class _Search:
    """Runs candidate settings on the validation split and remembers every score."""

    def __init__(self, data, teacher, train: TrainConfig, seeds: Sequence[int], progress: bool) -> None:
        self.data, self.teacher, self.train, self.seeds, self.progress = data, teacher, train, seeds, progress
        self.log: list[dict] = []
        self.cache: dict[tuple, float] = {}

    def score(self, stage: str, method: str, settings: MethodSettings, train: Optional[TrainConfig] = None) -> float:
        from crcd_plugin.demo.train import train_student

        train = train or self.train
        key = (method, settings, train)
        if key in self.cache:  # a stage may re-offer an earlier winner; runs are deterministic
            return self.cache[key]
        runs = [train_student(method, self.data, self.teacher, train, settings, s) for s in self.seeds]
        acc = statistics.fmean(r.acc for r in runs)
        entry = {
            "stage": stage,
            "method": method,
            "val_acc": acc,
            "val_accs": [r.acc for r in runs],
            "s_per_epoch": statistics.median(r.time_per_epoch for r in runs),
            "lr": train.lr,
            "settings": dataclasses.asdict(settings),
        }
        self.log.append(entry)
        self.cache[key] = acc
        logger.info("%s %s lr=%g %s -> %.4f", stage, method, train.lr, settings, acc)
        return acc

    def best(self, stage: str, method: str, candidates: Iterable[MethodSettings]) -> MethodSettings:
        from tqdm.auto import tqdm

        candidates = list(candidates)
        scored = []
        for cand in tqdm(candidates, desc=f"{stage} ({method})", disable=not self.progress, leave=False):
            scored.append((self.score(stage, method, cand), cand))
        acc, winner = max(scored, key=lambda t: t[0])
        print(f"  {stage:<22} {method:<10} best val acc {acc:.4f} of {len(scored)} candidates", flush=True)
        return winner


def tune(
    data,
    teacher,
    train: TrainConfig,
    seeds: Sequence[int] = TUNING_SEEDS,
    progress: bool = True,
) -> tuple[TrainConfig, dict[str, MethodSettings], list[dict]]:
    """Greedy search over a small grid; returns the chosen shared training config, per-method
    settings and the log of every (candidate, validation accuracy)."""
    search = _Search(data, teacher, train, seeds, progress)
    replace = dataclasses.replace

    # 1. Shared learning rate: mean validation accuracy of CE and KD (the two cheap methods).
    lr_scores = {}
    for lr in (3e-3, 1e-2, 2e-2):
        t = replace(train, lr=lr)
        lr_scores[lr] = statistics.fmean(
            [search.score("lr", "ce", MethodSettings(), t), search.score("lr", "kd", MethodSettings(), t)]
        )
    lr = max(lr_scores, key=lr_scores.get)
    search.train = train = replace(train, lr=lr)
    print(f"  {'lr':<22} shared     best lr {lr:g} (CE/KD mean val acc {lr_scores[lr]:.4f})", flush=True)

    # 2. KD weight and temperature.
    kd = search.best(
        "kd alpha/T", "kd", (MethodSettings(alpha=a, kd_temperature=t) for a, t in itertools.product((0.5, 1.0, 2.0, 4.0), (1.0, 2.0, 4.0, 8.0)))
    )
    base = dict(alpha=kd.alpha, kd_temperature=kd.kd_temperature)

    # 3. CRD on top of the chosen KD: weight and temperature (K = 256 negatives from the bank).
    crd = search.best(
        "crd beta/tau",
        "crd",
        (MethodSettings(**base, beta=b, temperature=tau, num_negatives=256) for b, tau in itertools.product((0.1, 0.3, 1.0), (0.05, 0.1, 0.2))),
    )

    # 4. CRCD feature element: weight and temperature, then anchors/negatives. K and A are kept
    #    small: the A*(K+1) relation scores per sample already outnumber CRD's 257 candidates.
    crcd = search.best(
        "crcd beta/tau",
        "crcd",
        (
            MethodSettings(**base, beta=b, temperature=tau, num_negatives=16, num_anchors=8)
            for b, tau in itertools.product((0.1, 0.3, 1.0), (0.05, 0.1, 0.2))
        ),
    )
    crcd = search.best(
        "crcd K/A", "crcd", (replace(crcd, num_negatives=k, num_anchors=a) for k, a in ((16, 8), (32, 8), (16, 16)))
    )

    # 5. Gradient element on top of the chosen feature element: its own weight.
    crcd_grad = search.best("crcd_grad beta_grad", "crcd_grad", (replace(crcd, beta_grad=bg) for bg in (0.1, 0.3, 1.0)))

    # 6. The paper's schedule: distillation terms off for the last 20% of training, or kept on.
    chosen = {"ce": MethodSettings(), "kd": kd, "crd": crd, "crcd": crcd, "crcd_grad": crcd_grad}
    for method in ("kd", "crd", "crcd", "crcd_grad"):
        chosen[method] = search.best("schedule", method, (chosen[method], replace(chosen[method], distill_until=0.8)))
    return train, chosen, search.log


def settings_as_python(train: TrainConfig, settings: dict[str, MethodSettings]) -> str:
    """The chosen values as the block of code that ``config.py`` ships."""
    default = MethodSettings()
    lines = [f"DEFAULT_TRAIN = {train!r}", "DEFAULT_SETTINGS: dict[str, MethodSettings] = {"]
    for method, s in settings.items():
        changed = {f.name: getattr(s, f.name) for f in dataclasses.fields(s) if getattr(s, f.name) != getattr(default, f.name)}
        args = ", ".join(f"{k}={v!r}" for k, v in changed.items())
        lines.append(f"    {method!r}: MethodSettings({args}),")
    lines.append("}")
    return "\n".join(lines)


def run_tuning(args: argparse.Namespace) -> dict:
    """Run the search for parsed demo ``args`` (dataset, sizes, epochs, cache) and write ``tune.json``."""
    from crcd_plugin.demo import config
    from crcd_plugin.demo.__main__ import _configs, default_cache_dir
    from crcd_plugin.demo.experiment import prepare

    data_cfg, train, _, _ = _configs(args)
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data, teacher = prepare(data_cfg, config.DEFAULT_TEACHER, cache_dir, VALIDATION_FRACTION, progress=not args.no_progress)
    print(
        f"tuning on {data_cfg.name}: {len(data.y_train)} train / {len(data.y_test)} validation "
        f"(test split unused), teacher val acc {teacher.acc:.4f}, seeds {TUNING_SEEDS}",
        flush=True,
    )
    train, chosen, log = tune(data, teacher, train, progress=not args.no_progress)
    code = settings_as_python(train, chosen)
    result = {
        "data": dataclasses.asdict(data_cfg),
        "validation_fraction": VALIDATION_FRACTION,
        "seeds": list(TUNING_SEEDS),
        "teacher_val_acc": teacher.acc,
        "train": dataclasses.asdict(train),
        "chosen": {m: dataclasses.asdict(s) for m, s in chosen.items()},
        "log": log,
        "wall_time_s": time.perf_counter() - started,
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
    }
    path = Path(args.out) / "tune.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nchosen settings ({result['wall_time_s']:.0f} s), for crcd_plugin/demo/config.py:\n{code}\nwrote {path}")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m crcd_plugin.demo.tune``: same flags as ``crcd-demo``."""
    from crcd_plugin.demo.__main__ import main as demo_main

    return demo_main(["--tune", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

"""Choose the library's defaults on the suite (validation only), then report them on test.

    python benchmarks/defaults/run.py                  # the whole search, then the test report
    python benchmarks/defaults/run.py --stage final    # only the test report of the chosen defaults

Stages, each on the validation split with paired seeds (the same seeds for every candidate):

1. ``lr``: the SGD learning rate of each setting, chosen for CE alone (the user's loop; seed 0);
   KD with 0.2.0's form is run beside it at every rate, to show where KD alone is unsafe.
2. ``kd``: the KD form (weight, temperature) at those rates: must never fall below CE.
3. ``feature``: the feature element (weight, temperature, anchors, embedding size, sides), one
   factor at a time from the start point (the demo's earlier tuned region), keeping the best mean
   gain over KD.
4. ``gradient``: the gradient element (rescaling before the head, weight) on top.
5. ``bank``: the memory bank with ``num_samples`` (objective), on top.
6. ``final``: test split, 5 fresh seeds: CE, KD, KD + CRCD, KD + CRCD + gradient, the bank, and
   0.2.0's defaults; accuracy, paired differences, epoch time relative to KD (one thread).

Results are cached per run in ``benchmarks/results/defaults/runs.jsonl`` (a rerun resumes); the
tables go to ``benchmarks/results/defaults/report.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing as mp
import statistics
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "results" / "defaults"
RUNS = OUT / "runs.jsonl"
LRS = (0.05, 0.1, 0.2)
SEARCH_SEEDS = (0, 1)
LR_SEEDS = (0,)
TEST_SEEDS = (10, 11, 12, 13, 14)

# The start point of the feature-element search: the demo's tuned region (in-batch InfoNCE,
# one-sided, few anchors, a small embedding).
START_RELATION = {"negatives": "batch", "objective": "infonce", "temperature": 0.1, "embed_dim": 64,
                  "num_anchors": 8, "symmetric": False}
FEATURE_FACTORS = (
    ("feature_weight", (0.3, 1.0, 3.0)),
    ("relation.temperature", (0.1, 0.2, 0.5)),
    ("relation.num_anchors", (2, 8, 16)),
    ("relation.embed_dim", (32, 64, 128)),
    ("relation.symmetric", (False, True)),
)
GRADIENT_CANDIDATES = (("none", 1.0), ("sample", 0.3), ("batch", 0.3), ("batch", 1.0))
# (task_weight, kd_weight, T). With T = 1, task_weight + kd_weight = 1 makes CE + KD exactly the
# cross-entropy against the mixed target (1 - a) y + a p_teacher: its gradient is never larger than
# CE's, so it is safe wherever CE is. Hinton's T^2 scaling multiplies KD's gradient by T.
KD_CANDIDATES = (
    (1.0, 0.9, 4.0), (1.0, 0.9, 2.0), (1.0, 0.9, 1.0), (1.0, 0.5, 2.0), (1.0, 0.2, 4.0),
    (0.5, 0.5, 1.0), (0.1, 0.9, 1.0), (0.5, 0.5 / 16, 4.0),
)
# 0.2.0's defaults (feature element, no index): tau 0.05, d 128, both sides, every sample an anchor
# (at most 500), InfoNCE over the batch, KD 0.9 at T 4.
V020 = {"kd_weight": 0.9, "kd_temperature": 4.0, "feature_weight": 1.0,
        "relation": {"negatives": "batch", "objective": "infonce", "temperature": 0.05, "embed_dim": 128,
                     "num_anchors": 500, "symmetric": True}}


def load_cache() -> Dict[str, dict]:
    if not RUNS.exists():
        return {}
    return {row["key"]: row for row in map(json.loads, RUNS.read_text().splitlines())}


def execute(specs: Sequence[suite.RunSpec], workers: int) -> List[dict]:
    """Run what the cache lacks (``workers`` processes, one thread each); rows in ``specs`` order."""
    cache = load_cache()
    todo = [s for s in specs if s.key() not in cache]
    todo = list({s.key(): s for s in todo}.values())
    if todo:
        print(f"  {len(todo)} runs to do ({len(specs) - len(todo)} cached)", flush=True)
        OUT.mkdir(parents=True, exist_ok=True)
        with mp.get_context("spawn").Pool(workers) as pool, RUNS.open("a") as f:
            for result in pool.imap_unordered(suite.run, todo):
                f.write(json.dumps(asdict(result)) + "\n")
                f.flush()
        cache = load_cache()
    return [cache[s.key()] for s in specs]


def set_field(config: Dict[str, Any], name: str, value: Any) -> Dict[str, Any]:
    config = copy.deepcopy(config)
    if name.startswith("relation."):
        config.setdefault("relation", {})[name.split(".", 1)[1]] = value
    else:
        config[name] = value
    return config


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    m = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return m, se


class Search:
    def __init__(self, workers: int, report: List[str]) -> None:
        self.workers, self.report = workers, report
        self.lr: Dict[str, float] = {}

    def evaluate(self, configs: Dict[str, Optional[dict]], seeds=SEARCH_SEEDS, split="val",
                 bank: Optional[Dict[str, bool]] = None) -> Dict[str, Dict[str, List[dict]]]:
        """{candidate: {setting: [rows per seed]}} for every setting of the suite."""
        specs, where = [], []
        for name, config in configs.items():
            for setting in suite.SETTINGS:
                for seed in seeds:
                    specs.append(suite.RunSpec(setting.name, seed, self.lr[setting.name], split, config,
                                               bool(bank and bank.get(name)), tag=name))
                    where.append((name, setting.name))
        rows = execute(specs, self.workers)
        out: Dict[str, Dict[str, List[dict]]] = {name: {s.name: [] for s in suite.SETTINGS} for name in configs}
        for (name, setting), row in zip(where, rows):
            out[name][setting].append(row)
        return out

    def table(self, title: str, results, baseline: str, names: Optional[Sequence[str]] = None) -> Dict[str, float]:
        """A markdown table of accuracy (points) per setting, with paired gains over ``baseline``."""
        names = list(names or results)
        head = "| candidate | " + " | ".join(s.name for s in suite.SETTINGS) + f" | mean gain over {baseline} | worst |"
        lines = [f"### {title}", "", head, "|" + "---|" * (len(suite.SETTINGS) + 3)]
        gains = {}
        for name in names:
            cells, per_setting = [], []
            for s in suite.SETTINGS:
                accs = [r["acc"] for r in results[name][s.name]]
                base = [r["acc"] for r in results[baseline][s.name]]
                diff = [100 * (a - b) for a, b in zip(accs, base)]
                per_setting.append(statistics.fmean(diff))
                flag = "!" if any(r["diverged"] for r in results[name][s.name]) else ""
                cells.append(f"{100 * statistics.fmean(accs):.1f} ({statistics.fmean(diff):+.1f}){flag}")
            gains[name] = statistics.fmean(per_setting)
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {gains[name]:+.2f} | {min(per_setting):+.1f} |")
        self.report += lines + [""]
        print("\n".join(lines), flush=True)
        return gains


def stage_lr(search: Search) -> None:
    configs = {}
    for lr in LRS:
        configs[f"ce lr={lr}"] = None
        configs[f"kd0.2 lr={lr}"] = {"kd_weight": 0.9, "kd_temperature": 4.0, "feature_weight": 0.0}
    lines = ["### Stage lr: CE (and 0.2.0's KD) at each learning rate, validation", "",
             "| setting | " + " | ".join(f"CE {lr} | KD0.2 {lr}" for lr in LRS) + " | chosen |",
             "|" + "---|" * (2 * len(LRS) + 2)]
    rows: Dict[str, Dict[str, float]] = {}
    for lr in LRS:
        search.lr = {s.name: lr for s in suite.SETTINGS}
        res = search.evaluate({k: v for k, v in configs.items() if k.endswith(f"={lr}")}, seeds=LR_SEEDS)
        for name, per in res.items():
            for setting, rs in per.items():
                rows.setdefault(setting, {})[name] = statistics.fmean(r["acc"] for r in rs)
    chosen = {}
    for s in suite.SETTINGS:
        best = max(LRS, key=lambda lr: rows[s.name][f"ce lr={lr}"])
        chosen[s.name] = best
        cells = " | ".join(f"{100 * rows[s.name][f'ce lr={lr}']:.1f} | {100 * rows[s.name][f'kd0.2 lr={lr}']:.1f}"
                           for lr in LRS)
        lines.append(f"| {s.name} | {cells} | {best} |")
    search.lr = chosen
    search.report += lines + [""]
    print("\n".join(lines), flush=True)


def stage_kd(search: Search) -> dict:
    configs: Dict[str, Optional[dict]] = {"ce": None}
    for task, weight, temp in KD_CANDIDATES:
        name = f"kd w={weight} T={temp}" if task == 1.0 else f"task {task} kd w={weight:g} T={temp}"
        configs[name] = {"kd_weight": weight, "kd_temperature": temp, "feature_weight": 0.0}
        if task != 1.0:
            configs[name]["task_weight"] = task
    res = search.evaluate(configs)
    gains = search.table("Stage kd: KD forms, validation (accuracy, gain over CE)", res, "ce")

    def worst(name: str) -> float:
        return min(statistics.fmean(100 * (a["acc"] - b["acc"]) for a, b in zip(res[name][s], res["ce"][s]))
                   for s in res[name])

    safe = [n for n in configs if n != "ce" and worst(n) > -1.0] or [n for n in configs if n != "ce"]
    best = max(safe, key=lambda n: gains[n])
    search.report.append(f"Chosen KD form: **{best}** (best mean gain among forms never more than 1 point below CE).\n")
    kd = configs[best]
    assert kd is not None
    return {k: v for k, v in kd.items() if k != "feature_weight"}


def stage_feature(search: Search, kd: dict) -> dict:
    base_kd = dict(kd, feature_weight=0.0)
    current = dict(kd, feature_weight=1.0, relation=dict(START_RELATION))
    for name, values in FEATURE_FACTORS:
        configs: Dict[str, Optional[dict]] = {"kd": base_kd}
        for value in values:
            configs[f"{name}={value}"] = set_field(current, name, value)
        res = search.evaluate(configs)
        gains = search.table(f"Stage feature, {name} (others: {json.dumps(current)})", res, "kd")
        best = max((n for n in configs if n != "kd"), key=lambda n: gains[n])
        current = configs[best]  # type: ignore[assignment]
        search.report.append(f"Kept **{best}** (mean gain {gains[best]:+.2f} over KD).\n")
    return current


def stage_gradient(search: Search, feature: dict) -> dict:
    configs: Dict[str, Optional[dict]] = {"crcd": feature}
    for norm, weight in GRADIENT_CANDIDATES:
        configs[f"grad {norm} w={weight}"] = dict(feature, gradient_element=True, gradient_normalization=norm,
                                                 gradient_weight=weight)
    res = search.evaluate(configs)
    gains = search.table("Stage gradient: gradient element on top of the chosen feature element", res, "crcd")
    # The gradient element's own loss at the end of training against its chance value.
    lines = ["", "| candidate | final crcd_gradient_loss, mean over settings | chance value |", "|---|---|---|"]
    informative = []
    for name in configs:
        if name == "crcd":
            continue
        rows = [r for per in res[name].values() for r in per]
        final = statistics.fmean(r["final"].get("crcd_gradient_loss", float("nan")) for r in rows)
        chance = chance_value(configs[name])
        if final < chance - 0.1:
            informative.append(name)
        lines.append(f"| {name} | {final:.3f} | {chance:.3f} |")
    search.report += lines + [""]
    print("\n".join(lines), flush=True)
    # The element must carry signal: only candidates whose relation loss ends below chance count.
    best = max(informative or [n for n in configs if n != "crcd"], key=lambda n: gains[n])
    search.report.append(
        f"Best gradient candidate among those whose relation loss ends below chance: **{best}** "
        f"(mean gain {gains[best]:+.2f} over KD + CRCD).\n"
    )
    return dict(configs[best], _gain=gains[best])  # type: ignore[arg-type]


def chance_value(config: Optional[dict], batch: int = 64) -> float:
    """InfoNCE over the batch at chance: ``ln B`` per side."""
    rel = (config or {}).get("relation", {})
    return (2 if rel.get("symmetric") else 1) * math.log(batch)


def stage_bank(search: Search, feature: dict) -> dict:
    configs: Dict[str, Optional[dict]] = {"crcd": feature}
    bank = {}
    for objective in ("nce", "infonce"):
        name = f"bank {objective} K=256"
        configs[name] = set_field(set_field(set_field(feature, "relation.negatives", "bank"),
                                            "relation.objective", objective), "relation.num_negatives", 256)
        bank[name] = True
    res = search.evaluate(configs, bank=bank)
    gains = search.table("Stage bank: memory bank (num_samples given) against in-batch", res, "crcd")
    best = max((n for n in configs if n != "crcd"), key=lambda n: gains[n])
    search.report.append(f"Bank objective: **{best}**.\n")
    return configs[best]  # type: ignore[return-value]


def stage_final(search: Search, chosen: Dict[str, Optional[dict]], bank_names: Sequence[str]) -> None:
    res = search.evaluate(chosen, seeds=TEST_SEEDS, split="test", bank={n: True for n in bank_names})
    search.table("Final: test split, seeds 10-14 (accuracy, paired gain over KD)", res, "kd")
    lines = ["", "| candidate | " + " | ".join(s.name for s in suite.SETTINGS) + " | mean |",
             "|" + "---|" * (len(suite.SETTINGS) + 2)]
    for name in chosen:
        if name == "ce":
            continue
        cells, ratios = [], []
        for s in suite.SETTINGS:
            diffs = [100 * (a["acc"] - b["acc"]) for a, b in zip(res[name][s.name], res["kd"][s.name])]
            m, se = mean_se(diffs)
            ratio = statistics.median(r["epoch_time"] for r in res[name][s.name]) / statistics.median(
                r["epoch_time"] for r in res["kd"][s.name])
            ratios.append(ratio)
            cells.append(f"{m:+.1f} +- {se:.1f} ({ratio:.2f}x)")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {statistics.fmean(ratios):.2f}x |")
    search.report += ["### Final: paired difference to KD in points +- standard error (epoch time / KD's)"] + lines
    print("\n".join(lines), flush=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--stage", default="all", choices=("all", "final"))
    args = parser.parse_args(argv)
    report: List[str] = ["# Defaults suite report", ""]
    search = Search(args.workers, report)
    stage_lr(search)
    chosen_path = OUT / "chosen.json"
    if args.stage == "all":
        kd = stage_kd(search)
        feature = stage_feature(search, kd)
        gradient = stage_gradient(search, feature)
        bank = stage_bank(search, feature)
        chosen_path.write_text(json.dumps({"kd": kd, "feature": feature, "gradient": gradient, "bank": bank}, indent=1))
    picks = json.loads(chosen_path.read_text())
    gradient = {k: v for k, v in picks["gradient"].items() if not k.startswith("_")}
    final = {"ce": None, "kd": dict(picks["kd"], feature_weight=0.0), "kd+crcd": picks["feature"],
             "kd+crcd+grad": gradient, "kd+crcd bank": picks["bank"], "0.2.0 kd+crcd": V020}
    stage_final(search, final, ["kd+crcd bank"])
    (OUT / "report.md").write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    main()

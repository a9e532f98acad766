"""Defaults suite v2: choose the library's defaults on validation, then report them on test.

    python benchmarks/defaults/run.py --stage search   # lr, kd, relation, gradient, crd (validation)
    python benchmarks/defaults/run.py --stage final    # the test report of the chosen defaults
    python benchmarks/defaults/run.py                  # both

Every (setting, learning rate) cell is run at two learning rates: CE's best on validation
(``lr`` stage) and one about 3.3x lower, where KD is usually run. Every table carries the external
anchors on the same seeds and batch order: CE, Hinton KD (0.1 CE + 0.9 KL * T^2, T = 4),
logit-standardised KD (Sun et al., CVPR 2024: 0.1 CE + 9 KL * T^2 on z-scored logits, T = 2) and
CRD (CE + 0.8 CRD, the CRD paper's settings). Stages, validation only, paired seeds:

1. ``lr``: CE at 0.05 / 0.1 / 0.2 (the textbook KD beside it); the cell pair of each setting.
2. ``kd``: the KD form. A candidate must never fall more than 1 point below CE in any cell; among
   those, the best mean gain over the better of CE and textbook KD in each cell.
3. ``relation``: the feature element's weight on top of the chosen KD (0 if none helps).
4. ``gradient``: the gradient element on top; on only if it helps on average and never hurts a
   setting beyond its standard error.
5. ``incumbent``: the candidate of 2-4 against 0.3's defaults, under the rule of stage 2.
6. ``final``: test split, 5 fresh seeds, every anchor and the chosen defaults; accuracy +- standard
   error, paired differences, the checks of issue 29 and epoch time relative to KD (one thread).

Runs are cached in ``benchmarks/results/defaults/runs.jsonl`` (a rerun resumes); choices go to
``chosen.json`` and the tables to ``report.md`` (search) and ``final.md`` (test).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "results" / "defaults"
RUNS = OUT / "runs.jsonl"
LR_GRID = (0.05, 0.1, 0.2)
LOWER = {0.05: 0.015, 0.1: 0.03, 0.2: 0.06}  # about 3.3x lower
LR_SEEDS = (0, 1)
SEARCH_SEEDS = (0, 1)
TEST_SEEDS = (10, 11, 12, 13, 14)

Method = Tuple[Optional[str], Optional[dict]]  # (anchor, config): exactly one is set
ANCHORS: Dict[str, Method] = {"ce": ("ce", None), "kd": ("kd", None), "lskd": ("lskd", None)}
# CRD as its paper runs it: CE + 0.8 CRD, d 128, tau 0.07, NCE against a memory bank (K = 512 here,
# smaller than the smallest training set and affordable on one CPU thread; 16384 in the paper),
# momentum 0.5, both sides, the cold bank of its code; one draw of negatives per batch
# (share_negatives: 3x cheaper here than per-sample draws, which cost 38 s a run).
CRD: dict = {"feature_weight": 0.8, "relation": {"anchored": False, "negatives": "bank", "objective": "nce",
                                                  "temperature": 0.07, "embed_dim": 128, "symmetric": True,
                                                  "num_negatives": 512, "memory_init": "cold",
                                                  "share_negatives": True}}
# 0.3's defaults: KD at T = 1 with 0.5 / 0.5 (+ the feature element at 0.3).
V03_KD = {"task_weight": 0.5, "kd_weight": 0.5, "kd_temperature": 1.0}
# KD candidates (task_weight, kd_weight, T, standardize). With standardize the loss no longer grows
# with the student's logit scale (its gradient falls as 1/std of the logits), which is what makes
# Hinton's T^2 form unsafe at high learning rates; Sun et al.'s own weights are the lskd anchor.
KD_CANDIDATES = ((1.0, 1.0, 2.0, True), (1.0, 3.0, 2.0, True), (0.1, 3.0, 2.0, True), (1.0, 9.0, 2.0, True),
                 (0.1, 9.0, 2.0, True))
FEATURE_WEIGHTS = (0.1, 0.3, 1.0)
GRADIENT_WEIGHTS = (0.3,)


def kd_name(task: float, weight: float, temp: float, standardize: bool) -> str:
    return f"{'ls' if standardize else ''}kd task={task:g} w={weight:g} T={temp:g}"


def kd_config(task: float, weight: float, temp: float, standardize: bool) -> dict:
    return {"task_weight": task, "kd_weight": weight, "kd_temperature": temp, "kd_standardize": standardize}


def load_cache() -> Dict[str, dict]:
    if not RUNS.exists():
        return {}
    return {row["key"]: row for row in map(json.loads, RUNS.read_text().splitlines())}


def execute(specs: Sequence[suite.RunSpec], workers: int) -> List[dict]:
    """Run what the cache lacks (``workers`` processes, one thread each); rows in ``specs`` order."""
    cache = load_cache()
    todo = list({s.key(): s for s in specs if s.key() not in cache}.values())
    if todo:
        print(f"  {len(todo)} runs to do ({len(specs) - len(todo)} cached)", flush=True)
        OUT.mkdir(parents=True, exist_ok=True)
        with mp.get_context("spawn").Pool(workers) as pool, RUNS.open("a") as f:
            for result in pool.imap_unordered(suite.run, todo):
                f.write(json.dumps(asdict(result)) + "\n")
                f.flush()
        cache = load_cache()
    return [cache[s.key()] for s in specs]


def mean_se(values: Sequence[float]) -> Tuple[float, float]:
    m = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return m, se


Cell = Tuple[str, float]  # (setting, lr)
Results = Dict[str, Dict[Cell, List[dict]]]  # {method: {cell: [rows, seed order]}}


class Search:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.report: List[str] = []
        self.cells: List[Cell] = []

    def evaluate(self, methods: Dict[str, Method], seeds: Sequence[int] = SEARCH_SEEDS, split: str = "val",
                 cells: Optional[Sequence[Cell]] = None) -> Results:
        specs, where = [], []
        for name, (anchor, config) in methods.items():
            for cell in cells or self.cells:
                for seed in seeds:
                    bank = bool(config and config.get("relation", {}).get("negatives") == "bank")
                    specs.append(suite.RunSpec(cell[0], seed, cell[1], split, config, anchor, bank, tag=name))
                    where.append((name, cell))
        rows = execute(specs, self.workers)
        out: Results = {name: {} for name in methods}
        for (name, cell), row in zip(where, rows):
            out[name].setdefault(cell, []).append(row)
        return out

    def emit(self, lines: List[str]) -> None:
        self.report += lines + [""]
        print("\n".join(lines), flush=True)

    def table(self, title: str, res: Results, names: Optional[Sequence[str]] = None) -> Dict[str, Dict[Cell, float]]:
        """Accuracy per cell (points), and each method's paired gain over the better of CE and KD."""
        names = list(names or res)
        cells = list(res["ce"])
        ref = reference(res)
        head = ("| method | " + " | ".join(f"{s} @{lr}" for s, lr in cells)
                + " | mean gain over best(CE, KD) | worst vs CE |")
        lines = [f"### {title}", "", head, "|" + "---|" * (len(cells) + 3)]
        gains: Dict[str, Dict[Cell, float]] = {}
        for name in names:
            out, per_gain, per_ce = [], {}, []
            for cell in cells:
                accs = [100 * r["acc"] for r in res[name][cell]]
                per_gain[cell] = statistics.fmean(a - b for a, b in zip(accs, ref[cell]))
                per_ce.append(statistics.fmean(100 * (r["acc"] - c["acc"])
                                               for r, c in zip(res[name][cell], res["ce"][cell])))
                flag = "!" if any(r["diverged"] for r in res[name][cell]) else ""
                out.append(f"{statistics.fmean(accs):.1f}{flag}")
            gains[name] = per_gain
            lines.append(f"| {name} | " + " | ".join(out) + f" | {statistics.fmean(per_gain.values()):+.2f} | "
                         f"{min(per_ce):+.1f} |")
        self.emit(lines)
        return gains


def reference(res: Results) -> Dict[Cell, List[float]]:
    """Per cell, per seed: the accuracy of whichever of CE and textbook KD is better on the cell's mean."""
    out = {}
    for cell, ce_rows in res["ce"].items():
        ce = [100 * r["acc"] for r in ce_rows]
        kd = [100 * r["acc"] for r in res["kd"][cell]] if "kd" in res else ce
        out[cell] = kd if statistics.fmean(kd) > statistics.fmean(ce) else ce
    return out


def worst_vs_ce(res: Results, name: str) -> float:
    return min(statistics.fmean(100 * (r["acc"] - c["acc"]) for r, c in zip(res[name][cell], res["ce"][cell]))
               for cell in res["ce"])


def stage_lr(search: Search) -> None:
    cells = [(s.name, lr) for s in suite.SETTINGS for lr in LR_GRID]
    res = search.evaluate({"ce": ANCHORS["ce"], "kd": ANCHORS["kd"]}, seeds=LR_SEEDS, cells=cells)
    lines = ["### Stage lr: CE and textbook KD at each learning rate (validation, seeds 0-1)", "",
             "| setting | " + " | ".join(f"CE {lr} | KD {lr}" for lr in LR_GRID) + " | cells |",
             "|" + "---|" * (2 * len(LR_GRID) + 2)]
    search.cells = []
    for s in suite.SETTINGS:
        acc = {(m, lr): statistics.fmean(r["acc"] for r in res[m][(s.name, lr)])
               for m in ("ce", "kd") for lr in LR_GRID}
        best = max(LR_GRID, key=lambda lr: acc[("ce", lr)])
        search.cells += [(s.name, best), (s.name, LOWER[best])]
        cells_text = " | ".join(f"{100 * acc[('ce', lr)]:.1f} | {100 * acc[('kd', lr)]:.1f}" for lr in LR_GRID)
        lines.append(f"| {s.name} | {cells_text} | {best}, {LOWER[best]} |")
    search.emit(lines)


def stage_kd(search: Search) -> dict:
    methods: Dict[str, Method] = dict(ANCHORS)
    methods["0.3 kd (task=0.5 w=0.5 T=1)"] = (None, dict(V03_KD))
    for cand in KD_CANDIDATES:
        methods[kd_name(*cand)] = (None, kd_config(*cand))
    res = search.evaluate(methods)
    gains = search.table("Stage kd: KD forms (validation accuracy; anchors ce, kd, lskd)", res)
    pool = [n for n in methods if n not in ("ce", "kd") and methods[n][1] is not None]
    safe = [n for n in pool if worst_vs_ce(res, n) > -1.0]
    best = max(safe or pool, key=lambda n: statistics.fmean(gains[n].values()))
    rule = ("among forms never more than 1 point below CE in any cell" if safe else
            "among all forms: none stayed within 1 point of CE in every cell")
    search.emit([f"Chosen KD form: **{best}** (best mean gain over the better of CE and KD {rule})."])
    return dict(methods[best][1] or {})


def stage_relation(search: Search, kd: dict) -> dict:
    methods: Dict[str, Method] = dict(ANCHORS)
    methods["kd*"] = (None, kd)
    for weight in FEATURE_WEIGHTS:
        methods[f"kd* + crcd w={weight:g}"] = (None, dict(kd, feature_weight=weight))
    res = search.evaluate(methods)
    search.table("Stage relation: the feature element on top of the chosen KD (kd*)", res)
    base = "kd*"
    rows = ["", "| method | mean gain over kd* | worst setting mean vs kd* |", "|---|---|---|"]
    best, best_gain = None, 0.0
    for weight in FEATURE_WEIGHTS:
        name = f"kd* + crcd w={weight:g}"
        diffs = {cell: statistics.fmean(100 * (a["acc"] - b["acc"]) for a, b in zip(res[name][cell], res[base][cell]))
                 for cell in res[base]}
        gain, worst = statistics.fmean(diffs.values()), min(diffs.values())
        rows.append(f"| {name} | {gain:+.2f} | {worst:+.1f} |")
        if gain > best_gain and worst > -1.0:
            best, best_gain = weight, gain
    search.emit(rows + ["", f"Chosen feature weight: **{best if best is not None else 0}** (best mean gain over kd* "
                            "among weights never more than 1 point below it; 0 when none gains)."])
    return dict(kd, feature_weight=best or 0.0)


def stage_gradient(search: Search, feature: dict) -> dict:
    methods: Dict[str, Method] = {"ce": ANCHORS["ce"], "kd": ANCHORS["kd"], "default*": (None, feature)}
    for weight in GRADIENT_WEIGHTS:
        methods[f"default* + grad w={weight:g}"] = (None, dict(feature, gradient_element=True, gradient_weight=weight))
    res = search.evaluate(methods)
    search.table("Stage gradient: the gradient element on top (batch-RMS rescaled)", res)
    chosen = dict(feature)
    for weight in GRADIENT_WEIGHTS:
        name = f"default* + grad w={weight:g}"
        per_setting = {}
        for (setting, _), rows in res[name].items():
            base = res["default*"][(setting, _)]
            per_setting.setdefault(setting, []).extend(100 * (a["acc"] - b["acc"]) for a, b in zip(rows, base))
        stats = {s: mean_se(d) for s, d in per_setting.items()}
        mean_gain = statistics.fmean(m for m, _ in stats.values())
        hurts = [s for s, (m, se) in stats.items() if m < -max(se, 0.1)]
        search.emit([f"{name}: mean gain {mean_gain:+.2f} over default*; settings where it hurts beyond its "
                     f"standard error: {', '.join(hurts) or 'none'}."])
        if mean_gain > 0 and not hurts:
            chosen = dict(feature, gradient_element=True, gradient_weight=weight)
    search.emit([f"Gradient element by default: **{chosen.get('gradient_element', False)}**."])
    return chosen


def stage_incumbent(search: Search, candidate: dict) -> dict:
    """The stages' candidate against the defaults it would replace (0.3's), under the kd stage's
    safety rule: never more than 1 point below CE in any cell; then the best mean gain."""
    incumbent = dict(V03_KD, feature_weight=0.3)
    methods: Dict[str, Method] = dict(ANCHORS)
    methods["0.3 default (kd T=1 + crcd)"] = (None, incumbent)
    methods["candidate"] = (None, candidate)
    res = search.evaluate(methods)
    gains = search.table("Stage incumbent: the candidate against 0.3's defaults (validation)", res)
    names = ["0.3 default (kd T=1 + crcd)", "candidate"]
    safe = [n for n in names if worst_vs_ce(res, n) > -1.0] or names
    best = max(safe, key=lambda n: statistics.fmean(gains[n].values()))
    search.emit([f"Shipped default: **{best}** (safe: {', '.join(safe) or 'none'})."])
    return incumbent if best != "candidate" else candidate


def stage_crd(search: Search) -> None:
    res = search.evaluate({"ce": ANCHORS["ce"], "kd": ANCHORS["kd"], "crd": (None, CRD)})
    search.table("Anchor CRD (validation)", res)


def final_methods(chosen: dict) -> Dict[str, Method]:
    """The anchors, the shipped defaults, the stages' candidate (logit-standardised KD) and the
    relation term on top of it at the weight the docs give for turning it on."""
    candidate = dict(chosen["candidate"])
    methods: Dict[str, Method] = dict(ANCHORS)
    methods["crd"] = (None, CRD)
    methods["default (0.3's: kd T=1 + crcd)"] = (None, dict(chosen["default"]))
    methods["candidate: lskd task=1 w=1 T=2"] = (None, candidate)
    methods["candidate + crcd w=0.3"] = (None, dict(candidate, feature_weight=0.3))
    # The gradient element was measured on validation only (report.md): on one 2-core machine the
    # test stage's budget went to the anchors, five seeds each.
    return methods


def stage_final(search: Search, chosen: dict) -> None:
    methods = final_methods(chosen)
    res = search.evaluate(methods, seeds=TEST_SEEDS, split="test")
    ref = reference(res)
    cells = list(res["ce"])
    lines = ["### Final: test split, seeds 10-14: accuracy (points) +- standard error", "",
             "| method | " + " | ".join(f"{s} @{lr}" for s, lr in cells) + " | mean |", "|" + "---|" * (len(cells) + 2)]
    for name in methods:
        out, means = [], []
        for cell in cells:
            m, se = mean_se([100 * r["acc"] for r in res[name][cell]])
            flag = "!" if any(r["diverged"] for r in res[name][cell]) else ""
            out.append(f"{m:.1f} +- {se:.1f}{flag}")
            means.append(m)
        lines.append(f"| {name} | " + " | ".join(out) + f" | {statistics.fmean(means):.1f} |")
    search.emit(lines)
    lines = ["### Final: paired difference to the better of CE and textbook KD (points +- standard error)", "",
             "| method | " + " | ".join(f"{s} @{lr}" for s, lr in cells) + " | mean | cells below best-SE | "
             "cells below CE-SE |", "|" + "---|" * (len(cells) + 4)]
    for name in methods:
        out, means, below_best, below_ce = [], [], 0, 0
        for cell in cells:
            accs = [100 * r["acc"] for r in res[name][cell]]
            ce = [100 * r["acc"] for r in res["ce"][cell]]
            m, se = mean_se([a - b for a, b in zip(accs, ref[cell])])
            mc, sec = mean_se([a - b for a, b in zip(accs, ce)])
            below_best += m < -se
            below_ce += mc < -sec
            out.append(f"{m:+.1f} +- {se:.1f}")
            means.append(m)
        lines.append(f"| {name} | " + " | ".join(out)
                     + f" | {statistics.fmean(means):+.2f} | {below_best} | {below_ce} |")
    search.emit(lines)
    # Against the textbook KD of a plain loop (the anchor): what a user's KD epoch costs without us.
    lines = ["### Final: median epoch time relative to textbook KD in a plain loop (one thread, shared pool)", "",
             "| method | " + " | ".join(s.name for s in suite.SETTINGS) + " | mean |",
             "|" + "---|" * (len(suite.SETTINGS) + 2)]
    for name in methods:
        ratios = []
        for s in suite.SETTINGS:
            mine = [r["epoch_time"] for c in cells if c[0] == s.name for r in res[name][c]]
            base = [r["epoch_time"] for c in cells if c[0] == s.name for r in res["kd"][c]]
            ratios.append(statistics.median(mine) / statistics.median(base))
        lines.append(f"| {name} | " + " | ".join(f"{r:.2f}x" for r in ratios) + f" | {statistics.fmean(ratios):.2f}x |")
    search.emit(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stage", default="all", choices=("all", "search", "final"))
    args = parser.parse_args(argv)
    search = Search(args.workers)
    search.report += ["# Defaults suite v2 report", ""]
    stage_lr(search)
    chosen_path = OUT / "chosen.json"
    if args.stage in ("all", "search"):
        kd = stage_kd(search)
        feature = stage_relation(search, kd)
        candidate = stage_gradient(search, feature)
        default = stage_incumbent(search, candidate)
        stage_crd(search)
        chosen = {"cells": search.cells, "kd": kd, "candidate": candidate, "default": default}
        chosen_path.write_text(json.dumps(chosen, indent=1) + "\n")
        (OUT / "report.md").write_text("\n".join(search.report) + "\n")
    if args.stage in ("all", "final"):
        search.report = ["# Defaults suite v2: test report", ""]
        stage_final(search, json.loads(chosen_path.read_text()))
        (OUT / "final.md").write_text("\n".join(search.report) + "\n")


if __name__ == "__main__":
    main()

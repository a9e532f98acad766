"""The demo's outputs: a text table, ``results.json`` and a PNG of curves and final accuracies."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

logger = logging.getLogger(__name__)

LABELS = {
    "ce": "CE (no teacher)",
    "kd": "KD",
    "crd": "KD + CRD",
    "crcd": "KD + CRCD",
    "crcd_grad": "KD + CRCD + grad",
}


def format_table(results: Mapping[str, Any]) -> str:
    """Markdown table of mean +- std test accuracy, time per epoch, and the paired differences."""
    students = results["students"]
    crd_time = students.get("crd", {}).get("time_per_epoch_s")
    lines = [
        f"Teacher {results['teacher']['arch']}: test acc {results['teacher']['acc']:.4f}",
        "",
        "| method | test acc (mean +- std) | seeds | s/epoch | x CRD time |",
        "|---|---|---|---|---|",
    ]
    for method, row in students.items():
        ratio = f"{row['time_per_epoch_s'] / crd_time:.2f}" if crd_time else "-"
        lines.append(
            f"| {LABELS.get(method, method)} | {row['mean']:.4f} +- {row['std']:.4f} | {len(row['accs'])} "
            f"| {row['time_per_epoch_s']:.3f} | {ratio} |"
        )
    paired = results.get("paired_differences", {})
    if paired:
        lines += ["", "| paired difference (same seeds) | mean | SE | n |", "|---|---|---|---|"]
        for name, row in paired.items():
            lines.append(f"| {name} | {row['mean']:+.4f} | {row['se']:.4f} | {row['n']} |")
    verdicts = verdict_lines(students)
    if verdicts:
        lines += [""] + verdicts
    return "\n".join(lines)


# What the demo is expected to show, as (method, baseline): each is checked on screen.
CLAIMS = (("kd", "ce"), ("crcd", "kd"))


def verdict_lines(students: Mapping[str, Any]) -> list:
    """One plain sentence per claim of :data:`CLAIMS`: whether ``method`` beat ``baseline`` on the
    seeds both ran (mean paired difference and its standard error), said plainly when it did not.

    Example:
        >>> rows = {"ce": {"accs": [0.80, 0.82], "seeds": [0, 1]}, "kd": {"accs": [0.85, 0.86], "seeds": [0, 1]}}
        >>> verdict_lines(rows)[0]
        'KD is above CE (no teacher): +4.50 +- 0.50 points over 2 paired seeds.'
    """
    out = []
    for method, base in CLAIMS:
        if method not in students or base not in students:
            continue
        by_seed = dict(zip(students[base]["seeds"], students[base]["accs"]))
        diffs = [100 * (a - by_seed[s]) for s, a in zip(students[method]["seeds"], students[method]["accs"])
                 if s in by_seed]
        if not diffs:
            continue
        mean = sum(diffs) / len(diffs)
        se = 0.0
        if len(diffs) > 1:
            se = (sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) ** 0.5
        label, base_label = LABELS.get(method, method), LABELS.get(base, base)
        figure = f"{mean:+.2f} +- {se:.2f} points over {len(diffs)} paired seeds"
        if mean > 0:
            out.append(f"{label} is above {base_label}: {figure}.")
        else:
            out.append(f"{label} is NOT above {base_label} in this run: {figure}.")
    return out


def write_json(results: Mapping[str, Any], out: Path) -> Path:
    """Write ``results.json`` into ``out`` and return its path."""
    path = Path(out) / "results.json"
    path.write_text(json.dumps(results, indent=2))
    return path


def plot(results: Mapping[str, Any], out: Path) -> Path:
    """Accuracy curves (mean over seeds, shaded +- std) and a bar chart of final accuracies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    students = results["students"]
    fig, (ax_curve, ax_bar) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, row in students.items():
        curves = np.asarray(row["curves"])  # [seeds, epochs]
        epochs = np.arange(1, curves.shape[1] + 1)
        mean, std = curves.mean(0), curves.std(0)
        ax_curve.plot(epochs, mean, label=LABELS.get(method, method))
        ax_curve.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    ax_curve.axhline(results["teacher"]["acc"], color="k", ls="--", lw=1, label="teacher")
    ax_curve.set_xlabel("epoch")
    ax_curve.set_ylabel("test accuracy")
    ax_curve.set_title(f"{results['dataset']}: student test accuracy (mean over seeds)")
    ax_curve.legend(fontsize=8)

    names = list(students)
    means = [students[m]["mean"] for m in names]
    stds = [students[m]["std"] for m in names]
    ax_bar.bar(range(len(names)), means, yerr=stds, capsize=4, color=[f"C{i}" for i in range(len(names))])
    for i, m in enumerate(names):
        ax_bar.scatter([i] * len(students[m]["accs"]), students[m]["accs"], color="k", s=8, zorder=3)
    ax_bar.set_xticks(range(len(names)), [LABELS.get(m, m) for m in names], rotation=20, fontsize=8)
    lo = min(min(s["accs"]) for s in students.values())
    ax_bar.set_ylim(max(0.0, lo - 0.05), min(1.0, max(means) + max(stds) + 0.03))
    ax_bar.set_ylabel("final test accuracy")
    ax_bar.set_title("final accuracy (bars: mean +- std, dots: seeds)")
    fig.tight_layout()
    path = Path(out) / "results.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""Epoch time of the defaults against KD alone, side by side, on the suite's small models.

    python benchmarks/defaults/cost.py [--epochs 6] [--batch-sizes 64,256]

For every setting of the suite, one student per method trains through ``CRCDDistiller`` with the
live teacher (what a user's loop runs), one CPU thread; the methods' epochs are interleaved
(KD, KD + CRCD, KD + CRCD + gradient, 0.2.0's KD + CRCD, KD, ...) so that load on the machine
hits them alike, and the median epoch time of each is divided by KD's. A second table times the
default relation loss alone at growing batch sizes, to show how its work grows with ``B``.
Writes ``benchmarks/results/defaults/cost.md``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite  # noqa: E402

from crcd_plugin import CRCDDistiller, CRCDLoss  # noqa: E402
from crcd_plugin.config import CRCDConfig, RelationConfig  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "results" / "defaults"


def methods() -> Dict[str, CRCDConfig]:
    """KD alone and the library's defaults; 0.2.0's defaults for comparison."""
    default = CRCDConfig()
    v020 = CRCDConfig(kd_weight=0.9, kd_temperature=4.0, relation=RelationConfig(
        negatives="batch", objective="infonce", temperature=0.05, embed_dim=128, num_anchors=500, symmetric=True))
    return {
        "kd": default.replace(feature_weight=0.0, gradient_element=False),
        "kd+crcd": default.replace(gradient_element=False),
        "kd+crcd+grad": default.replace(gradient_element=True),
        "0.2.0 kd+crcd": v020,
        "0.2.0 kd+crcd+grad": v020.replace(gradient_element=True),
    }


def epoch_times(setting: suite.Setting, epochs: int) -> Dict[str, float]:
    data = suite.load_data(setting)
    teacher = suite.load_teacher(setting, data)
    runs = {}
    for name, config in methods().items():
        torch.manual_seed(0)
        student = suite.build_model(setting.student, data.x_train.shape[1])
        distiller = CRCDDistiller(student, teacher, "fc", "fc", config=config)
        opt = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        runs[name] = (distiller, opt)
    times: Dict[str, List[float]] = {name: [] for name in runs}
    n = len(data.y_train)
    for epoch in range(epochs + 1):  # the first epoch warms up and is not counted
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for name, (distiller, opt) in runs.items():
            distiller.train()
            start = time.perf_counter()
            for idx in order.split(setting.batch_size):
                loss = distiller(data.x_train[idx], data.y_train[idx])["loss"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if epoch:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def relation_scaling(batch_sizes: Sequence[int], repeats: int = 10) -> Dict[int, float]:
    """Forward + backward of the default feature loss alone, in ms, per batch size."""
    out = {}
    for batch in batch_sizes:
        loss = CRCDLoss(64, 128, CRCDConfig().relation)
        student = torch.randn(batch, 64, requires_grad=True)
        teacher = torch.randn(batch, 128)
        samples = []
        for _ in range(repeats + 2):
            start = time.perf_counter()
            loss(student, teacher).backward()
            samples.append(time.perf_counter() - start)
        out[batch] = 1000 * statistics.median(samples[2:])
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-sizes", default="64,128,256,512")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    names = list(methods())
    lines = ["## Epoch time relative to KD (median of interleaved epochs, one thread, live teacher)", "",
             "| setting | KD epoch (s) | " + " | ".join(names[1:]) + " |", "|" + "---|" * (len(names) + 1)]
    ratios: Dict[str, List[float]] = {name: [] for name in names[1:]}
    for setting in suite.SETTINGS:
        t = epoch_times(setting, args.epochs)
        for name in names[1:]:
            ratios[name].append(t[name] / t["kd"])
        cells = " | ".join(f"{t[n] / t['kd']:.2f}x" for n in names[1:])
        lines.append(f"| {setting.name} | {t['kd']:.3f} | {cells} |")
        print(lines[-1], flush=True)
    lines.append("| mean | | " + " | ".join(f"{statistics.fmean(ratios[n]):.2f}x" for n in names[1:]) + " |")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    scaling = relation_scaling(batch_sizes)
    lines += ["", "## Default feature loss alone (forward + backward, ms) by batch size", "",
              "| B | ms | growth exponent from the previous B |", "|---|---|---|"]
    previous = None
    for batch, ms in scaling.items():
        exponent = "" if previous is None else f"{math.log(ms / previous[1]) / math.log(batch / previous[0]):.2f}"
        lines.append(f"| {batch} | {ms:.2f} | {exponent} |")
        previous = (batch, ms)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

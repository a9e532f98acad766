"""Mixed precision check: a distiller step under autocast is finite and close to fp32.

For each precision (CUDA: fp16 with ``GradScaler`` and bf16; CPU: bf16, or ``--dtypes fp16 bf16``)
and each configuration, a tiny CNN student and teacher run one ``CRCDDistiller`` step under
autocast from the same state and with the same random draws as an fp32 step; the script prints
each loss term and its relative difference to fp32, then trains ``--steps`` (30) steps under
autocast (fp16 through a ``GradScaler``) to check that every loss and gradient stays finite.
Exit status 1 if a term is non-finite or off by more than ``--rtol`` (5%).

Configurations (``--presets``), all with the gradient element on:

* ``default``: ``CRCDConfig(gradient_element=True)`` with ``num_samples``, so a memory bank fed
  each batch's dataset index (what a CIFAR loader gives).
* ``default_batch``: the same without ``num_samples``: in-batch negatives, no index.
* ``reference``: ``CRCDConfig.reference(gradient_element=True)`` with a memory bank.

    python benchmarks/amp_check.py --device cuda --json amp_check_cuda.json
    python benchmarks/amp_check.py --device cpu --dtypes fp16 bf16 --steps 3
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from crcd_plugin import CRCDConfig, CRCDDistiller

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_info import header, run_info  # noqa: E402

TERMS = ("loss", "task_loss", "kd_loss", "crcd_feature_loss", "crcd_gradient_loss")
# A CIFAR-sized bank: the default configuration's compiled loss core is then the one train_step.py's
# crcd_bank rows compile (same options), which inductor's cache can reuse within a GPU run.
BATCH, SAMPLES = 64, 50_000
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
PRESETS = ("default", "default_batch", "reference")


class TinyCNN(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, stride=2), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def make_distiller(preset: str) -> CRCDDistiller:
    if preset == "reference":
        config = CRCDConfig.reference(gradient_element=True)
    else:
        config = CRCDConfig(gradient_element=True)
    num_samples = None if preset == "default_batch" else SAMPLES
    # The reference's step schedule needs the run's length; these steps are all inside its first 96%.
    return CRCDDistiller(TinyCNN(16), TinyCNN(48), "fc", "fc", config, num_samples=num_samples, total_steps=1000)


def check(device: torch.device, dtype_name: str, preset: str, rtol: float, steps: int) -> Dict[str, Any]:
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    distiller = make_distiller(preset).to(device)
    distiller.train()
    uses_index = distiller.num_samples is not None
    x = torch.randn(BATCH, 3, 16, 16, device=device)
    y = torch.randint(0, 10, (BATCH,), device=device)
    index = torch.randperm(SAMPLES, device=device)[:BATCH] if uses_index else None
    state = copy.deepcopy(distiller.state_dict())
    torch.manual_seed(1)
    fp32 = {k: float(v.detach()) for k, v in distiller(x, y, index).items() if k in TERMS}
    distiller.load_state_dict(state)
    torch.manual_seed(1)  # the same anchors and negatives
    with torch.autocast(device.type, dtype=dtype):
        low = distiller(x, y, index)
    failures: List[str] = []
    terms: Dict[str, Dict[str, Any]] = {}
    name = f"{device.type} {dtype_name} {preset}"
    for key in TERMS:
        value = float(low[key].detach())
        rel = abs(value - fp32[key]) / max(abs(fp32[key]), 1e-3)
        ok = value == value and abs(value) != float("inf") and low[key].dtype == torch.float32 and rel <= rtol
        terms[key] = {"fp32": fp32[key], "amp": value, "rel_diff": rel, "ok": ok}
        print(f"{name:28s} {key:20s} fp32 {fp32[key]:10.5f}  amp {value:10.5f}  rel diff {rel:.2e}  "
              f"{'ok' if ok else 'FAIL'}", flush=True)
        if not ok:
            failures.append(f"{name} {key}")

    # A short run under autocast: finite losses and gradients (fp16 through GradScaler).
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    skipped = 0
    out = low
    for step in range(steps):
        xb = torch.randn(BATCH, 3, 16, 16, device=device)
        yb = torch.randint(0, 10, (BATCH,), device=device)
        ib = torch.randperm(SAMPLES, device=device)[:BATCH] if uses_index else None
        with torch.autocast(device.type, dtype=dtype):
            out = distiller(xb, yb, ib)
        optimizer.zero_grad()
        scaler.scale(out["loss"]).backward()
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        scaler.step(optimizer)
        scaler.update()
        if scaler.is_enabled() and scaler.get_scale() < scale:
            skipped += 1  # an overflowing scale, halved: what GradScaler is for
        if not torch.isfinite(out["loss"]):
            failures.append(f"{name} training step {step}: loss {float(out['loss'].detach())}")
            break
    final_scale = scaler.get_scale() if scaler.is_enabled() else 1.0
    print(f"{name:28s} {steps} autocast training steps: final loss {float(out['loss'].detach()):.4f}, "
          f"grad scale {final_scale:g} ({skipped} steps skipped by the scaler)", flush=True)
    return {"dtype": dtype_name, "preset": preset, "terms": terms, "steps": steps,
            "final_loss": float(out["loss"].detach()), "grad_scale": final_scale, "scaler_skipped_steps": skipped,
            "failures": failures}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None,
                        help="default: fp16 bf16 on CUDA, bf16 on CPU")
    parser.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS))
    parser.add_argument("--rtol", type=float, default=0.05, help="largest relative difference to fp32 per term")
    parser.add_argument("--steps", type=int, default=30, help="training steps under autocast per configuration")
    parser.add_argument("--json", default=None, help="write the results here (rewritten after each configuration)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtypes = args.dtypes or (["fp16", "bf16"] if device.type == "cuda" else ["bf16"])
    info = run_info(device, dict(dtypes=dtypes, presets=args.presets, rtol=args.rtol, steps=args.steps,
                                 batch=BATCH, num_samples=SAMPLES))
    print(header(info), flush=True)
    report: Dict[str, Any] = {**info, "results": []}
    failures: List[str] = []
    # Configuration first: both precisions reuse its compiled loss core, and a run cut short by a
    # timeout has the default configuration's results first.
    for preset in args.presets:
        for dtype_name in dtypes:
            result = check(device, dtype_name, preset, args.rtol, args.steps)
            report["results"].append(result)
            failures += result["failures"]
            report["failures"] = failures
            if args.json:
                with open(args.json, "w") as handle:
                    json.dump(report, handle, indent=2)
    print("all finite and within tolerance" if not failures else f"FAILED: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

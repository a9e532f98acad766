"""Mixed precision check: a distiller step under autocast is finite and close to fp32.

For each precision (CUDA: fp16 with ``GradScaler`` and bf16; CPU: bf16), a tiny CNN student and
teacher run one ``CRCDDistiller`` step (defaults plus the gradient element, then the reference
preset with a memory bank) from the same state as an fp32 step; the script prints each loss term,
its relative difference to fp32, and then trains 30 steps under autocast to check that every loss
and gradient stays finite. Exit status 1 if a term is non-finite or off by more than ``--rtol``.

    python benchmarks/amp_check.py --device cuda          # fp16 + GradScaler, bf16
    python benchmarks/amp_check.py --device cpu           # bf16
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import List, Optional, Sequence

import torch
from torch import nn

from crcd_plugin import CRCDDistiller

TERMS = ("loss", "task_loss", "kd_loss", "crcd_feature_loss", "crcd_gradient_loss")
BATCH, SAMPLES = 64, 1024


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


def check(device: torch.device, dtype: torch.dtype, preset: str, rtol: float) -> List[str]:
    torch.manual_seed(0)
    extra = {"num_samples": SAMPLES} if preset == "reference" else {}
    distiller = CRCDDistiller(TinyCNN(16), TinyCNN(48), gradient_element=True, preset=preset, **extra).to(device)
    distiller.train()
    x = torch.randn(BATCH, 3, 16, 16, device=device)
    y = torch.randint(0, 10, (BATCH,), device=device)
    index = torch.randperm(SAMPLES, device=device)[:BATCH] if extra else None
    state = copy.deepcopy(distiller.state_dict())
    rng = torch.get_rng_state()
    fp32 = {k: float(v) for k, v in distiller(x, y, index).items() if k in TERMS}
    distiller.load_state_dict(state)
    torch.set_rng_state(rng)  # the same negatives
    with torch.autocast(device.type, dtype=dtype):
        low = distiller(x, y, index)
    failures = []
    name = f"{device.type} {str(dtype).replace('torch.', '')} preset={preset}"
    for key in TERMS:
        value = float(low[key])
        rel = abs(value - fp32[key]) / max(abs(fp32[key]), 1e-3)
        ok = value == value and abs(value) != float("inf") and low[key].dtype == torch.float32 and rel <= rtol
        print(f"{name:34s} {key:20s} fp32 {fp32[key]:10.5f}  amp {value:10.5f}  rel diff {rel:.2e}  "
              f"{'ok' if ok else 'FAIL'}")
        if not ok:
            failures.append(f"{name} {key}")

    # A short run under autocast: finite losses and gradients (fp16 through GradScaler).
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    for step in range(30):
        xb = torch.randn(BATCH, 3, 16, 16, device=device)
        yb = torch.randint(0, 10, (BATCH,), device=device)
        ib = torch.randperm(SAMPLES, device=device)[:BATCH] if extra else None
        with torch.autocast(device.type, dtype=dtype):
            out = distiller(xb, yb, ib)
        optimizer.zero_grad()
        scaler.scale(out["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
        if not torch.isfinite(out["loss"]):
            failures.append(f"{name} training step {step}: loss {float(out['loss'])}")
            break
    print(f"{name:34s} 30 autocast training steps: final loss {float(out['loss']):.4f}, "
          f"grad scale {scaler.get_scale() if scaler.is_enabled() else 1.0:g}")
    return failures


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rtol", type=float, default=0.05, help="largest relative difference to fp32 per term")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtypes = [torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.bfloat16]
    failures = []
    for dtype in dtypes:
        for preset in ("default", "reference"):
            failures += check(device, dtype, preset, args.rtol)
    print("all finite and within tolerance" if not failures else f"FAILED: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Time one training step of the CIFAR-100 recipe: CE, KD, CRCD feature, CRCD feature + gradient.

Teacher resnet32x4 (frozen) -> student resnet8x4, CIFAR-shaped fp32 input. A step is forward,
backward and an SGD step. Reports the median step time after warm-up, the peak memory, and both
as a ratio to the KD step. Runs unchanged on CUDA (``--device cuda``) and CPU.

    python benchmarks/train_step.py --device cuda --json train_step.json
    python benchmarks/train_step.py --device cpu --threads 1 --steps 3 --warmup 1 --rounds 2

On a shared CPU, ``--threads 1`` keeps OpenMP threads from fighting the neighbours, and
``--rounds`` interleaves the configurations so that load hits every row alike.

On CUDA, memory is ``torch.cuda.max_memory_allocated`` over the measured steps (absolute peak,
models included). On CPU, each configuration runs in a fresh subprocess and memory is the
process's peak RSS (``ru_maxrss``) minus its RSS just before the first step: the extra memory a
step needs, not counting the models and the batch.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crcd_plugin.config import BACKENDS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "crcd_cifar100_models", os.path.join(REPO, "examples", "cifar100", "models.py")
)
_models = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(_models)  # type: ignore[union-attr]
create_model = _models.create_model

CONFIGS = ("ce", "kd", "crcd_feature", "crcd_feature_gradient")
# ``CRCDDistiller(student, teacher)`` with every default (no index: in-batch negatives, InfoNCE).
EXTRA_CONFIGS = ("crcd_default", "crcd_default_gradient")
LABELS = {
    "crcd_default": "CRCDDistiller defaults (feature)",
    "crcd_default_gradient": "CRCDDistiller defaults + gradient element",
    "ce": "CE only",
    "kd": "KD",
    "crcd_feature": "CRCD feature element",
    "crcd_feature_gradient": "CRCD feature + gradient element",
}
TRAIN_SET_SIZE = 50_000  # CIFAR-100: rows of the memory bank
GAMMA, ALPHA, BETA, KD_TEMPERATURE = 1.0, 0.9, 1.0, 4.0


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton's KD: ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, batch mean."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


class PlainObjective(nn.Module):
    """CE (``teacher=None``) or CE + KD, called like the distiller: ``(x, y, index=...) -> dict``."""

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher

    def forward(self, images: Tensor, labels: Tensor, index: Optional[Tensor] = None) -> Dict[str, Tensor]:
        logits = self.student(images)
        task_loss = F.cross_entropy(logits, labels)
        if self.teacher is None:
            return {"loss": task_loss, "logits": logits}
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        loss = GAMMA * task_loss + ALPHA * kd_loss(logits, teacher_logits, KD_TEMPERATURE)
        return {"loss": loss, "logits": logits}


def build_objective(
    config: str, student: nn.Module, teacher: nn.Module, num_negatives: int, backend: str = "auto",
    checks: bool = True,
) -> nn.Module:
    if config == "ce":
        return PlainObjective(student, None)
    if config == "kd":
        return PlainObjective(student, teacher)
    from crcd_plugin.distiller import CRCDDistiller

    if config in EXTRA_CONFIGS:
        return CRCDDistiller(student, teacher, gradient_element=config == "crcd_default_gradient")
    return CRCDDistiller(
        student,
        teacher,
        student_head="fc",
        teacher_head="fc",
        gamma=GAMMA,
        alpha=ALPHA,
        beta=BETA,
        kd_temperature=KD_TEMPERATURE,
        gradient_element=config == "crcd_feature_gradient",
        num_samples=TRAIN_SET_SIZE,
        crcd_options=dict(
            embed_dim=128,
            negatives="bank",
            num_negatives=num_negatives,
            temperature=0.05,
            objective="nce",
            momentum=0.5,
            backend=backend,
            # The input checks are CRCDLoss's one host sync per forward; without them it has none.
            on_nonfinite="raise" if checks else "skip",
            check_index=checks,
        ),
    )


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(config: str, device: torch.device, batch_size: int, num_negatives: int,
            steps: int, warmup: int, seed: int = 0, backend: str = "auto", checks: bool = True) -> Dict[str, Any]:
    """Time ``steps`` training steps of one configuration after ``warmup`` untimed ones."""
    torch.manual_seed(seed)
    teacher = create_model("resnet32x4").to(device).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    student = create_model("resnet8x4").to(device)
    objective = build_objective(config, student, teacher, num_negatives, backend, checks).to(device)
    objective.train()
    optimizer = torch.optim.SGD(
        [p for p in objective.parameters() if p.requires_grad], lr=0.05, momentum=0.9, weight_decay=5e-4
    )
    images = torch.randn(batch_size, 3, 32, 32, device=device)
    labels = torch.randint(0, 100, (batch_size,), device=device)
    index = torch.randperm(TRAIN_SET_SIZE, device=device)[:batch_size]
    cuda = device.type == "cuda"

    def step() -> Tensor:
        out = objective(images, labels, index=index)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        return out["loss"].detach()

    rss_before = current_rss_bytes()
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times: List[float] = []
    loss = torch.zeros(())
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    if cuda:
        peak_bytes: Optional[int] = torch.cuda.max_memory_allocated(device)
        memory_kind = "cuda max_memory_allocated"
    else:
        # ru_maxrss is in KiB on Linux; the high-water mark of this process since it started.
        peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
        memory_kind = "peak RSS delta"
    return {
        "config": config,
        "label": LABELS[config],
        "median_ms": 1000 * statistics.median(times),
        "min_ms": 1000 * min(times),
        "times_ms": [1000 * t for t in times],
        "peak_mib": None if peak_bytes is None else peak_bytes / 2**20,
        "memory_kind": memory_kind,
        "final_loss": float(loss),
    }


def run_isolated(config: str, args: argparse.Namespace) -> Dict[str, Any]:
    """Measure one configuration in a fresh interpreter so its peak RSS is its own."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        path = handle.name
    command = [sys.executable, os.path.abspath(__file__), "--configs", config, "--no-isolate",
               "--device", args.device, "--batch-size", str(args.batch_size),
               "--num-negatives", str(args.num_negatives), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--backend", args.backend, "--json", path, "--quiet"]
    if not args.checks:
        command.append("--no-checks")
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    subprocess.run(command, check=True)
    with open(path) as handle:
        result = json.load(handle)["results"][0]
    os.unlink(path)
    return result


def machine_info(device: torch.device) -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def merge_rounds(rounds: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """One row from several rounds of a configuration: statistics over all timed steps."""
    times = [t for r in rounds for t in r["times_ms"]]
    peaks = [r["peak_mib"] for r in rounds if r["peak_mib"] is not None]
    merged = dict(rounds[0])
    merged.update(
        median_ms=statistics.median(times),
        min_ms=min(times),
        times_ms=times,
        peak_mib=max(peaks) if peaks else None,
        final_loss=rounds[-1]["final_loss"],
    )
    return merged


def format_table(results: Sequence[Dict[str, Any]]) -> str:
    kd = next((r for r in results if r["config"] == "kd"), None)
    lines = ["| step | median ms | min ms | x KD time (median) | peak MiB | x KD memory |",
             "|---|---|---|---|---|---|"]
    for row in results:
        time_ratio = f"{row['median_ms'] / kd['median_ms']:.2f}" if kd else "n/a"
        if row["peak_mib"] is None:
            memory, memory_ratio = "n/a", "n/a"
        else:
            memory = f"{row['peak_mib']:.0f}"
            memory_ratio = (f"{row['peak_mib'] / kd['peak_mib']:.2f}"
                            if kd and kd["peak_mib"] and kd["peak_mib"] > 0 else "n/a")
        lines.append(f"| {row['label']} | {row['median_ms']:.1f} | {row['min_ms']:.1f} | {time_ratio} "
                     f"| {memory} | {memory_ratio} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-negatives", type=int, default=500)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before timing")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat all configurations this many times, interleaved")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS + EXTRA_CONFIGS, default=list(CONFIGS))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="CRCDLoss relation kernel (auto: compiled on CUDA, eager on CPU)")
    parser.add_argument("--no-checks", dest="checks", action="store_false",
                        help="on_nonfinite='skip', check_index=False: no host sync in CRCDLoss.forward")
    parser.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                        help="one subprocess per configuration (default on CPU, for honest peak RSS)")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false")
    parser.add_argument("--json", default=None, help="write the results to this file")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if min(args.steps, args.batch_size, args.num_negatives, args.rounds) < 1 or args.warmup < 0:
        parser.error("--steps, --batch-size, --num-negatives, --rounds must be >= 1 and --warmup >= 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    isolate = device.type == "cpu" if args.isolate is None else args.isolate

    load_before = os.getloadavg()
    per_config: Dict[str, List[Dict[str, Any]]] = {config: [] for config in args.configs}
    # Rounds interleave the configurations, so a noisy neighbour slows all rows alike.
    for round_index in range(args.rounds):
        for config in args.configs:
            if isolate:
                result = run_isolated(config, args)
            else:
                result = measure(config, device, args.batch_size, args.num_negatives, args.steps, args.warmup,
                                 backend=args.backend, checks=args.checks)
            per_config[config].append(result)
            if not args.quiet:
                print(f"round {round_index + 1}/{args.rounds} {result['label']:32s} "
                      f"{result['median_ms']:9.1f} ms  "
                      f"{'n/a' if result['peak_mib'] is None else format(result['peak_mib'], '.0f')} MiB "
                      f"({result['memory_kind']})", flush=True)
    results = [merge_rounds(per_config[config]) for config in args.configs]
    report = {
        "machine": machine_info(device),
        "setup": {"teacher": "resnet32x4", "student": "resnet8x4", "batch_size": args.batch_size,
                  "num_negatives": args.num_negatives, "input": "3x32x32 fp32", "steps": args.steps,
                  "backend": args.backend, "input_checks": args.checks,
                  "warmup": args.warmup, "rounds": args.rounds, "device": args.device,
                  "isolated": isolate, "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "results": results,
    }
    if not args.quiet:
        print(format_table(results))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return report


if __name__ == "__main__":
    main()

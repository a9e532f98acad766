"""Time one training step of the CIFAR-100 recipe: CE, KD, and KD + CRCD in several configurations.

Teacher resnet32x4 (frozen) -> student resnet8x4, CIFAR-shaped fp32 input (random data), batch 64.
A step is forward, backward and an SGD step. Reports the median step time after warm-up, the peak
memory, and both as a ratio to the KD step. Runs unchanged on CUDA (``--device cuda``) and CPU.

Configurations (``--configs``):

* ``ce``: cross-entropy only. ``kd``: the standard KD recipe of CRD's and CRCD's code,
  ``0.1 * CE + 0.9 * KD`` with ``T = 4`` (KL times ``T^2``).
* ``crcd_bank``: **the default KD + CRCD**, ``CRCDDistiller(student, teacher, "fc", "fc",
  CRCDConfig(), num_samples=50_000)`` fed each batch's dataset index, as with a CIFAR-100 loader
  (``CRCDConfig()``'s defaults with ``num_samples``: a first-write memory bank, K = 256 negatives,
  InfoNCE, 2 anchors, embedding 64, one side; backend ``"auto"``, compiled on CUDA).
  ``crcd_bank_eager``: the same with ``backend="eager"``. ``crcd_bank_gradient``: the same plus
  ``gradient_element=True``.
* ``crcd_default``, ``crcd_default_gradient``: ``CRCDDistiller(student, teacher)`` with no
  dataset size, so in-batch negatives (no index).
* ``crcd_feature``, ``crcd_feature_gradient``: the reference's work per step, as measured before
  0.3: CE + 0.9 KD (T 4) + CRCD with a bank of 50,000, ``--num-negatives`` (500) NCE negatives,
  temperature 0.05, embedding 128 (2 anchors, one side).

``--backend`` sets the relation backend of every CRCD configuration but ``crcd_bank_eager``.

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
import gc
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

import crcd_plugin.relation_loss as rl
from crcd_plugin import CRCDConfig, RelationConfig
from crcd_plugin.config import BACKENDS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_info import header, run_info  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "crcd_cifar100_models", os.path.join(REPO, "examples", "cifar100", "models.py")
)
_models = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(_models)  # type: ignore[union-attr]
create_model = _models.create_model

CONFIGS = ("ce", "kd", "crcd_feature", "crcd_feature_gradient")
# The GPU run's table (benchmarks/gpu.sh call2): the default KD + CRCD with a memory bank.
BANK_CONFIGS = ("crcd_bank", "crcd_bank_eager", "crcd_bank_gradient")
# ``CRCDDistiller(student, teacher)`` with every default (no index: in-batch negatives, InfoNCE).
EXTRA_CONFIGS = ("crcd_default", "crcd_default_gradient") + BANK_CONFIGS
LABELS = {
    "crcd_default": "CRCDDistiller defaults, in-batch (feature)",
    "crcd_default_gradient": "CRCDDistiller defaults, in-batch + gradient element",
    "crcd_bank": "KD + CRCD, CRCDConfig() defaults, bank",
    "crcd_bank_eager": "KD + CRCD defaults, bank, backend eager",
    "crcd_bank_gradient": "KD + CRCD defaults, bank + gradient element",
    "ce": "CE only",
    "kd": "KD (0.1 CE + 0.9 KD, T 4)",
    "crcd_feature": "CRCD feature element (K 500, NCE)",
    "crcd_feature_gradient": "CRCD feature + gradient element (K 500, NCE)",
}
TRAIN_SET_SIZE = 50_000  # CIFAR-100: rows of the memory bank
# The standard KD recipe of CRD's and CRCD's code: 0.1 CE + 0.9 KD, T = 4.
KD_TASK_WEIGHT, KD_WEIGHT, KD_TEMPERATURE = 0.1, 0.9, 4.0
# The crcd_feature rows (unchanged since 0.2): CE + 0.9 KD (T 4) + 1.0 CRCD.
FEATURE_TASK_WEIGHT, FEATURE_WEIGHT = 1.0, 1.0
TARGET_RATIO = 1.3  # the default KD + CRCD step at most this many KD steps (the target on a GPU)


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
        loss = KD_TASK_WEIGHT * task_loss + KD_WEIGHT * kd_loss(logits, teacher_logits, KD_TEMPERATURE)
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

    # The input checks (a device-side assert on CUDA, a host check on CPU); "--no-checks" drops them.
    checked = dict(backend=backend, on_nonfinite="raise" if checks else "skip", check_index=checks)
    gradient = config.endswith("_gradient")
    if config in BANK_CONFIGS:
        if config == "crcd_bank_eager":
            checked["backend"] = "eager"
        crcd = CRCDConfig(gradient_element=gradient, relation=RelationConfig(**checked))
        return CRCDDistiller(student, teacher, "fc", "fc", crcd, num_samples=TRAIN_SET_SIZE)
    if config in EXTRA_CONFIGS:
        crcd = CRCDConfig(gradient_element=gradient, relation=RelationConfig(**checked))
        return CRCDDistiller(student, teacher, "fc", "fc", crcd)
    relation = RelationConfig(
        embed_dim=128, negatives="bank", num_negatives=num_negatives, temperature=0.05, objective="nce",
        momentum=0.5, **checked,
    )
    crcd = CRCDConfig(task_weight=FEATURE_TASK_WEIGHT, kd_weight=KD_WEIGHT, kd_temperature=KD_TEMPERATURE,
                      feature_weight=FEATURE_WEIGHT, gradient_element=gradient, relation=relation)
    return CRCDDistiller(student, teacher, "fc", "fc", crcd, num_samples=TRAIN_SET_SIZE)


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(config: str, device: torch.device, batch_size: int, num_negatives: int,
            steps: int, warmup: int, seed: int = 0, backend: str = "auto", checks: bool = True) -> Dict[str, Any]:
    """Time ``steps`` training steps of one configuration after ``warmup`` untimed ones."""
    torch.manual_seed(seed)
    compile_failures_before = len(rl._COMPILED.failures)
    rl._triton_refusals.clear()
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
    # A new batch of dataset indices every step, as a shuffled loader gives them (on the device in
    # advance, so that the host-to-device copy of a real loader is not timed here either).
    order = torch.randperm(TRAIN_SET_SIZE, device=device)
    batches = min(warmup + steps, TRAIN_SET_SIZE // batch_size)
    indices = [order[i * batch_size:(i + 1) * batch_size] for i in range(batches)]
    cuda = device.type == "cuda"
    count = [0]

    def step() -> Tensor:
        index = indices[count[0] % len(indices)]
        count[0] += 1
        out = objective(images, labels, index=index)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        return out["loss"].detach()

    rss_before = current_rss_bytes()
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    warmup_s = time.perf_counter() - start
    if cuda:
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
    relation_backend = None
    if hasattr(objective, "crcd_feature"):
        losses = [m for m in (objective.crcd_feature, objective.crcd_gradient) if m is not None]
        relation_backend = rl.resolve_backend(losses[0].config.backend, device) if losses else None
        # A backend that fell back to eager is reported, so its row is not read as that backend's.
        if relation_backend == "compile" and len(rl._COMPILED.failures) > compile_failures_before:
            relation_backend = "compile FAILED, ran eager"
        if relation_backend == "triton" and rl._triton_refusals:
            relation_backend = f"triton refused ({'; '.join(sorted(rl._triton_refusals))}), ran eager"
    result = {
        "config": config,
        "label": LABELS[config],
        "median_ms": 1000 * statistics.median(times),
        "min_ms": 1000 * min(times),
        "times_ms": [1000 * t for t in times],
        "warmup_s": warmup_s,
        "peak_mib": None if peak_bytes is None else peak_bytes / 2**20,
        "memory_kind": memory_kind,
        "relation_backend": relation_backend,
        "final_loss": float(loss),
    }
    return result


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
        **run_info(device),
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
        warmup_s=rounds[0]["warmup_s"],  # the first round's warm-up includes compiling
        warmup_s_rounds=[r["warmup_s"] for r in rounds],
        relation_backend=rounds[-1]["relation_backend"],
        median_ms=statistics.median(times),
        min_ms=min(times),
        times_ms=times,
        peak_mib=max(peaks) if peaks else None,
        final_loss=rounds[-1]["final_loss"],
    )
    return merged


def verdict(results: Sequence[Dict[str, Any]], target: float) -> Dict[str, Any]:
    """Whether the default KD + CRCD step (``crcd_bank``; else ``crcd_bank_eager``) is within
    ``target`` KD steps (median step time)."""
    rows = {r["config"]: r for r in results}
    kd = rows.get("kd")
    out: Dict[str, Any] = {"target": target}
    if kd is None or not ({"crcd_bank", "crcd_bank_eager"} & set(rows)):
        out["line"] = "verdict: n/a (needs kd and crcd_bank or crcd_bank_eager)"
        return out
    for config in ("crcd_bank", "crcd_bank_eager", "crcd_bank_gradient"):
        if config in rows:
            out[f"{config}_x_kd"] = rows[config]["median_ms"] / kd["median_ms"]
    config = "crcd_bank" if "crcd_bank" in rows else "crcd_bank_eager"
    ratio = out[f"{config}_x_kd"]
    out["within_target"] = ratio <= target
    backend = rows[config]["relation_backend"]
    judged = f"within the {target:g}x target" if ratio <= target else f"ABOVE the {target:g}x target"
    out["line"] = (f"verdict: default KD + CRCD ({config}, relation backend {backend}) step = {ratio:.2f}x "
                   f"the KD step: {judged}")
    if "crcd_bank_eager" in rows and config != "crcd_bank_eager":
        out["line"] += f" (backend eager: {out['crcd_bank_eager_x_kd']:.2f}x)"
    return out


def format_table(results: Sequence[Dict[str, Any]]) -> str:
    kd = next((r for r in results if r["config"] == "kd"), None)
    lines = ["| step | median ms | min ms | x KD time (median) | peak MiB | x KD memory | relation backend |",
             "|---|---|---|---|---|---|---|"]
    for row in results:
        time_ratio = f"{row['median_ms'] / kd['median_ms']:.2f}" if kd else "n/a"
        if row["peak_mib"] is None:
            memory, memory_ratio = "n/a", "n/a"
        else:
            memory = f"{row['peak_mib']:.0f}"
            memory_ratio = (f"{row['peak_mib'] / kd['peak_mib']:.2f}"
                            if kd and kd["peak_mib"] and kd["peak_mib"] > 0 else "n/a")
        lines.append(f"| {row['label']} | {row['median_ms']:.1f} | {row['min_ms']:.1f} | {time_ratio} "
                     f"| {memory} | {memory_ratio} | {row.get('relation_backend') or '-'} |")
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
    parser.add_argument("--target", type=float, default=TARGET_RATIO,
                        help="verdict line: crcd_bank's median step at most this many KD steps")
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
    if not args.quiet:
        print(header(run_info(device)), flush=True)

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
                gc.collect()  # the models of this configuration, before the next one's peak is measured
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            per_config[config].append(result)
            if not args.quiet:
                backend_note = f", relation backend {result['relation_backend']}" if result["relation_backend"] else ""
                print(f"round {round_index + 1}/{args.rounds} {result['label']:44s} "
                      f"{result['median_ms']:9.1f} ms  "
                      f"{'n/a' if result['peak_mib'] is None else format(result['peak_mib'], '.0f')} MiB "
                      f"({result['memory_kind']}; warm-up {result['warmup_s']:.1f} s{backend_note})", flush=True)
    results = [merge_rounds(per_config[config]) for config in args.configs]
    report = {
        "machine": machine_info(device),
        "setup": {"teacher": "resnet32x4", "student": "resnet8x4", "batch_size": args.batch_size,
                  "num_negatives": args.num_negatives, "input": "3x32x32 fp32", "steps": args.steps,
                  "backend": args.backend, "input_checks": args.checks,
                  "warmup": args.warmup, "rounds": args.rounds, "device": args.device,
                  "isolated": isolate, "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "results": results,
        "verdict": verdict(results, args.target),
    }
    if not args.quiet:
        print(format_table(results))
        print(report["verdict"]["line"])
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return report


if __name__ == "__main__":
    main()

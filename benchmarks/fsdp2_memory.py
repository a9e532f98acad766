"""Per-rank memory and step time of CRCDDistiller with FSDP2 (student fully_shard, teacher per block)
against DDP (student wrapped, teacher replicated), on 1, 2 and 4 gloo processes.

For each mode and world size, ``W`` processes run a few training steps of the same MLP models
(memory bank, gradient element). Reported per rank: the bytes of the teacher's parameters it holds
(exact, from the shards), the bytes of all the state it keeps between steps (parameters of both
models, gradients, optimizer state, CRCD buffers; exact), the peak resident memory of the measured
steps above the process's memory before any model existed (``VmHWM`` reset through
``/proc/self/clear_refs``: it also counts gathered blocks, activations, library workspaces and
allocator slack), the same peak above the memory right before those steps (what a step adds), and
the median step time. Under FSDP2 the teacher is built on the meta device and its shards materialised
after ``shard_teacher``, so that no rank ever holds it whole; its weights are random (a real run
loads them, e.g. with ``torch.distributed.checkpoint``).

    PYTHONPATH=$PWD python benchmarks/fsdp2_memory.py
    PYTHONPATH=$PWD python benchmarks/fsdp2_memory.py --ranks 1 2 4 --out benchmarks/results/fsdp2_memory_cpu.json
    PYTHONPATH=$PWD python benchmarks/fsdp2_memory.py --device cuda --ranks 1 2 4 --teacher-width 4096   # NCCL

With ``--device cuda`` each rank runs on its own GPU over NCCL, and the peaks are
``torch.cuda.max_memory_allocated()`` above the memory allocated before the models (exact, no
allocator slack).

Linux only (``/proc``) on CPU. The ranks run with ``MALLOC_MMAP_THRESHOLD_=65536`` (unless
``--glibc-default``): glibc otherwise raises its mmap threshold to the size of the largest buffer
freed so far, keeps later buffers of that size on its heap, and never returns them, so every freed
all-gathered block stays resident and FSDP2's peak looks larger than what is live (measured: 436 MiB
against 234 MiB for FSDP2 on 4 ranks, DDP unchanged). On a machine with fewer cores than ranks the step times measure
oversubscription as much as communication: compare modes at the same world size only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import crcd_plugin  # noqa: F401  (before init_process_group: docs/distributed.md, "Ending a run")
from crcd_plugin import CRCDConfig, CRCDDistiller, RelationConfig
from crcd_plugin.fsdp import shard_teacher

DIN, CLASSES, NUM_SAMPLES = 64, 10, 1024


class Block(nn.Module):
    """A transformer-style MLP block with a residual: what ``shard_teacher`` shards one by one."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.stem = nn.Linear(DIN, width)
        self.blocks = nn.Sequential(*(Block(width) for _ in range(depth)))
        self.fc = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)))


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # VmHWM := VmRSS


class _Memory:
    """Peak memory in KiB: resident memory on CPU (``/proc``), allocated memory on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        return torch.cuda.memory_allocated() / 1024 if self.cuda else _rss_kb("VmRSS")

    def peak(self) -> float:
        return torch.cuda.max_memory_allocated() / 1024 if self.cuda else _rss_kb("VmHWM")

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_peak()


def _teacher(mode: str, args: argparse.Namespace, device: torch.device) -> nn.Module:
    if mode == "ddp":
        return Net(args.teacher_width, args.teacher_depth).to(device)
    with torch.device("meta"):
        teacher = Net(args.teacher_width, args.teacher_depth)
    shard_teacher(teacher, [Block])
    teacher.to_empty(device=device)
    with torch.no_grad():
        for param in teacher.parameters():
            param.to_local().normal_(0.0, 0.02)  # type: ignore[attr-defined]
    return teacher


def _worker(rank: int, world: int, mode: str, args: argparse.Namespace, init: str, out: str) -> None:
    torch.set_num_threads(1)
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=world)
    memory = _Memory(device)
    baseline_kb = memory.now()
    torch.manual_seed(0)
    with torch.device("meta"):
        full_bytes = sum(p.numel() * p.element_size() for p in Net(args.teacher_width, args.teacher_depth).parameters())
    teacher = _teacher(mode, args, device)
    local = [p.to_local() if hasattr(p, "to_local") else p for p in teacher.parameters()]
    teacher_bytes = sum(t.numel() * t.element_size() for t in local)
    student = Net(args.student_width, args.student_depth).to(device)
    config = CRCDConfig(gradient_element=True, relation=RelationConfig(embed_dim=64, num_negatives=256))
    distiller = CRCDDistiller(student, teacher, "fc", "fc", config, num_samples=NUM_SAMPLES).to(device)
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in student.blocks:
            fully_shard(block)
        fully_shard(student)
    distiller.prepare_distributed(device_ids=[rank] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(rank)
    times = []
    for step in range(args.warmup + args.steps):
        x = torch.randn(args.batch, DIN, generator=g).to(device)
        y = torch.randint(0, CLASSES, (args.batch,), generator=g).to(device)
        index = torch.randint(0, NUM_SAMPLES, (args.batch,), generator=g).to(device)
        if step == args.warmup:
            resting_kb = memory.now()
            memory.reset_peak()  # the peak of the measured steps, allocator warmed up
        dist.barrier()
        start = time.perf_counter()
        distiller(x, y, index)["loss"].backward()
        distiller.sync_gradients()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak_kb = memory.peak()
    # Exact bytes this rank keeps between steps: parameters, gradients, optimizer state, CRCD buffers.
    tensors = [*distiller.parameters(), *distiller.buffers()]
    tensors += [p.grad for p in distiller.parameters() if p.grad is not None]
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    local_tensors = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    result = {
        "teacher_bytes": teacher_bytes, "teacher_full_bytes": full_bytes,
        "resident_state_bytes": sum(t.numel() * t.element_size() for t in local_tensors),
        "peak_step_mib": (peak_kb - baseline_kb) / 1024, "step_transient_mib": (peak_kb - resting_kb) / 1024,
        "step_ms": 1000 * statistics.median(times),
    }
    torch.save(result, os.path.join(out, f"{mode}.{world}.rank{rank}.pt"))
    distiller.release_distributed()
    dist.barrier()
    dist.destroy_process_group()


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--modes", nargs="+", default=["fsdp2", "ddp"], choices=["fsdp2", "ddp"])
    p.add_argument("--teacher-width", type=int, default=512)
    p.add_argument("--teacher-depth", type=int, default=8)
    p.add_argument("--student-width", type=int, default=256)
    p.add_argument("--student-depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=32, help="per rank")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: one GPU per rank, NCCL")
    p.add_argument("--glibc-default", action="store_true", help="keep glibc's dynamic mmap threshold")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if not args.glibc_default:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by the spawned ranks' allocator at start
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.ranks:
            for mode in args.modes:
                init = os.path.join(tmp, f"init.{mode}.{world}")
                mp.start_processes(_worker, args=(world, mode, args, init, tmp), nprocs=world, start_method="spawn")
                ranks = [torch.load(os.path.join(tmp, f"{mode}.{world}.rank{r}.pt")) for r in range(world)]
                full = ranks[0]["teacher_full_bytes"]
                row = {
                    "mode": mode, "ranks": world,
                    "teacher_param_mib_per_rank": max(r["teacher_bytes"] for r in ranks) / 2**20,
                    "teacher_share_of_one_copy": max(r["teacher_bytes"] for r in ranks) / full,
                    "state_mib_per_rank": max(r["resident_state_bytes"] for r in ranks) / 2**20,
                    "peak_step_rss_mib_per_rank": max(r["peak_step_mib"] for r in ranks),
                    "step_transient_rss_mib_per_rank": max(r["step_transient_mib"] for r in ranks),
                    "step_ms": max(r["step_ms"] for r in ranks),
                }
                rows.append(row)
                print(json.dumps(row))
    report = {
        "benchmark": "fsdp2_memory", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus, {platform.platform()}",
        "torch": torch.__version__, "commit": _commit(),
        "backend": "nccl (CUDA)" if args.device == "cuda" else "gloo (CPU)",
        "memory": "torch.cuda.max_memory_allocated" if args.device == "cuda" else "resident (VmHWM), "
                  f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'glibc default')}",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "teacher_full_mib": full / 2**20,
        "rows": rows,
    }
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Relation loss (scores + NCE, forward + backward): our kernels against the naive formulation.

The naive formulation builds the ``[B, A, K+1, D]`` relation tensor, as the reference code does.
Everything runs side by side in one process, on the same inputs.

    python benchmarks/relation.py                      # CPU, the grid that fits this machine
    python benchmarks/relation.py --device cuda --full # B in {32, 64, 256}, K in {500, 4096, 16384}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from crcd_plugin.kernels import run_relation_loss_core

IMPLEMENTATIONS = ("naive", "eager", "compile", "chunked", "triton")
DEFAULT_IMPLEMENTATIONS = ("naive", "eager", "compile")
CHUNK_SIZE = 512  # candidates per chunk of the "chunked" implementation (eager kernels)


def make_inputs(batch: int, num_negatives: int, dim: int, device: torch.device, seed: int = 0):
    """Bank-like inputs: anchors are the batch's rows, the positive of sample i is anchor i."""
    g = torch.Generator().manual_seed(seed)
    anchors = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    candidates = F.normalize(torch.randn(batch, num_negatives + 1, dim, generator=g), dim=-1)
    candidates[:, 0] = anchors
    query = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    return query.to(device).requires_grad_(), anchors.to(device), candidates.to(device)


def step_fn(impl: str, query, anchors, candidates) -> Callable[[], None]:
    # The training steady state: NCE's constant is fixed (eager/compiled cores compute a fresh one
    # anyway; the Triton kernel skips that pass once it is fixed).
    log_z = torch.full((), 10.0, device=query.device)
    z_ready = torch.ones((), dtype=torch.bool, device=query.device)

    def step() -> None:
        loss, _ = run_relation_loss_core(
            "eager" if impl == "chunked" else impl, query, anchors, candidates, log_z, z_ready, None,
            temperature=0.05, eps=1e-6, objective="nce", num_samples=50000,
            chunk_size=CHUNK_SIZE if impl == "chunked" else None,
        )
        loss.backward()
        query.grad = None

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(step: Callable[[], None], device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def peak_bytes(impl: str, batch: int, num_negatives: int, dim: int, device: torch.device) -> Optional[int]:
    """Peak bytes one forward+backward allocates above what was allocated before it.

    CUDA: the caching allocator's peak. CPU: the peak resident set of a fresh process during its
    second step, above its resident set just before that step.
    """
    if device.type == "cuda":
        query, anchors, candidates = make_inputs(batch, num_negatives, dim, device)
        step = step_fn(impl, query, anchors, candidates)
        step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    command = [sys.executable, __file__, "--cpu-peak-probe", impl, str(batch), str(num_negatives), str(dim)]
    # Blocks of 64 KiB and more are mmap'ed and returned on free, so the resident set follows the
    # live tensors instead of keeping freed heap pages of the warm-up step.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return int(result.stdout.strip().splitlines()[-1])


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_probe(impl: str, batch: int, num_negatives: int, dim: int) -> int:
    """Runs in a fresh process: resident-set peak of one step above the resident set before it.

    A first step warms up (and compiles); the high-water mark is then reset (``clear_refs``), which
    also drops what fork+exec inherited from the parent, and the second step is measured.
    """
    query, anchors, candidates = make_inputs(batch, num_negatives, dim, torch.device("cpu"))
    step = step_fn(impl, query, anchors, candidates)
    step()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = _status_bytes("VmRSS")
    step()
    return max(_status_bytes("VmHWM") - before, 0)


def estimated_bytes(impl: str, batch: int, num_negatives: int, dim: int) -> float:
    """A rough upper bound used only to skip configurations that cannot fit."""
    scores = batch * batch * (num_negatives + 1) * 4
    if impl == "triton":  # inputs, residuals and a chunk of the nearest-anchor search only
        return batch * (num_negatives + 1) * dim * 4 * 4 + 2**24 * 4
    if impl == "chunked":
        chunk_scores = batch * batch * min(CHUNK_SIZE, num_negatives + 1) * 4
        return chunk_scores * 14 + batch * (num_negatives + 1) * dim * 4 * 3
    return scores * dim * 3 if impl == "naive" else scores * 14


def run(args: argparse.Namespace) -> Dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        budget = torch.cuda.get_device_properties(device).total_memory * 0.85
        name = torch.cuda.get_device_name(device)
    else:
        budget = args.cpu_memory_gib * 2**30
        name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    batches = [32, 64, 256] if args.full else args.batch
    negatives = [500, 4096, 16384] if args.full else args.negatives
    rows: List[Dict] = []
    for batch in batches:
        for num_negatives in negatives:
            row: Dict = {"B": batch, "K": num_negatives, "D": args.dim}
            for impl in args.impl:
                if impl == "triton" and device.type != "cuda":
                    row[impl] = {"status": "needs CUDA"}  # the interpreter is for correctness only
                    continue
                if estimated_bytes(impl, batch, num_negatives, args.dim) > budget:
                    row[impl] = {"status": "does not fit"}
                    continue
                query, anchors, candidates = make_inputs(batch, num_negatives, args.dim, device)
                step = step_fn(impl, query, anchors, candidates)
                try:
                    ms = time_ms(step, device, args.repeats, warmup=2 if impl in ("compile", "triton") else 1)
                    del step
                    peak = peak_bytes(impl, batch, num_negatives, args.dim, device)
                    row[impl] = {"status": "ok", "ms": ms, "peak_mib": None if peak is None else peak / 2**20}
                except torch.OutOfMemoryError:
                    row[impl] = {"status": "out of memory"}
                del query, anchors, candidates
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            naive = row.get("naive", {})
            compiled = row.get("compile", {})
            if compiled.get("status") == "ok" and row.get("triton", {}).get("status") == "ok":
                row["triton"]["speedup_vs_compile"] = compiled["ms"] / row["triton"]["ms"]
            for impl in ("eager", "compile", "chunked", "triton"):
                ours = row.get(impl, {})
                if naive.get("status") == "ok" and ours.get("status") == "ok":
                    ours["speedup_vs_naive"] = naive["ms"] / ours["ms"]
                    if ours["peak_mib"] is not None and naive["peak_mib"]:
                        ours["memory_fraction_of_naive"] = ours["peak_mib"] / naive["peak_mib"]
            rows.append(row)
            print(format_row(row, args.impl), flush=True)
    return {
        "benchmark": "relation loss forward+backward (NCE), A = B anchors, fp32",
        "device": name,
        "torch": torch.__version__,
        "date": date.today().isoformat(),
        "rows": rows,
    }


def format_row(row: Dict, impls) -> str:
    cells = [f"B={row['B']:>4} K={row['K']:>6}"]
    for impl in impls:
        result = row.get(impl, {})
        if result.get("status") != "ok":
            cells.append(f"{impl}: {result.get('status', '-')}")
            continue
        memory = "n/a" if result["peak_mib"] is None else f"{result['peak_mib']:.1f}"
        text = f"{impl}: {result['ms']:9.2f} ms {memory:>9} MiB"
        if "speedup_vs_naive" in result:
            text += f" ({result['speedup_vs_naive']:.1f}x faster"
            if "memory_fraction_of_naive" in result:
                text += f", {result['memory_fraction_of_naive']:.3f}x memory"
            text += ")"
        if "speedup_vs_compile" in result:
            text += f" ({result['speedup_vs_compile']:.2f}x compile's speed)"
        cells.append(text)
    return " | ".join(cells)


def plot(results: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    labels = [f"B={r['B']}\nK={r['K']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows) + 4), 4.2))
    impls = [impl for impl in IMPLEMENTATIONS if any(impl in row for row in rows)]
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        for ax, key in zip(axes, ("ms", "peak_mib")):
            kept = [(j, r[impl][key]) for j, r in enumerate(rows) if r.get(impl, {}).get(key) is not None]
            xs = [j + (i - (len(impls) - 1) / 2) * width for j, _ in kept]
            ys = [value for _, value in kept]
            ax.bar(xs, ys, width, label=impl)
    for ax, title in zip(axes, ("time per forward+backward (ms)", "peak memory (MiB)")):
        ax.set_yscale("log")
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"CRCD relation loss, D=128, A=B, fp32 - {results['device']} ({results['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--cpu-peak-probe"]:
        impl, batch, num_negatives, dim = argv[1], *map(int, argv[2:5])
        print(cpu_peak_probe(impl, batch, num_negatives, dim))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--negatives", type=int, nargs="+", default=[500, 4096])
    parser.add_argument("--full", action="store_true", help="B in {32, 64, 256} x K in {500, 4096, 16384}")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument(
        "--impl", nargs="+", default=list(DEFAULT_IMPLEMENTATIONS), choices=IMPLEMENTATIONS,
        help=f"implementations to run; chunked = eager kernels over chunks of {CHUNK_SIZE} candidates; "
        "triton = the Triton kernel (CUDA only)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu-memory-gib", type=float, default=16.0, help="skip CPU configs estimated above this")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the memory probes run in subprocesses
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"relation_{torch.device(args.device).type}"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.json and .png")


if __name__ == "__main__":
    main()

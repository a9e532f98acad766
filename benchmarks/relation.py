"""Relation loss (scores + NCE, forward + backward): our kernels against the naive formulation.

The naive formulation builds the ``[B, A, K+1, D]`` relation tensor, as the reference code does.
Everything runs side by side in one process, on the same inputs.

    python benchmarks/relation.py                      # CPU, the grid that fits this machine
    python benchmarks/relation.py --device cuda --full # B in {32, 64, 256}, K in {500, 4096, 16384}

With ``--layout batch`` or ``--layout queue`` every sample has the same candidates (in-batch
negatives, K = B - 1; or K queue rows plus a per-sample positive): ``eager``, ``compile``,
``chunked`` and ``triton`` then run the shared-candidate cores, ``per-sample`` the per-sample eager
core on the expanded ``[B, K+1, D]`` candidates (what ``CRCDLoss`` ran before), ``naive`` the
reference formulation on them.

    python benchmarks/relation.py --layout batch --batch 32 64 256 --impl naive per-sample eager
    python benchmarks/relation.py --layout queue --batch 32 64 256 --negatives 500 4096 --impl naive per-sample eager
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
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import crcd_plugin.relation_loss as rl
from crcd_plugin.memory import in_batch_candidate_index
from crcd_plugin.relation_loss import relation_loss

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_info import header, run_info  # noqa: E402

IMPLEMENTATIONS = ("naive", "per-sample", "eager", "compile", "chunked", "triton")
LAYOUTS = ("per-sample", "batch", "queue")
# "process": CPU time of this process, for a single-threaded run on a machine that others share
# (wall time there measures the other processes as much as ours).
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
DEFAULT_IMPLEMENTATIONS = ("naive", "eager", "compile")
CHUNK_SIZE = 512  # candidates per chunk of the "chunked" implementation (eager kernels); --chunk-size


def make_inputs(batch: int, num_negatives: int, dim: int, device: torch.device, seed: int = 0):
    """Bank-like inputs: anchors are the batch's rows, the positive of sample i is anchor i."""
    g = torch.Generator().manual_seed(seed)
    anchors = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    candidates = F.normalize(torch.randn(batch, num_negatives + 1, dim, generator=g), dim=-1)
    candidates[:, 0] = anchors
    query = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    return query.to(device).requires_grad_(), anchors.to(device), candidates.to(device)


def make_shared_inputs(layout: str, batch: int, num_negatives: int, dim: int, device: torch.device, seed: int = 0):
    """Shared candidates: the anchors are the other side's batch (A = B); in-batch, the candidates
    are that batch too (positive of sample i = candidate i = anchor i), else ``K`` queue rows and
    that batch as the positives."""
    g = torch.Generator().manual_seed(seed)
    other = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    query = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    if layout == "batch":
        candidates, positives = other, None
    else:
        candidates, positives = F.normalize(torch.randn(num_negatives, dim, generator=g), dim=-1), other
    moved = [None if x is None else x.to(device) for x in (other, candidates, positives)]
    return query.to(device).requires_grad_(), *moved


def shared_step_fn(impl: str, query, anchors, candidates, positives) -> Callable[[], None]:
    """One step of the shared-candidate cores, or (per-sample, naive) of the per-sample cores on the
    candidates expanded inside the step, as ``CRCDLoss`` did before it shared them."""
    log_z = torch.full((), 10.0, device=query.device)
    z_ready = torch.ones((), dtype=torch.bool, device=query.device)
    options = dict(temperature=0.05, eps=1e-6, objective="nce", noise_size=50000)

    def step() -> None:
        if impl in ("per-sample", "naive"):
            if positives is None:
                expanded = candidates[in_batch_candidate_index(query.shape[0], query.device)]
            else:
                expanded = torch.cat([positives[:, None], candidates[None].expand(query.shape[0], -1, -1)], dim=1)
            backend = "eager" if impl == "per-sample" else "naive"
            loss, _ = relation_loss(backend, query, anchors, expanded, None, log_z, z_ready, None, **options)
        else:
            loss, _ = relation_loss(
                "eager" if impl == "chunked" else impl, query, anchors, candidates, positives, log_z, z_ready,
                chunk_size=CHUNK_SIZE if impl == "chunked" else None, **options,
            )
        loss.backward()
        query.grad = None

    return step


def make_step(layout: str, impl: str, batch: int, num_negatives: int, dim: int, device: torch.device):
    if layout == "per-sample":
        return step_fn(impl, *make_inputs(batch, num_negatives, dim, device))
    return shared_step_fn(impl, *make_shared_inputs(layout, batch, num_negatives, dim, device))


def step_fn(impl: str, query, anchors, candidates) -> Callable[[], None]:
    # The training steady state: NCE's constant is fixed (eager/compiled cores compute a fresh one
    # anyway; the Triton kernel skips that pass once it is fixed).
    log_z = torch.full((), 10.0, device=query.device)
    z_ready = torch.ones((), dtype=torch.bool, device=query.device)

    def step() -> None:
        loss, _ = relation_loss(
            "eager" if impl == "chunked" else impl, query, anchors, candidates, None, log_z, z_ready, None,
            temperature=0.05, eps=1e-6, objective="nce", noise_size=50000,
            chunk_size=CHUNK_SIZE if impl == "chunked" else None,
        )
        loss.backward()
        query.grad = None

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    step: Callable[[], None],
    device: torch.device,
    repeats: int,
    warmup: int,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    for _ in range(warmup):
        step()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = clock()
        step()
        synchronize(device)
        samples.append((clock() - start) * 1e3)
    return statistics.median(samples)


def peak_bytes(
    impl: str, batch: int, num_negatives: int, dim: int, device: torch.device, layout: str = "per-sample"
) -> Optional[int]:
    """Peak bytes one forward+backward allocates above what was allocated before it.

    CUDA: the caching allocator's peak. CPU: the peak resident set of a fresh process during its
    second step, above its resident set just before that step.
    """
    if device.type == "cuda":
        step = make_step(layout, impl, batch, num_negatives, dim, device)
        step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    command = [sys.executable, __file__, "--cpu-peak-probe", impl, str(batch), str(num_negatives), str(dim), layout,
               str(CHUNK_SIZE)]
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


def cpu_peak_probe(impl: str, batch: int, num_negatives: int, dim: int, layout: str = "per-sample") -> int:
    """Runs in a fresh process: resident-set peak of one step above the resident set before it.

    A first step warms up (and compiles); the high-water mark is then reset (``clear_refs``), which
    also drops what fork+exec inherited from the parent, and the second step is measured.
    """
    step = make_step(layout, impl, batch, num_negatives, dim, torch.device("cpu"))
    step()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = _status_bytes("VmRSS")
    step()
    return max(_status_bytes("VmHWM") - before, 0)


def estimated_bytes(impl: str, batch: int, num_negatives: int, dim: int, layout: str = "per-sample") -> float:
    """A rough upper bound used only to skip configurations that cannot fit."""
    scores = batch * batch * (num_negatives + 1) * 4
    if layout != "per-sample" and impl not in ("naive", "per-sample"):
        shared = batch * (num_negatives + 1) * dim * 4 * 3  # [A, M, D] relations (A = B), when D <= B
        if impl == "chunked":
            chunk = min(CHUNK_SIZE, num_negatives + 1)
            return batch * batch * chunk * 4 * 10 + shared * chunk / (num_negatives + 1)
        return shared + (batch * (num_negatives + 1) * dim * 4 if impl == "triton" else scores * 10)
    if impl == "per-sample":
        impl = "eager"
    if impl == "triton":  # inputs, residuals and a chunk of the nearest-anchor search only
        return batch * (num_negatives + 1) * dim * 4 * 4 + 2**24 * 4
    if impl == "chunked":
        chunk_scores = batch * batch * min(CHUNK_SIZE, num_negatives + 1) * 4
        return chunk_scores * 14 + batch * (num_negatives + 1) * dim * 4 * 3
    return scores * dim * 3 if impl == "naive" else scores * 14


def run(args: argparse.Namespace, on_row: Optional[Callable[[Dict], None]] = None) -> Dict:
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
    settings = dict(batch=batches, negatives=negatives, dim=args.dim, layout=args.layout, impl=args.impl,
                    repeats=args.repeats, clock=args.clock, chunk_size=CHUNK_SIZE, naive_max_gib=args.naive_max_gib)
    results = {
        "benchmark": "relation loss forward+backward (NCE), A = B anchors, fp32",
        **run_info(device, settings),
        "layout": args.layout,
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "device": name,
        "chunk_size": CHUNK_SIZE,
        "rows": rows,
    }
    # Naive rows of an earlier run on the same device (--baseline): compared with, not re-timed.
    baseline = {}
    if args.baseline is not None and args.baseline.exists():
        for old in json.loads(args.baseline.read_text()).get("rows", []):
            if old.get("naive", {}).get("status") is not None:
                baseline[(old["B"], old["K"], old["D"])] = {**old["naive"], "from": args.baseline.name}
    print(header(results), flush=True)
    for batch in batches:
        # In-batch negatives: K = B - 1, whatever --negatives says.
        for num_negatives in [batch - 1] if args.layout == "batch" else negatives:
            row: Dict = {"B": batch, "K": num_negatives, "D": args.dim, "layout": args.layout}
            for impl in args.impl:
                if impl == "triton" and device.type != "cuda":
                    row[impl] = {"status": "needs CUDA"}  # the interpreter is for correctness only
                    continue
                if impl == "per-sample" and args.layout == "per-sample":
                    row[impl] = {"status": "same as eager"}
                    continue
                naive_gib = batch * batch * (num_negatives + 1) * args.dim * 4 / 2**30  # the [B, A, K+1, D] tensor
                if impl == "naive" and args.naive_max_gib is not None and naive_gib > args.naive_max_gib:
                    row[impl] = {"status": f"skipped: [B, A, K+1, D] is {naive_gib:.1f} GiB > {args.naive_max_gib:g}"}
                    continue
                if impl == "chunked" and CHUNK_SIZE >= (batch if args.layout == "batch" else num_negatives + 1):
                    row[impl] = {"status": f"not chunked (chunk_size {CHUNK_SIZE} >= candidates)"}
                    continue
                if estimated_bytes(impl, batch, num_negatives, args.dim, args.layout) > budget:
                    row[impl] = {"status": "does not fit"}
                    continue
                step = make_step(args.layout, impl, batch, num_negatives, args.dim, device)
                failures_before = len(rl._COMPILED.failures)
                rl._triton_refusals.clear()
                try:
                    warmup = 2 if impl in ("compile", "triton") else 1
                    start = time.perf_counter()
                    ms = time_ms(step, device, args.repeats, warmup, CLOCKS[args.clock])
                    seconds = time.perf_counter() - start
                    del step
                    peak = peak_bytes(impl, batch, num_negatives, args.dim, device, args.layout)
                    row[impl] = {"status": "ok", "ms": ms, "peak_mib": None if peak is None else peak / 2**20,
                                 "seconds_with_warmup": round(seconds, 2)}
                except torch.OutOfMemoryError:
                    row[impl] = {"status": "out of memory"}
                # A backend that ran eager instead is not that backend: say so rather than time it.
                if impl == "compile" and len(rl._COMPILED.failures) > failures_before:
                    error = list(rl._COMPILED.failures.values())[-1]
                    row[impl] = {"status": f"compile failed, ran eager: {type(error).__name__}: {str(error)[:200]}"}
                if impl == "triton" and rl._triton_refusals:
                    row[impl] = {"status": f"triton refused ({'; '.join(sorted(rl._triton_refusals))})"}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if "naive" not in row and (batch, num_negatives, args.dim) in baseline:
                row["naive"] = baseline[(batch, num_negatives, args.dim)]
            naive = row.get("naive", {})
            compiled = row.get("compile", {})
            if compiled.get("status") == "ok" and row.get("triton", {}).get("status") == "ok":
                row["triton"]["speedup_vs_compile"] = compiled["ms"] / row["triton"]["ms"]
            per_sample = row.get("per-sample", {})
            for impl in ("per-sample", "eager", "compile", "chunked", "triton"):
                ours = row.get(impl, {})
                if naive.get("status") == "ok" and ours.get("status") == "ok":
                    ours["speedup_vs_naive"] = naive["ms"] / ours["ms"]
                    if ours["peak_mib"] is not None and naive["peak_mib"]:
                        ours["memory_fraction_of_naive"] = ours["peak_mib"] / naive["peak_mib"]
                if impl != "per-sample" and per_sample.get("status") == "ok" and ours.get("status") == "ok":
                    ours["speedup_vs_per_sample"] = per_sample["ms"] / ours["ms"]
            rows.append(row)
            print(format_row(row, args.impl), flush=True)
            if on_row is not None:  # partial results survive a run that is stopped
                on_row(results)
    return results


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
        if "speedup_vs_per_sample" in result:
            text += f" ({result['speedup_vs_per_sample']:.1f}x per-sample's speed)"
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
    layout = results.get("layout", "per-sample")
    title = f"CRCD relation loss ({layout} candidates), D={rows[0]['D']}, A=B, fp32"
    fig.suptitle(f"{title} - {results['device']} ({results['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    global CHUNK_SIZE
    if argv[:1] == ["--cpu-peak-probe"]:
        impl, batch, num_negatives, dim = argv[1], *map(int, argv[2:5])
        CHUNK_SIZE = int(argv[6])
        print(cpu_peak_probe(impl, batch, num_negatives, dim, argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--negatives", type=int, nargs="+", default=[500, 4096])
    parser.add_argument("--full", action="store_true", help="B in {32, 64, 256} x K in {500, 4096, 16384}")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument(
        "--layout", default="per-sample", choices=LAYOUTS,
        help="per-sample candidates (bank), or shared ones: in-batch (K = B - 1) or a queue of K rows",
    )
    parser.add_argument(
        "--impl", nargs="+", default=list(DEFAULT_IMPLEMENTATIONS), choices=IMPLEMENTATIONS,
        help=f"implementations to run; chunked = eager kernels over chunks of {CHUNK_SIZE} candidates; "
        "triton = the Triton kernel (CUDA only)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS), help="process: CPU time (use --threads 1)")
    parser.add_argument("--cpu-memory-gib", type=float, default=16.0, help="skip CPU configs estimated above this")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--chunk-size", type=int, default=CHUNK_SIZE, help="candidates per chunk of 'chunked'")
    parser.add_argument("--naive-max-gib", type=float, default=None,
                        help="skip naive where its [B, A, K+1, D] fp32 tensor alone is above this many GiB")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="an earlier JSON of this script on the same device: its naive rows are the reference")
    parser.add_argument("--tag", default="", help="suffix of the output files' names")
    parser.add_argument("--no-plot", dest="plot", action="store_false", help="write the JSON only")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    CHUNK_SIZE = args.chunk_size
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the memory probes run in subprocesses
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"relation_{torch.device(args.device).type}"
    if args.layout != "per-sample":
        stem += f"_shared_{args.layout}"
    if args.tag:
        stem += f"_{args.tag}"
    results = run(args, on_row=lambda partial: (args.out / f"{stem}.json").write_text(json.dumps(partial, indent=2)))
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    if args.plot and results["rows"]:
        plot(results, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.json" + (" and .png" if args.plot and results["rows"] else ""))


if __name__ == "__main__":
    main()

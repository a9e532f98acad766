"""Every relation-loss backend against the naive formulation in float64, on one device.

The unit tests run on CPU only (Triton under its interpreter); this is the same check for a GPU, to
run before timing anything there. Backends: ``eager``, ``compile``, ``triton`` and ``chunked``
(the eager kernels with ``chunk_size`` below the number of candidates, the chunk-and-checkpoint
reducer). Two parts, each forward loss and backward gradient:

* **core** (fp32): ``relation_loss`` itself on bank-like inputs (an exact and a near-duplicate
  candidate per row, two close anchors), per-sample candidates ``[B, K+1, D]`` and shared ones
  (in-batch; a queue with the positives apart), NCE and InfoNCE, against ``backend="naive"`` in
  float64 on the same inputs. Tolerance: 1e-4 relative (loss; gradient relative to its largest
  entry).
* **module** (fp32, bf16 autocast, fp16 autocast with a ``GradScaler``): a whole ``CRCDLoss``
  (heads, memory bank / queue / in-batch, both sides where symmetric), fed features in that dtype
  under ``torch.autocast``, against a float64 copy of the same module (``backend="naive"``) fed the
  same feature values, from the same state and the same random draws. The heads and the loss core
  run in fp32 under autocast (docs/api.md, "Precision"), so the loss and the head-parameter
  gradients keep the fp32 tolerance, 1e-4; the gradient of the low-precision feature is rounded to
  its dtype, so it gets 1e-2 (bf16) or 2e-3 (fp16) relative to its largest entry.

A backend that did not run as itself counts as a failure: ``compile`` whose compile failed (the
library then runs eager, with a warning), ``triton`` that refused the inputs. ``torch.compile``
runs last, family by family (one family = one option set and candidate layout, compiled once with
``dynamic=True``), most used first, and stops starting new families once ``--compile-budget-s``
is spent (the skipped ones are listed; they are not failures). Exit status 1 on any failure, after
the results are written.

    python benchmarks/check_backends.py --device cuda --json check_backends_cuda.json
    TRITON_INTERPRET=1 python benchmarks/check_backends.py --device cpu --smoke   # tiny, a few minutes
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import crcd_plugin.relation_loss as rl
from crcd_plugin import RelationConfig
from crcd_plugin.functional import infonce_loss, nce_log_normalizer, nce_loss
from crcd_plugin.kernels import naive_relation_logits
from crcd_plugin.loss import CRCDLoss
from crcd_plugin.memory import in_batch_candidate_index
from crcd_plugin.relation_loss import relation_loss

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_info import header, run_info  # noqa: E402

TAU, EPS, N = 0.05, 1e-6, 50_000
BACKENDS = ("eager", "compile", "triton", "chunked")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = 1e-4  # fp32 kernels against a float64 reference: loss, and gradients relative to their largest entry
FEATURE_GRAD_TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2, "fp16": 2e-3}  # a gradient stored in that dtype
# (B, A, K+1, D): small; anchor blocks and candidate tiles that do not divide; A > 64; D = 128.
SHAPES = [(4, 5, 70, 24), (8, 70, 130, 16), (32, 32, 501, 128)]
SHARED_SHAPES = [(6, 70, 24), (64, 501, 32), (16, 130, 128)]  # (B, queue rows, D): D > B and D <= B
SMOKE_SHAPES = [(4, 5, 70, 24), (8, 70, 130, 16)]
SMOKE_SHARED_SHAPES = [(6, 70, 24), (24, 50, 16)]
# torch.compile families, most used first: (objective, candidate layout). In-batch candidates run
# with NCE's N = 1, what CRCDLoss passes for them, so that the module checks reuse the compile.
FAMILIES = [("infonce", "first"), ("nce", "first"), ("infonce", "diagonal"), ("infonce", "separate"),
            ("nce", "diagonal"), ("nce", "separate")]


def noise_size(layout: str) -> int:
    return 1 if layout == "diagonal" else N


def chunk_for(num_candidates: int) -> int:
    """A chunk size that splits the candidates into three or four chunks."""
    return max(1, min(num_candidates - 1, math.ceil(num_candidates / 3)))


def rel_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.detach().double(), reference.detach().double()
    if reference.dim() == 0:
        return ((value - reference).abs() / reference.abs().clamp_min(1e-12)).item()
    return ((value - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------- core: relation_loss, fp32
def bank_like(batch: int, num_anchors: int, num_candidates: int, dim: int, device: torch.device):
    """Positives equal to anchors, an exact and a 1e-3-near duplicate per row, two close anchors."""
    g = torch.Generator().manual_seed(batch * 1000 + num_candidates)
    anchors = F.normalize(torch.randn(num_anchors, dim, generator=g), dim=-1)
    anchors[1] = F.normalize(anchors[0] + 1e-3 * torch.randn(dim, generator=g), dim=-1)
    candidates = F.normalize(torch.randn(batch, num_candidates, dim, generator=g), dim=-1)
    rows = torch.arange(batch) % num_anchors
    candidates[:, 0] = anchors[rows]
    candidates[:, 3] = anchors[(rows + 2) % num_anchors]
    near = anchors[(rows + 1) % num_anchors] + 1e-3 * F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    candidates[:, 5] = near
    student = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    return student.to(device), anchors.to(device), candidates.to(device)


def shared_like(batch: int, num_queue: int, dim: int, device: torch.device):
    """Shared candidates: anchors = the batch's other side; a queue with a row equal to an anchor."""
    student, other, _ = bank_like(batch, batch, 6, dim, device)  # other[1] is 1e-3 from other[0]
    queue = F.normalize(torch.randn(num_queue, dim, generator=torch.Generator().manual_seed(num_queue)), dim=-1)
    queue = queue.to(device)
    queue[3] = other[2]
    return student, other, queue


def reference_core(student, anchors, per_sample_candidates, objective: str, noise: int):
    query = student.double().requires_grad_()
    logits = naive_relation_logits(query, anchors.double(), per_sample_candidates.double(), TAU, EPS)
    if objective == "infonce":
        loss = infonce_loss(logits)
    else:
        loss = nce_loss(logits, nce_log_normalizer(logits, noise), noise)
    loss.backward()
    return loss.detach(), query.grad


def run_core(backend: str, student, anchors, candidates, positives, objective: str, noise: int):
    query = student.clone().requires_grad_()
    device = student.device
    chunk = chunk_for(candidates.shape[-2]) if backend == "chunked" else None
    loss, _ = relation_loss(
        "eager" if backend == "chunked" else backend, query, anchors, candidates, positives,
        torch.zeros((), device=device), torch.zeros((), dtype=torch.bool, device=device),
        temperature=TAU, eps=EPS, objective=objective, noise_size=noise, chunk_size=chunk,
    )
    loss.backward()
    return loss.detach(), query.grad


def core_jobs(device: torch.device, smoke: bool) -> List[Dict[str, Any]]:
    jobs = []
    for shape in SMOKE_SHAPES if smoke else SHAPES:
        for objective in ("nce", "infonce"):
            jobs.append(dict(part="core", layout="first", objective=objective, dtype="fp32",
                             case=f"per-sample B,A,K+1,D={shape}", make=("bank", shape)))
    for batch, num_queue, dim in SMOKE_SHARED_SHAPES if smoke else SHARED_SHAPES:
        for layout in ("diagonal", "separate"):
            for objective in ("nce", "infonce"):
                name = "in-batch" if layout == "diagonal" else "queue"
                size = batch if layout == "diagonal" else num_queue
                case = f"shared {name} B,M,D={(batch, size, dim)}"
                jobs.append(dict(part="core", layout=layout, objective=objective, dtype="fp32", case=case,
                                 make=("shared", (batch, num_queue, dim))))
    return jobs


def core_inputs(job: Dict[str, Any], device: torch.device, cache: Dict) -> Tuple:
    """(student, anchors, candidates, positives, per-sample candidates) of a core job, built once."""
    key = (job["make"], job["layout"])
    if key not in cache:
        kind, shape = job["make"]
        if kind == "bank":
            student, anchors, candidates = bank_like(*shape, device)
            cache[key] = (student, anchors, candidates, None, candidates)
        else:
            student, other, queue = shared_like(*shape, device)
            if job["layout"] == "diagonal":
                cache[key] = (student, other, other, None, other[in_batch_candidate_index(shape[0], device)])
            else:
                per_sample = torch.cat([other[:, None], queue[None].expand(shape[0], -1, -1)], dim=1)
                cache[key] = (student, other, queue, other, per_sample)
    return cache[key]


def check_core(job: Dict[str, Any], backend: str, device: torch.device, cache: Dict, refs: Dict) -> Dict[str, Any]:
    student, anchors, candidates, positives, per_sample = core_inputs(job, device, cache)
    noise = noise_size(job["layout"])
    ref_key = (job["case"], job["objective"])
    if ref_key not in refs:
        refs[ref_key] = reference_core(student, anchors, per_sample, job["objective"], noise)
    ref_loss, ref_grad = refs[ref_key]
    loss, grad = run_core(backend, student, anchors, candidates, positives, job["objective"], noise)
    errors = {"loss": rel_err(loss, ref_loss), "grad": rel_err(grad, ref_grad)}
    tolerances = {"loss": TOLERANCE, "grad": TOLERANCE}
    return {"errors": errors, "tolerances": tolerances}


# ---------------------------------------------------------------------- module: CRCDLoss under autocast
MODULE_CASES = {
    # name: (RelationConfig changes, num_samples, objective, layout)
    "bank nce, all anchors, symmetric (reference layout)": (
        dict(negatives="bank", objective="nce", num_anchors=None, symmetric=True, memory_init="cold"),
        N, "nce", "first"),
    "bank infonce, 2 anchors, first write (defaults' layout)": (
        dict(negatives="bank", objective="infonce"), N, "infonce", "first"),
    "queue infonce, symmetric": (
        dict(negatives="queue", queue_size=N, objective="infonce", symmetric=True), None, "infonce", "separate"),
    "in-batch infonce": (dict(negatives="batch", objective="infonce"), None, "infonce", "diagonal"),
}
MODULE_BATCH, MODULE_K, STUDENT_DIM, TEACHER_DIM, EMBED_DIM = 24, 300, 48, 80, 32


def module_jobs(dtypes: List[str]) -> List[Dict[str, Any]]:
    return [dict(part="module", layout=layout, objective=objective, dtype=dtype, case=name)
            for dtype in dtypes for name, (_, _, objective, layout) in MODULE_CASES.items()]


def make_module(
    name: str, device: torch.device, batch: int, num_negatives: int
) -> Tuple[CRCDLoss, Optional[torch.Tensor]]:
    changes, num_samples, _, _ = MODULE_CASES[name]
    changes = dict(changes)
    if changes["negatives"] != "batch":
        changes["num_negatives"] = num_negatives
    config = RelationConfig(embed_dim=EMBED_DIM, temperature=TAU, eps=EPS, backend="eager", **changes)
    torch.manual_seed(7)
    module = CRCDLoss(STUDENT_DIM, TEACHER_DIM, config, num_samples=num_samples).to(device).train()
    index = torch.randperm(num_samples, device=device)[:batch] if num_samples is not None else None
    return module, index


def module_step(module: CRCDLoss, student_feat, teacher_feat, index, dtype: Optional[torch.dtype], device):
    """One forward + backward; ``dtype`` fp16 goes through a GradScaler. Returns (loss, grads by name, note)."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params + [student_feat], lr=0.0)
    use_scaler = dtype == torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    note = ""
    for _attempt in range(8):  # a first scale that overflows fp16 is halved, as in training
        state = copy.deepcopy(module.state_dict())
        optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(1234)  # the same anchors and negatives for every backend and the reference
        with contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype):
            # The feature as a network under autocast hands it over: in ``dtype``, cast from an fp32 leaf.
            loss = module(student_feat if dtype is None else student_feat.to(dtype), teacher_feat, index)
        scaler.scale(loss).backward()
        if not use_scaler:
            break
        scaler.unscale_(optimizer)
        finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params + [student_feat])
        if finite:
            note = f"GradScaler scale {scaler.get_scale():g}"
            break
        scaler.step(optimizer)  # skipped: inf found
        scaler.update()
        module.load_state_dict(state)  # the step wrote the memory: start again from the same state
    grads = {name: p.grad for name, p in module.named_parameters() if p.requires_grad}
    grads["student_feature"] = student_feat.grad
    return loss.detach(), grads, note


def check_module(job: Dict[str, Any], backend: str, device: torch.device, cache: Dict, refs: Dict) -> Dict[str, Any]:
    name, dtype_name = job["case"], job["dtype"]
    dtype = DTYPES[dtype_name]
    key = (name, dtype_name)
    if key not in cache:
        base, index = make_module(name, device, MODULE_BATCH, MODULE_K)
        g = torch.Generator().manual_seed(11)
        student = torch.randn(MODULE_BATCH, STUDENT_DIM, generator=g).to(device, dtype)
        teacher = torch.randn(MODULE_BATCH, TEACHER_DIM, generator=g).to(device, dtype)
        cache[key] = (base, index, student, teacher)
    base, index, student, teacher = cache[key]
    if key not in refs:
        reference = copy.deepcopy(base).double()
        reference.config = reference.config.replace(backend="naive")
        feat = student.double().requires_grad_()
        refs[key] = module_step(reference, feat, teacher.double(), index, None, device)[:2]
    ref_loss, ref_grads = refs[key]
    module = copy.deepcopy(base)
    chunk = None
    if backend == "chunked":
        num_candidates = MODULE_BATCH if MODULE_CASES[name][0]["negatives"] == "batch" else MODULE_K + 1
        chunk = chunk_for(num_candidates)
    module.config = module.config.replace(backend="eager" if backend == "chunked" else backend, chunk_size=chunk)
    feat = student.float().requires_grad_()  # values representable in the dtype: the reference sees the same
    loss, grads, note = module_step(module, feat, teacher, index, None if dtype_name == "fp32" else dtype, device)
    errors: Dict[str, float] = {"loss": rel_err(loss, ref_loss)}
    tolerances: Dict[str, float] = {"loss": TOLERANCE}
    for param, ref_grad in ref_grads.items():
        grad = grads.get(param)
        if (grad is None) != (ref_grad is None):
            errors[param], tolerances[param] = float("inf"), 0.0
            continue
        if grad is None:
            continue
        errors[param] = rel_err(grad, ref_grad) if bool(torch.isfinite(grad).all()) else float("inf")
        tolerances[param] = FEATURE_GRAD_TOLERANCE[dtype_name] if param == "student_feature" else TOLERANCE
    return {"errors": errors, "tolerances": tolerances, "note": note}


# ---------------------------------------------------------------------- running
def family_of(job: Dict[str, Any]) -> int:
    return FAMILIES.index((job["objective"], job["layout"]))


def run_job(job: Dict[str, Any], backend: str, device: torch.device, caches: Dict, refs: Dict) -> Dict[str, Any]:
    failures_before = len(rl._COMPILED.failures)
    rl._triton_refusals.clear()  # the library warns once per reason; here every refusal must be seen
    start = time.perf_counter()
    check = check_core if job["part"] == "core" else check_module
    try:
        result = check(job, backend, device, caches[job["part"]], refs)
    except Exception as error:  # noqa: BLE001 - recorded as a failure, the check goes on
        result = {"errors": {}, "tolerances": {}, "error": f"{type(error).__name__}: {error}"}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result["seconds"] = time.perf_counter() - start
    if backend == "compile" and len(rl._COMPILED.failures) > failures_before:
        error = list(rl._COMPILED.failures.values())[-1]
        result["fallback"] = f"compile failed, ran eager: {type(error).__name__}: {str(error)[:300]}"
    if backend == "triton" and rl._triton_refusals:
        result["fallback"] = f"triton refused ({'; '.join(sorted(rl._triton_refusals))}), ran eager"
    within = all(err <= result["tolerances"][k] for k, err in result["errors"].items())
    result["ok"] = bool(result["errors"]) and within and "error" not in result and "fallback" not in result
    return result


def format_result(job: Dict[str, Any], backend: str, result: Dict[str, Any]) -> str:
    what = f"{job['part']:6s} {job['dtype']:4s} {job['case']:52s} {job['objective']:7s} {backend:8s}"
    if result.get("status") == "skipped":
        return f"{what} SKIPPED ({result['reason']})"
    errors = " ".join(f"{k.replace('embed_', '').replace('.weight', '.w').replace('.bias', '.b')} {v:.1e}"
                      for k, v in result["errors"].items())
    extra = "".join(f" [{result[k]}]" for k in ("note", "fallback", "error") if result.get(k))
    return f"{what} {errors} {'ok' if result['ok'] else 'FAIL'} ({result['seconds']:.1f}s){extra}"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES),
                        help="dtypes of the module checks (the core checks are fp32)")
    parser.add_argument("--parts", nargs="+", default=["core", "module"], choices=["core", "module"])
    parser.add_argument("--compile-budget-s", type=float, default=150.0,
                        help="start no new torch.compile family after this many seconds of compile jobs")
    parser.add_argument("--smoke", action="store_true", help="smaller shapes (CPU smoke test)")
    parser.add_argument("--json", default=None, help="write the results here (rewritten after each group)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    # Many shapes per option set in one process: a generous recompile limit, so that no compile
    # check falls back to eager for want of cache entries (each option set has a code object of
    # its own in the library; the shapes of one set still count against one limit).
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    backends = list(args.backends)
    notes = []
    if "triton" in backends and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        backends.remove("triton")
        notes.append("triton skipped: on CPU it runs only under TRITON_INTERPRET=1")
    settings = dict(backends=backends, dtypes=args.dtypes, parts=args.parts, temperature=TAU, eps=EPS,
                    noise_size=N, compile_budget_s=args.compile_budget_s, smoke=args.smoke,
                    tolerance_fp32=TOLERANCE, feature_grad_tolerance=FEATURE_GRAD_TOLERANCE,
                    triton_interpret=os.environ.get("TRITON_INTERPRET") == "1")
    info = run_info(device, settings)
    print(header(info), flush=True)
    for note in notes:
        print(note, flush=True)
    jobs = (core_jobs(device, args.smoke) if "core" in args.parts else []) + (
        module_jobs(args.dtypes) if "module" in args.parts else [])
    rows: List[Dict[str, Any]] = []
    report = {**info, "notes": notes, "rows": rows}

    def save() -> None:
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(report, handle, indent=2)

    save()

    caches: Dict[str, Dict] = {"core": {}, "module": {}}
    refs: Dict = {}
    ordered: List[Tuple[Dict[str, Any], str]] = [(job, b) for job in jobs for b in backends if b != "compile"]
    if "compile" in backends:  # last, most used family first
        ordered += sorted(((job, "compile") for job in jobs), key=lambda item: family_of(item[0]))
    compile_seconds, started_families = 0.0, set()
    for job, backend in ordered:
        if backend == "compile":
            family = family_of(job)
            if family not in started_families and compile_seconds > args.compile_budget_s:
                reason = f"compile budget of {args.compile_budget_s:.0f} s spent"
                result: Dict[str, Any] = {"status": "skipped", "reason": reason, "ok": None}
                rows.append({**{k: v for k, v in job.items() if k != "make"}, "backend": backend, **result})
                print(format_result(job, backend, result), flush=True)
                continue
            started_families.add(family)
        result = run_job(job, backend, device, caches, refs)
        if backend == "compile":
            compile_seconds += result["seconds"]
        rows.append({**{k: v for k, v in job.items() if k != "make"}, "backend": backend, **result})
        print(format_result(job, backend, result), flush=True)
        save()  # a run stopped by a timeout keeps every row so far
    failures = [r for r in rows if r["ok"] is False]
    skipped = [r for r in rows if r["ok"] is None]
    report["compile_failures"] = [f"{key}: {type(err).__name__}" for key, err in rl._COMPILED.failures.items()]
    report["summary"] = {"checks": len(rows), "failed": len(failures), "skipped": len(skipped),
                         "compile_seconds": round(compile_seconds, 1)}
    save()
    if skipped:
        print(f"{len(skipped)} compile checks skipped (budget)")
    print("all backends agree with the naive formulation" if not failures
          else f"{len(failures)} checks FAILED: " + "; ".join(
              f"{r['part']} {r['dtype']} {r['case']} {r['objective']} {r['backend']}" for r in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

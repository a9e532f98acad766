"""Every relation-loss backend against the naive formulation in float64, on one device.

The unit tests run on CPU only (Triton under its interpreter); this is the same check for a GPU,
to run before timing anything there. Exits 1 if a backend's loss or gradient is off.

    python benchmarks/check_backends.py --device cuda
    TRITON_INTERPRET=1 python benchmarks/check_backends.py --device cpu   # what the tests cover
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

import torch
import torch.nn.functional as F

from crcd_plugin.functional import infonce_loss, nce_log_normalizer, nce_loss
from crcd_plugin.kernels import naive_relation_logits
from crcd_plugin.memory import in_batch_candidate_index
from crcd_plugin.relation_loss import relation_loss

TAU, EPS, N = 0.05, 1e-6, 50_000
TOLERANCE = 1e-4  # relative to the largest value / gradient entry; fp32 kernels, float64 reference
# (B, A, K+1, D): small; anchor blocks and candidate tiles that do not divide; A > 64; D = 128.
SHAPES = [(4, 5, 70, 24), (8, 70, 130, 16), (32, 32, 501, 128)]


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


def reference(student, anchors, candidates, objective: str):
    query = student.double().requires_grad_()
    logits = naive_relation_logits(query, anchors.double(), candidates.double(), TAU, EPS)
    if objective == "infonce":
        loss = infonce_loss(logits)
    else:
        loss = nce_loss(logits, nce_log_normalizer(logits, N), N)
    loss.backward()
    return loss.detach(), query.grad


def run(backend: str, student, anchors, candidates, objective: str):
    query = student.clone().requires_grad_()
    device = student.device
    loss, _ = relation_loss(
        backend, query, anchors, candidates, None, torch.zeros((), device=device),
        torch.zeros((), dtype=torch.bool, device=device), None,
        temperature=TAU, eps=EPS, objective=objective, noise_size=N,
    )
    loss.backward()
    return loss.detach(), query.grad


def shared_like(batch: int, num_queue: int, dim: int, device: torch.device):
    """Shared candidates: anchors = the batch's other side; a queue with a row equal to an anchor."""
    student, other, _ = bank_like(batch, batch, 6, dim, device)  # other[1] is 1e-3 from other[0]
    queue = F.normalize(torch.randn(num_queue, dim, generator=torch.Generator().manual_seed(num_queue)), dim=-1)
    queue = queue.to(device)
    queue[3] = other[2]
    return student, other, queue


def run_shared(backend: str, student, anchors, candidates, positives, objective: str):
    query = student.clone().requires_grad_()
    device = student.device
    loss, _ = relation_loss(
        backend, query, anchors, candidates, positives, torch.zeros((), device=device),
        torch.zeros((), dtype=torch.bool, device=device), temperature=TAU, eps=EPS, objective=objective, noise_size=N,
    )
    loss.backward()
    return loss.detach(), query.grad


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", nargs="+", default=["eager", "compile", "triton"])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    backends = list(args.backends)
    if "triton" in backends and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        backends.remove("triton")
        print("triton skipped: on CPU it runs only under TRITON_INTERPRET=1")
    if device.type == "cuda":
        print(torch.cuda.get_device_name(device), "torch", torch.__version__)
    failures = 0
    for shape in SHAPES:
        inputs = bank_like(*shape, device)
        for objective in ("nce", "infonce"):
            ref_loss, ref_grad = reference(*inputs, objective)
            for backend in backends:
                loss, grad = run(backend, *inputs, objective)
                loss_err = ((loss.double() - ref_loss).abs() / ref_loss.abs().clamp_min(1e-12)).item()
                grad_err = ((grad.double() - ref_grad).abs().max() / ref_grad.abs().max()).item()
                ok = loss_err < TOLERANCE and grad_err < TOLERANCE
                failures += not ok
                print(f"B,A,K+1,D={shape} {objective:7s} {backend:8s} loss rel err {loss_err:.1e} "
                      f"grad rel err {grad_err:.1e} {'ok' if ok else 'FAIL'}", flush=True)
    # Shared candidates (in-batch and queue negatives), against naive on the per-sample candidates.
    for batch, num_queue, dim in ((6, 70, 24), (64, 501, 32), (16, 130, 128)):  # D <= B and D > B
        student, other, queue = shared_like(batch, num_queue, dim, device)
        for layout, candidates, positives in (("batch", other, None), ("queue", queue, other)):
            if positives is None:
                per_sample = candidates[in_batch_candidate_index(batch, device)]
            else:
                per_sample = torch.cat([positives[:, None], candidates[None].expand(batch, -1, -1)], dim=1)
            for objective in ("nce", "infonce"):
                ref_loss, ref_grad = reference(student, other, per_sample, objective)
                for backend in backends:
                    loss, grad = run_shared(backend, student, other, candidates, positives, objective)
                    loss_err = ((loss.double() - ref_loss).abs() / ref_loss.abs().clamp_min(1e-12)).item()
                    grad_err = ((grad.double() - ref_grad).abs().max() / ref_grad.abs().max()).item()
                    ok = loss_err < TOLERANCE and grad_err < TOLERANCE
                    failures += not ok
                    verdict = "ok" if ok else "FAIL"
                    print(f"shared {layout:5s} B,M,D={batch, candidates.shape[0], dim} {objective:7s} {backend:8s} "
                          f"loss rel err {loss_err:.1e} grad rel err {grad_err:.1e} {verdict}", flush=True)
    print("all backends agree with the naive formulation" if not failures else f"{failures} checks FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

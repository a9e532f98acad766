"""Flash-style relation loss on Triton: scores are made tile by tile and reduced at once.

The ``[B, A, K+1]`` scores are never stored, neither in forward nor in backward (which makes them
again). The non-Gram pieces come from :func:`relation_terms`, so the result is as exact as the
Gram kernel's; the two Gram products run as fp32 ``tl.dot`` with IEEE precision (no TF32).
Imported only when ``backend="triton"`` is asked for; runs on CUDA, and on CPU under Triton's
interpreter (``TRITON_INTERPRET=1``), which is how the tests check it without a GPU.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from crcd_plugin.kernels.objectives import keep_or_fix_log_z, nce_log_normalizer_from_parts, nce_shift
from crcd_plugin.kernels.relation import (
    RelationTerms,
    anchor_tables,
    candidate_terms,
    per_sample_scores,
    relation_terms,
)

MODE_NCE, MODE_INFONCE, MODE_STATS = 0, 1, 2
# Where a row's positive sits among the candidates the kernel scores: nowhere (shared negatives,
# positive scored apart), column 0 (per-sample candidates), column b (shared in-batch candidates).
POSITIVE_NONE, POSITIVE_FIRST, POSITIVE_DIAGONAL = 0, 1, 2
_MAX_DIM = 256  # one [BLOCK_K, D] residual tile per step; larger D would need a loop over D
# The nearest-anchor search runs over chunks of candidates of at most this many [B, chunk, A]
# entries (64 MiB in fp32), so that no tensor of the scores' size exists at any time.
SEARCH_ENTRIES = 2**24


def unsupported_reason(
    query: torch.Tensor,
    anchors: Optional[torch.Tensor],
    candidates: torch.Tensor,
    mask: Optional[torch.Tensor],
    positives: Optional[torch.Tensor] = None,
) -> Optional[str]:
    """Why the Triton kernel cannot run these inputs, or ``None`` when it can."""
    if anchors is None:
        return "anchored=False (no anchors)"
    if mask is not None:
        return "masked scores (self_anchor='mask')"
    others = (anchors, candidates) + (() if positives is None else (positives,))
    if any(x.requires_grad for x in others):
        return "gradients for anchors or candidates (only the query may require grad)"
    if any(x.dtype != torch.float32 for x in (query,) + others):
        return "dtypes other than float32"
    if candidates.shape[-1] > _MAX_DIM:
        return f"embedding dims above {_MAX_DIM}"
    if query.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"on device {query.device.type} (it needs CUDA, or CPU under TRITON_INTERPRET=1)"
    return None


@triton.jit
def _program_rows(srel_ptr, anc_ptr, A, D, BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's sample ``b``, anchors ``j`` (mask ``jm``), dims ``d`` (mask ``dm``), and its
    student relations ``s`` and anchors ``a``, both ``[BLOCK_A, BLOCK_D]``."""
    b = tl.program_id(0).to(tl.int64)  # b * K1 * D passes 2**31 at B = 1024, K = 16384, D = 128
    j = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    jm = j < A
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    s = tl.load(srel_ptr + b * A * D + j[:, None] * D + d[None, :], mask=jm[:, None] & dm[None, :], other=0.0)
    a = tl.load(anc_ptr + j[:, None] * D + d[None, :], mask=jm[:, None] & dm[None, :], other=0.0)
    return b, j, jm, d, dm, s, a


@triton.jit
def _tile_logits(
    b, j, jm, d, dm, k0, s, a,
    res_ptr, near_ptr, perc_ptr, nsq_ptr, dsq_ptr, term_ptr,
    A, K1, D,
    BLOCK_K: tl.constexpr, SHARED: tl.constexpr,
):
    """Scores of candidates ``k0 .. k0+BLOCK_K`` against the program's anchors: ``[BLOCK_K, BLOCK_A]``.

    ``SHARED``: every sample reads the same candidate tables (``[K1, ...]`` instead of ``[B, K1, ...]``).
    """
    k = k0 + tl.arange(0, BLOCK_K)
    km = k < K1
    if SHARED:
        row = k
    else:
        row = b * K1 + k
    r = tl.load(res_ptr + row[:, None] * D + d[None, :], mask=km[:, None] & dm[None, :], other=0.0)
    p = tl.load(near_ptr + row, mask=km, other=0)
    valid = km[:, None] & jm[None, :]
    # <c - a_j + eps, s_bj> / tau = <r, s_bj / tau> + <P[p, j], s_bj / tau>
    dot = tl.dot(r, tl.trans(s), input_precision="ieee")
    dot += tl.load(term_ptr + b * A * A + p[:, None] * A + j[None, :], mask=valid, other=0.0)
    # |c - a_j + eps|^2: from the Gram product for j != p, from r alone for j = p
    far = tl.load(perc_ptr + row, mask=km, other=0.0)[:, None]
    far += tl.load(dsq_ptr + p[:, None] * A + j[None, :], mask=valid, other=0.0)
    far -= 2.0 * tl.dot(r, tl.trans(a), input_precision="ieee")
    near = tl.load(nsq_ptr + row, mask=km, other=1.0)[:, None]
    sq = tl.where(p[:, None] == j[None, :], near, far)
    rsq = 1.0 / tl.sqrt(tl.maximum(sq, 1e-24))
    return dot * rsq, rsq, r, p, k, valid


@triton.jit
def _is_positive(k, b, POSITIVE: tl.constexpr):
    """``[BLOCK_K, 1]``: which of the tile's candidates ``k`` is row ``b``'s positive."""
    if POSITIVE == 1:
        hit = k == 0
    elif POSITIVE == 2:
        hit = k == b
    else:
        hit = k < 0
    return hit[:, None]


@triton.jit
def _softplus(x):
    # max(x, 0) + log1p(exp(-|x|)), with log1p(t) = log(u) t / (u - 1), u = 1 + t, accurate to
    # an ulp where log(1 + t) alone would lose t's low digits (no log1p in Triton's core language).
    t = tl.exp(-tl.abs(x))
    u = 1.0 + t
    return tl.maximum(x, 0.0) + tl.where(u == 1.0, t, tl.log(u) * t / tl.where(u == 1.0, 1.0, u - 1.0))


@triton.jit
def _rows_forward(
    srel_ptr, term_ptr, anc_ptr, res_ptr, near_ptr, perc_ptr, nsq_ptr, dsq_ptr, shift_ptr, skip_ptr,
    out_ptr, lse_ptr,
    A, K1, D,
    MODE: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    SHARED: tl.constexpr, POSITIVE: tl.constexpr,
):
    """Per row ``(b, j)``: NCE sum, or InfoNCE ``lse - positive``, or (stats) the scores' ``lse``.

    Without a positive among the candidates (``POSITIVE == 0``) these are the negatives' NCE sum
    and log-sum-exp, which the caller combines with the positive's score.
    """
    b, j, jm, d, dm, s, a = _program_rows(srel_ptr, anc_ptr, A, D, BLOCK_A, BLOCK_D)
    shift = tl.load(shift_ptr)
    # The stats pass only matters before NCE's constant is fixed; afterwards it does no work.
    num_candidates = tl.where(tl.load(skip_ptr) != 0, 0, K1)

    acc = tl.zeros([BLOCK_A], dtype=tl.float32)
    run_max = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_A], dtype=tl.float32)
    for k0 in range(0, num_candidates, BLOCK_K):
        logits, rsq, r, p, k, valid = _tile_logits(
            b, j, jm, d, dm, k0, s, a, res_ptr, near_ptr, perc_ptr, nsq_ptr, dsq_ptr, term_ptr, A, K1, D, BLOCK_K,
            SHARED,
        )
        is_positive = _is_positive(k, b, POSITIVE)
        if MODE == 0:
            x = logits - shift
            acc += tl.sum(tl.where(valid, _softplus(tl.where(is_positive, -x, x)), 0.0), 0)
        else:
            if MODE == 1:
                acc += tl.sum(tl.where(valid & is_positive, logits, 0.0), 0)
            masked = tl.where(valid, logits, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(masked, 0))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - safe_max) + tl.sum(tl.exp(masked - safe_max[None, :]), 0)
            run_max = new_max
    lse = tl.where(run_sum > 0, run_max + tl.log(tl.maximum(run_sum, 1e-30)), float("-inf"))
    if MODE == 1:
        acc = lse - acc
    tl.store(out_ptr + b * A + j, acc, mask=jm)
    tl.store(lse_ptr + b * A + j, lse, mask=jm)


@triton.jit
def _rows_backward(
    srel_ptr, term_ptr, anc_ptr, res_ptr, near_ptr, perc_ptr, nsq_ptr, dsq_ptr, shift_ptr, lse_ptr, grow_ptr,
    gsrel_ptr, gterm_ptr,
    A, K1, D,
    MODE: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr, SHARED: tl.constexpr, POSITIVE: tl.constexpr,
):
    """Gradients of the row values for ``student_rel [B, A, D]`` and ``anchor_term [B, A, A]``.

    Each program owns rows ``(b, j-block)``, so it writes its outputs alone: no atomics, and the
    per-anchor sums for ``anchor_term`` are a one-hot product, deterministic on any device.
    """
    b, j, jm, d, dm, s, a = _program_rows(srel_ptr, anc_ptr, A, D, BLOCK_A, BLOCK_D)
    shift = tl.load(shift_ptr)
    lse = tl.load(lse_ptr + b * A + j, mask=jm, other=0.0)
    grad_row = tl.load(grow_ptr + b * A + j, mask=jm, other=0.0)
    pid = tl.arange(0, BLOCK_P)

    grad_s = tl.zeros([BLOCK_A, BLOCK_D], dtype=tl.float32)
    grad_t = tl.zeros([BLOCK_P, BLOCK_A], dtype=tl.float32)
    for k0 in range(0, K1, BLOCK_K):
        logits, rsq, r, p, k, valid = _tile_logits(
            b, j, jm, d, dm, k0, s, a, res_ptr, near_ptr, perc_ptr, nsq_ptr, dsq_ptr, term_ptr, A, K1, D, BLOCK_K,
            SHARED,
        )
        is_positive = _is_positive(k, b, POSITIVE)
        if MODE == 0:
            # d softplus(-x) / dx = -sigmoid(-x); d softplus(x) / dx = sigmoid(x)
            x = logits - shift
            sig = 1.0 / (1.0 + tl.exp(-tl.where(is_positive, -x, x)))
            d_logits = tl.where(is_positive, -sig, sig)
        else:
            d_logits = tl.exp(logits - lse[None, :]) - tl.where(is_positive, 1.0, 0.0)
        d_dot = tl.where(valid, d_logits * grad_row[None, :] * rsq, 0.0)  # [BLOCK_K, BLOCK_A]
        grad_s += tl.dot(tl.trans(d_dot), r, input_precision="ieee")
        one_hot = tl.where((p[:, None] == pid[None, :]) & (k < K1)[:, None], 1.0, 0.0)  # [BLOCK_K, BLOCK_P]
        grad_t += tl.dot(tl.trans(one_hot), d_dot, input_precision="ieee")
    tl.store(gsrel_ptr + b * A * D + j[:, None] * D + d[None, :], grad_s, mask=jm[:, None] & dm[None, :])
    tl.store(gterm_ptr + b * A * A + pid[:, None] * A + j[None, :], grad_t, mask=(pid < A)[:, None] & jm[None, :])


def _one_hot_width(num_anchors: int) -> int:
    """``BLOCK_P``: every anchor index fits one one-hot row (``tl.dot`` needs sides >= 16)."""
    return max(16, triton.next_power_of_2(num_anchors))


def _blocks_and_grid(student_rel: torch.Tensor) -> tuple[dict, tuple[int, int]]:
    """Block sizes and the grid (one program per sample and block of anchors) for ``[B, A, D]``."""
    batch, num_anchors, dim = student_rel.shape
    # Untuned defaults (tl.dot needs every side >= 16); the backward's one-hot accumulator is
    # [BLOCK_P, BLOCK_A], so BLOCK_A shrinks as the anchor count grows.
    block_p = _one_hot_width(num_anchors)
    blocks = {
        "BLOCK_A": max(16, min(64, block_p, 8192 // block_p)),
        "BLOCK_K": 64,
        "BLOCK_D": max(16, triton.next_power_of_2(dim)),
    }
    return blocks, (batch, triton.cdiv(num_anchors, blocks["BLOCK_A"]))


def _launch_rows(
    mode: int, tables: tuple, shift: torch.Tensor, skip: torch.Tensor, layout: tuple[bool, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the forward kernel; returns per-row values and log-sum-exps, both ``[B, A]``.

    ``layout`` is ``(shared, positive)``: shared candidate tables or not, and a ``POSITIVE_*`` rule.
    """
    student_rel, residual = tables[0], tables[3]
    batch, num_anchors, dim = student_rel.shape
    rows = student_rel.new_empty(batch, num_anchors)
    lse = student_rel.new_empty(batch, num_anchors)
    blocks, grid = _blocks_and_grid(student_rel)
    shared, positive = layout
    _rows_forward[grid](
        *tables, shift, skip, rows, lse, num_anchors, residual.shape[-2], dim,
        MODE=mode, SHARED=shared, POSITIVE=positive, **blocks,
    )
    return rows, lse


class _RelationRows(torch.autograd.Function):
    """Row values of the objective; differentiable in ``student_rel`` and ``anchor_term``."""

    @staticmethod
    def forward(
        ctx, student_rel, anchor_term, anchors, residual, nearest, per_candidate, near_sq, diff_sq, shift, mode, layout
    ):
        tables = (student_rel, anchor_term, anchors, residual, nearest, per_candidate, near_sq, diff_sq)
        skip = torch.zeros((), dtype=torch.int32, device=shift.device)
        rows, lse = _launch_rows(mode, tables, shift, skip, layout)
        ctx.save_for_backward(*tables, shift, lse)
        ctx.mode, ctx.layout = mode, layout
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        *tables, shift, lse = ctx.saved_tensors
        student_rel, anchor_term = tables[:2]
        _, num_anchors, dim = student_rel.shape
        grad_srel = torch.empty_like(student_rel)
        grad_term = torch.empty_like(anchor_term)
        blocks, grid = _blocks_and_grid(student_rel)
        shared, positive = ctx.layout
        _rows_backward[grid](
            *tables, shift, lse, grad_rows.contiguous(), grad_srel, grad_term,
            num_anchors, tables[3].shape[-2], dim,
            MODE=ctx.mode, BLOCK_P=_one_hot_width(num_anchors), SHARED=shared, POSITIVE=positive, **blocks,
        )
        return grad_srel, grad_term, *([None] * 9)


def triton_relation_loss_core(
    query: torch.Tensor,
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    log_z: torch.Tensor,
    z_ready: torch.Tensor,
    temperature: float,
    eps: float,
    objective: str,
    noise_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The relation loss core of one side on Triton; same contract as ``relation_loss_core``.

    For NCE before its constant is fixed, one extra pass without gradient reduces all scores to
    ``log Z`` first (it is skipped on the device, with no host sync, once ``z_ready`` is set).

    Shape:
        query ``[B, D]``, anchors ``[A, D]``, candidates ``[B, K+1, D]`` -> two scalars.
    """
    search_chunk = max(1, SEARCH_ENTRIES // (query.shape[0] * anchors.shape[0]))
    terms = relation_terms(query, anchors, candidates.contiguous(), temperature, eps, search_chunk)
    return _rows_loss(terms, anchors, None, log_z, z_ready, objective, noise_size, (False, POSITIVE_FIRST))


def triton_shared_relation_loss_core(
    query: torch.Tensor,
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    positives: Optional[torch.Tensor],
    log_z: torch.Tensor,
    z_ready: torch.Tensor,
    temperature: float,
    eps: float,
    objective: str,
    noise_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared-candidate loss core of one side on Triton; contract of the shared layouts of ``relation_loss``
    (without masks).

    The kernel is the per-sample one reading a single ``[M, ...]`` set of candidate tables for
    every sample. In-batch (``positives=None``), sample ``b``'s positive is candidate ``b``; with
    ``positives``, the kernel reduces the ``M`` negatives and the ``[B, A]`` positive scores are
    made apart (eager, a ``[B, 1, D]`` candidate per sample) and combined with its rows.

    Shape:
        query ``[B, D]``, anchors ``[A, D]``, candidates ``[M, D]``, positives ``[B, D]`` or None
        -> two scalars.
    """
    tables = anchor_tables(query, anchors, temperature, eps)
    search_chunk = max(1, SEARCH_ENTRIES // anchors.shape[0])
    shared = candidate_terms(anchors, candidates.contiguous(), eps, search_chunk)
    terms = RelationTerms(**tables._asdict(), **shared._asdict())
    positive = None
    if positives is not None:
        positive = per_sample_scores(tables, candidate_terms(anchors, positives[:, None], eps), anchors)[..., 0]
    layout = (True, POSITIVE_DIAGONAL if positives is None else POSITIVE_NONE)
    return _rows_loss(terms, anchors, positive, log_z, z_ready, objective, noise_size, layout)


def _rows_loss(
    terms: RelationTerms,
    anchors: torch.Tensor,
    positive: Optional[torch.Tensor],
    log_z: torch.Tensor,
    z_ready: torch.Tensor,
    objective: str,
    noise_size: int,
    layout: tuple[bool, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss from the kernel's row values, and ``positive [B, A]`` where it is scored apart."""
    constants = tuple(
        x.detach().contiguous()
        for x in (anchors, terms.residual, terms.nearest, terms.per_candidate, terms.near_sq, terms.anchor_diff_sq)
    )
    differentiable = (terms.student_rel.contiguous(), terms.anchor_term.contiguous())
    num_candidates = terms.residual.shape[-2]
    if objective == "infonce":
        shift = log_z.detach().float().contiguous()  # unused by InfoNCE
        rows = _RelationRows.apply(*differentiable, *constants, shift, MODE_INFONCE, layout)
        if positive is not None:  # rows are the negatives' log-sum-exps
            rows = torch.logaddexp(rows, positive) - positive
        return rows.mean(), log_z

    with torch.no_grad():
        tables = tuple(x.detach() for x in differentiable) + constants
        _, row_lse = _launch_rows(MODE_STATS, tables, log_z.detach().float(), z_ready.to(torch.int32), layout)
        num_scores = row_lse.numel() * num_candidates
        if positive is not None:  # a single score's log-sum-exp is the score
            row_lse = torch.cat([row_lse.reshape(-1), positive.detach().reshape(-1)])
            num_scores += positive.numel()
        fresh = nce_log_normalizer_from_parts(row_lse, num_scores, noise_size)
    log_z = keep_or_fix_log_z(log_z, z_ready, fresh)
    num_negatives = num_candidates - (1 if layout[1] != POSITIVE_NONE else 0)
    shift = nce_shift(log_z.float(), num_negatives, noise_size).contiguous()
    rows = _RelationRows.apply(*differentiable, *constants, shift, MODE_NCE, layout)
    if positive is not None:  # rows are the negatives' sums
        rows = rows + torch.nn.functional.softplus(shift - positive)
    return rows.mean(), log_z

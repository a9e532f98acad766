"""Relation scores of CRCD: the exact Gram-expanded kernel and the naive reference.

Both compute, for student embeddings ``s [B, D]``, anchors ``a [A, D]`` and candidates
``c [B, K+1, D]``, the score ``<normalize(c[b,k] - a[j] + eps), normalize(s[b] - a[j] + eps)> / tau``
laid out as ``[B, A, K+1]``. Only the naive one builds the ``[B, A, K+1, D]`` tensor.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from einops import rearrange

# F.normalize divides by max(norm, 1e-12); squared norms are clamped to the square of that.
_MIN_NORM_SQ = 1e-24


def naive_relation_logits(
    student: torch.Tensor,
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    temperature: float,
    eps: float = 1e-6,
) -> torch.Tensor:
    """The reference formulation: materialises ``[B, A, K+1, D]``. For benchmarks and checks only.

    Shape:
        student ``[B, D]``, anchors ``[A, D]``, candidates ``[B, K+1, D]`` -> ``[B, A, K+1]``.
    """
    student_rel = F.normalize(student[:, None, :] - anchors[None, :, :] + eps, dim=-1)  # [B, A, D]
    teacher_rel = F.normalize(candidates[:, None, :, :] - anchors[None, :, None, :] + eps, dim=-1)
    return torch.einsum("bakd,bad->bak", teacher_rel, student_rel) / temperature


def gram_relation_logits(
    student: torch.Tensor,
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    temperature: float,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Exact relation scores through Gram products, without the ``[B, A, K+1, D]`` tensor.

    Expanding ``|c - a|^2 = |c|^2 - 2<c, a> + |a|^2`` cancels catastrophically when a candidate
    equals or nearly equals an anchor, which CRCD does by construction (the positive of sample
    ``i`` is the memory row that also serves as anchor ``i``). So every candidate is re-centred
    on its nearest anchor ``p``: ``c - a_j + eps = r + P[p, j]`` with ``r = c - a_p`` and
    ``P[p, j] = a_p - a_j + eps``, both exact differences. All Gram products multiply ``r``, which
    is small exactly where precision matters, so their absolute error scales with ``|r|`` instead
    of with ``|c| |a|``. The squared norm at ``j = p``, which can be as small as ``eps^2``, is
    assembled from ``r``-only terms (``|r + eps|^2 = |r|^2 + 2 eps sum(r) + D eps^2``), so its
    large gradient (``~1 / |r + eps|``) never meets the ``a_p - a_j`` terms that would cancel.
    The identity holds for any ``p``: the nearest-anchor search only decides where precision goes.

    The work is laid out as ``[B, K+1, A]`` (a row of anchors per candidate): per-candidate terms
    broadcast along rows, table look-ups by ``p`` read whole rows, the two Gram products take
    their additive terms in place (``addmm`` / ``baddbmm``), and ``1 / tau`` is folded into the
    ``[B, A, D]`` student side. The result is returned as a ``[B, A, K+1]`` view of that layout.

    Cost: three ``[B, K+1, D] x [D, A]`` products forward (one only to find ``p``, without
    gradient), one ``[B, K+1, D]`` residual, ``[A, A, D]`` / ``[B, A, A]`` side tensors and a few
    ``[B, K+1, A]`` score-sized tensors. Where every sample has the same candidates (in-batch or
    queue negatives), :func:`crcd_plugin.kernels.shared.shared_relation_logits` does the
    candidate side once for the batch.

    Shape:
        student ``[B, D]``, anchors ``[A, D]``, candidates ``[B, K+1, D]`` -> ``[B, A, K+1]``.
    """
    tables = anchor_tables(student, anchors, temperature, eps)
    return per_sample_scores(tables, candidate_terms(anchors, candidates, eps), anchors)


class AnchorTables(NamedTuple):
    """The per-sample, candidate-free pieces of the exact scores (see :func:`gram_relation_logits`)."""

    student_rel: torch.Tensor  # [B, A, D]: normalize(s_b - a_j + eps) / tau
    anchor_diff_sq: torch.Tensor  # [A(p), A(j)]: |P[p, j]|^2
    anchor_term: torch.Tensor  # [B, A(p), A(j)]: <P[p, j], s_bj> / tau


class CandidateTerms(NamedTuple):
    """The per-candidate pieces of the exact scores; ``[...]`` is ``[B, K+1]`` or, shared, ``[M]``."""

    residual: torch.Tensor  # [..., D]: r = c - a_p
    nearest: torch.Tensor  # [...]: p, the candidate's nearest anchor
    per_candidate: torch.Tensor  # [..., 1]: |r|^2 + 2 eps sum(r) + 2 <r, a_p>
    near_sq: torch.Tensor  # [..., 1]: |r + eps|^2, the squared norm at j = p


class RelationTerms(NamedTuple):
    """The pieces of the exact relation scores that are not Gram products with the residual.

    Shared by :func:`gram_relation_logits` and the Triton kernel; see the former for the algebra.
    """

    student_rel: torch.Tensor  # [B, A, D]: normalize(s_b - a_j + eps) / tau
    residual: torch.Tensor  # [B, K+1, D] (shared: [M, D]): r = c - a_p
    nearest: torch.Tensor  # [B, K+1] (shared: [M]): p, the candidate's nearest anchor
    per_candidate: torch.Tensor  # [B, K+1, 1] (shared: [M, 1]): |r|^2 + 2 eps sum(r) + 2 <r, a_p>
    near_sq: torch.Tensor  # [B, K+1, 1] (shared: [M, 1]): |r + eps|^2, the squared norm at j = p
    anchor_diff_sq: torch.Tensor  # [A(p), A(j)]: |P[p, j]|^2
    anchor_term: torch.Tensor  # [B, A(p), A(j)]: <P[p, j], s_bj> / tau


def relation_terms(
    student: torch.Tensor,
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    temperature: float,
    eps: float = 1e-6,
    search_chunk: Optional[int] = None,
) -> RelationTerms:
    """Nearest anchors, residuals and the small tables of :func:`gram_relation_logits`.

    The nearest-anchor search makes a ``[B, K+1, A]`` tensor; kernels that never store the
    scores pass ``search_chunk`` to make it ``search_chunk`` candidates at a time instead.

    Shape:
        student ``[B, D]``, anchors ``[A, D]``, candidates ``[B, K+1, D]`` or shared ``[M, D]``;
        see :class:`RelationTerms`.
    """
    tables = anchor_tables(student, anchors, temperature, eps)
    return RelationTerms(**tables._asdict(), **candidate_terms(anchors, candidates, eps, search_chunk)._asdict())


def anchor_tables(student: torch.Tensor, anchors: torch.Tensor, temperature: float, eps: float = 1e-6) -> AnchorTables:
    """Student relations and the anchor-pair tables; see :class:`AnchorTables`.

    Shape:
        student ``[B, D]``, anchors ``[A, D]``.
    """
    student_rel = anchor_relations(student, anchors, eps, temperature, anchor_major=False)  # [B, A, D]
    anchor_diff = anchors[:, None, :] - anchors[None, :, :] + eps  # [A(p), A(j), D]: P[p, j]
    return AnchorTables(
        student_rel=student_rel,
        anchor_diff_sq=(anchor_diff * anchor_diff).sum(-1),
        anchor_term=torch.einsum("pjd,bjd->bpj", anchor_diff, student_rel),
    )


def anchor_relations(
    points: torch.Tensor,
    anchors: torch.Tensor,
    eps: float = 1e-6,
    temperature: Union[float, torch.Tensor] = 1.0,
    anchor_major: bool = True,
) -> torch.Tensor:
    """``normalize(points[n] - anchors[j] + eps) / temperature``, the relations of points to anchors.

    The difference is exact and the ``+ eps`` is added to it afterwards, so a point equal to an
    anchor gets exactly the ``eps`` direction. Normalising is one multiply by a per-row factor
    (``F.normalize`` divides by ``max(norm, 1e-12)``, and so does this). In eager mode it runs in
    place with a hand-written backward (``grad_u = f g - f <u_hat, g> u_hat``, summed over the
    anchors for the points and over the points for the anchors), which makes about half the passes
    over the ``[A, N, D]`` tensor that autograd's normalize does; under ``torch.compile`` the plain
    ops run, for the compiler to fuse.

    Shape:
        points ``[N, D]``, anchors ``[A, D]`` -> ``[A, N, D]`` (``anchor_major``) or ``[N, A, D]``.
    """
    if torch.compiler.is_compiling():
        diff = points[None, :, :] - anchors[:, None, :] if anchor_major else points[:, None, :] - anchors[None, :, :]
        shifted = diff + eps
        norm = torch.linalg.vector_norm(shifted, dim=-1, keepdim=True)
        return shifted * (1.0 / (norm.clamp_min(_MIN_NORM) * temperature))
    if torch.is_grad_enabled() and (points.requires_grad or anchors.requires_grad):
        return _AnchorRelations.apply(points, anchors, eps, temperature, anchor_major)
    return _anchor_relations_in_place(points, anchors, eps, temperature, anchor_major)[0]


_MIN_NORM = 1e-12


def _anchor_relations_in_place(points, anchors, eps, temperature, anchor_major):
    """The relations and their per-row factors ``1 / (tau max(|u|, 1e-12))``, ``[..., 1]``."""
    with torch.no_grad():
        if anchor_major:
            shifted = (points[None, :, :] - anchors[:, None, :]).add_(eps)
        else:
            shifted = (points[:, None, :] - anchors[None, :, :]).add_(eps)
        factor = (torch.linalg.vector_norm(shifted, dim=-1, keepdim=True).clamp_min_(_MIN_NORM) * temperature)
        factor = factor.reciprocal_()
        return shifted.mul_(factor), factor


class _AnchorRelations(torch.autograd.Function):
    """:func:`anchor_relations` with its backward written out (see there)."""

    @staticmethod
    def forward(ctx, points, anchors, eps, temperature, anchor_major):
        relations, factor = _anchor_relations_in_place(points, anchors, eps, temperature, anchor_major)
        ctx.save_for_backward(relations, factor)
        ctx.temperature, ctx.anchor_major = temperature, anchor_major
        return relations

    @staticmethod
    def backward(ctx, grad):
        relations, factor = ctx.saved_tensors
        tau = ctx.temperature
        # u_hat = tau * relations; rows whose norm was clamped are a plain scaling (no projection).
        clamped = factor * (tau * _MIN_NORM) >= 1.0
        along = (relations * grad).sum(-1, keepdim=True)  # <relations, g>
        coef = torch.where(clamped, torch.zeros_like(along), factor * (tau * tau) * along)
        grad_diff = (grad * factor).addcmul_(relations, coef, value=-1.0)
        point_axis, anchor_axis = (1, 0) if ctx.anchor_major else (0, 1)
        grad_points = grad_diff.sum(anchor_axis) if ctx.needs_input_grad[0] else None
        grad_anchors = grad_diff.sum(point_axis).neg_() if ctx.needs_input_grad[1] else None
        return grad_points, grad_anchors, None, None, None


def candidate_terms(
    anchors: torch.Tensor, candidates: torch.Tensor, eps: float = 1e-6, search_chunk: Optional[int] = None
) -> CandidateTerms:
    """Nearest anchor, residual and the residual's norms for every candidate; see :class:`CandidateTerms`.

    The nearest-anchor search makes a ``[..., A]`` tensor, ``search_chunk`` candidates (along the
    second-to-last dim) at a time when given.

    Shape:
        anchors ``[A, D]``, candidates ``[..., D]`` (``[B, K+1, D]``, or ``[M, D]`` when shared).
    """
    dim = candidates.shape[-1]
    # Nearest anchor of every candidate: an index choice only, so no gradient flows through it.
    anchors_d = anchors.detach()
    half_sq = 0.5 * (anchors_d * anchors_d).sum(-1)
    if search_chunk is None:  # one chunk: no split and no copy through cat
        nearest = (candidates.detach() @ anchors_d.T - half_sq).argmax(-1)  # [...]
    else:
        chunks = candidates.detach().split(search_chunk, dim=-2)
        nearest = torch.cat([(chunk @ anchors_d.T - half_sq).argmax(-1) for chunk in chunks], dim=-1)

    near_anchor = F.embedding(nearest, anchors)  # [..., D]: a_p
    residual = candidates - near_anchor  # [..., D], the only tensor of the candidates' size we make
    res_sq = torch.linalg.vector_norm(residual, dim=-1, keepdim=True).square()  # [..., 1]
    res_eps = 2.0 * eps * residual.sum(-1, keepdim=True)  # [..., 1]
    res_near = (residual * near_anchor).sum(-1, keepdim=True)  # [..., 1]: <r, a_p>
    return CandidateTerms(
        residual=residual,
        nearest=nearest,
        per_candidate=res_sq + res_eps + 2.0 * res_near,
        near_sq=res_sq + res_eps + dim * eps * eps,
    )


def per_sample_scores(tables: AnchorTables, terms: CandidateTerms, anchors: torch.Tensor) -> torch.Tensor:
    """The scores of :func:`gram_relation_logits` from its pieces.

    Shape:
        terms of candidates ``[B, K+1, D]`` -> ``[B, A, K+1]`` (a view of a ``[B, K+1, A]`` layout).
    """
    batch, num_candidates = terms.nearest.shape
    num_anchors = anchors.shape[0]
    # <c - a_j + eps, s_bj> / tau = <r, s_bj / tau> + <P[p, j], s_bj / tau>
    rows_of_p = terms.nearest[:, :, None].expand(batch, num_candidates, num_anchors)
    dot = torch.baddbmm(
        torch.gather(tables.anchor_term, 1, rows_of_p), terms.residual, tables.student_rel.transpose(1, 2)
    )
    logits = dot * inverse_norms(tables.anchor_diff_sq, terms, anchors)  # [B, K+1, A]
    bound = torch.linalg.vector_norm(tables.student_rel, dim=-1)[:, None, :]  # [B, 1, A]: 1 / tau
    return rearrange(within_cosine_bound(logits, bound), "b k a -> b a k")


def within_cosine_bound(logits: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """``logits`` clamped to ``[-bound, bound]``, ``bound = |s_bj| = 1 / tau``: a cosine over tau.

    Exact scores never leave that range, so this changes nothing but rounding there. It guards
    against the one case the re-centring cannot make exact: when embeddings collapse (all rows
    within about 1e-7 of each other, as gradient-element embeddings of a confident teacher do),
    ``|c - a_j + eps|^2`` for ``j != p`` is a difference of terms of size ``|r|`` whose rounding
    error is as large as the result, and ``1 / |c - a_j + eps|`` can come out orders of magnitude
    too large. Clamped entries get no gradient (their value is rounding noise).
    """
    return torch.minimum(torch.maximum(logits, -bound), bound)


def inverse_norms(anchor_diff_sq: torch.Tensor, terms: CandidateTerms, anchors: torch.Tensor) -> torch.Tensor:
    """``1 / |c - a_j + eps|``, laid out ``[..., A]`` for candidates ``[..., D]``."""
    num_anchors, dim = anchors.shape
    lead = terms.nearest.shape
    # |c - a_j + eps|^2 = |r|^2 + 2 <r, a_p - a_j + eps> + |P[p, j]|^2, for j != p
    far_sq = torch.addmm(
        (anchor_diff_sq[terms.nearest] + terms.per_candidate).reshape(-1, num_anchors),
        terms.residual.reshape(-1, dim),
        anchors.T,
        alpha=-2.0,
    ).view(*lead, num_anchors)
    is_near = torch.arange(num_anchors, device=anchors.device) == terms.nearest[..., None]  # [..., A]
    return torch.rsqrt(torch.where(is_near, terms.near_sq, far_sq).clamp_min(_MIN_NORM_SQ))


def anchor_free_logits(student: torch.Tensor, candidates: torch.Tensor, temperature: float) -> torch.Tensor:
    """CRD's scores ``<c[b,k], s[b]> / tau`` laid out as ``[B, 1, K+1]`` (one row per sample).

    Shape:
        student ``[B, D]``, candidates ``[B, K+1, D]`` -> ``[B, 1, K+1]``.
    """
    return torch.bmm(student[:, None, :], rearrange(candidates, "b k d -> b d k")) / temperature


def in_batch_candidate_index(batch: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Candidate positions for in-batch negatives: row ``i`` is ``[i, 0, .., i-1, i+1, .., B-1]``.

    Shape:
        -> ``[B, B]`` (index 0 = the positive, then the ``B - 1`` other samples).
    """
    rows = torch.arange(batch, device=device)[:, None]
    others = torch.arange(batch - 1, device=device)[None, :]
    return torch.cat([rows, others + (others >= rows).long()], dim=1)

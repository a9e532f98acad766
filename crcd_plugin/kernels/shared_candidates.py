"""Relation scores for candidates that every sample shares (in-batch and queue negatives).

The candidate side of the scores (``c_m - a_j + eps`` and its norm) does not depend on the sample,
so it is made once per batch, ``[A, M]``, instead of once per sample, ``[B, A, K+1]``; only the
products with the student relations are per sample. Values equal :func:`gram_relation_logits`
on the per-sample candidates (``candidates`` expanded to ``[B, M, D]``) up to rounding.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from crcd_plugin._dtypes import at_least_fp32
from crcd_plugin.kernels.relation import (
    CandidateTerms,
    anchor_relations,
    candidate_terms,
    inverse_norms,
    within_cosine_bound,
)


class SharedRelations(NamedTuple):
    """The student side of shared-candidate scores, laid out anchor-major (``[A, B, ...]``) so that
    the products with the candidates are plain (batched) matrix products with ``[A, B, M]`` output.

    ``anchor_diff_sq`` and ``anchor_term`` exist only in the Gram form (see :func:`uses_gram_form`).
    """

    student_rel: torch.Tensor  # [A(j), B, D]: normalize(s_b - a_j + eps) / tau
    anchor_diff_sq: Optional[torch.Tensor]  # [A(p), A(j)]: |P[p, j]|^2, P[p, j] = a_p - a_j + eps
    anchor_term: Optional[torch.Tensor]  # [A(j), B, A(p)]: <P[p, j], s_bj> / tau


def uses_gram_form(batch: int, dim: int) -> bool:
    """Which exact form :func:`shared_scores` takes for ``B`` samples of ``D`` dims.

    - The difference form makes the teacher relations ``normalize(c_m - a_j + eps)`` themselves,
      ``[A, M, D]``: exact differences as in the naive formulation, no re-centring needed, and one
      batched product per anchor. That tensor is ``D / B`` times the ``[A, B, M]`` scores.
    - The Gram form re-centres each candidate on its nearest anchor (as
      :func:`gram_relation_logits` does) and never makes more than ``[M, D]`` per candidate, for
      two more products (a one-hot look-up ``[A * B, A] x [A, M]`` and the ``[M, A]`` norms).

    So the difference form is taken when its tensor is no larger than the scores (``D <= B``),
    where it is also the faster one (1.5-1.7x at ``B >= D`` on CPU); the Gram form otherwise
    (1.8x faster at ``B = 32, M = 4096, D = 128``).
    """
    return dim > batch


def shared_student_relations(
    student: torch.Tensor, anchors: torch.Tensor, temperature: Union[float, torch.Tensor], eps: float = 1e-6
) -> SharedRelations:
    """Student relations (and, for the Gram form, the anchor-pair tables); see :class:`SharedRelations`.

    Shape:
        student ``[B, D]``, anchors ``[A, D]``.
    """
    student_rel = anchor_relations(student, anchors, eps, temperature)  # [A(j), B, D]
    if not uses_gram_form(*student.shape):
        return SharedRelations(student_rel, None, None)
    anchor_diff = anchors[None, :, :] - anchors[:, None, :] + eps  # [A(j), A(p), D]: P[p, j]
    return SharedRelations(
        student_rel=student_rel,
        anchor_diff_sq=(anchor_diff * anchor_diff).sum(-1).T,
        anchor_term=torch.bmm(student_rel, anchor_diff.transpose(1, 2)),  # [A(j), B, A(p)]
    )


def shared_relation_logits(
    student: torch.Tensor,
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    temperature: float,
    eps: float = 1e-6,
) -> torch.Tensor:
    """:func:`gram_relation_logits` for candidates that every sample shares (in-batch, queue).

    Same scores, exact also where a candidate equals or nearly equals an anchor, but the candidate
    side is made once for the batch and no ``[B, M, D]`` tensor exists; see :func:`uses_gram_form`
    for the two exact forms it picks from.

    Shape:
        student ``[B, D]``, anchors ``[A, D]``, candidates ``[M, D]`` -> ``[B, A, M]`` (a view of
        an ``[A, B, M]`` layout: reductions over candidates run along contiguous memory).

    Example:
        >>> s, a, c = torch.randn(4, 8), torch.randn(3, 8), torch.randn(6, 8)
        >>> shared_relation_logits(s, a, c, temperature=0.05).shape
        torch.Size([4, 3, 6])
    """
    relations = shared_student_relations(student, anchors, temperature, eps)
    return shared_scores(relations, anchors, candidates, eps)


def shared_scores(
    relations: SharedRelations, anchors: torch.Tensor, candidates: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Scores of every sample against the shared ``candidates``, from :func:`shared_student_relations`.

    Shape:
        candidates ``[M, D]`` -> ``[B, A, M]`` (a view of an ``[A, B, M]`` layout).
    """
    if relations.anchor_term is None:
        teacher_rel = anchor_relations(candidates, anchors, eps)  # [A, M, D]
        return torch.bmm(relations.student_rel, teacher_rel.transpose(1, 2)).transpose(0, 1)
    return _gram_scores(relations, candidate_terms(anchors, candidates, eps), anchors)


def shared_positive_scores(
    relations: SharedRelations, anchors: torch.Tensor, positives: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Scores of every sample against its own candidate ``positives[b]`` (queue mode's positive).

    Shape:
        positives ``[B, D]`` -> ``[B, A]``.
    """
    student_rel = relations.student_rel
    if relations.anchor_term is None:
        teacher_rel = anchor_relations(positives, anchors, eps)  # [A, B, D]
        # A product and a sum: an einsum here runs as [A * B] batched 1 x 1 products, whose
        # backward is an order of magnitude slower on CPU.
        return (student_rel * teacher_rel).sum(-1).T
    assert relations.anchor_diff_sq is not None  # the Gram form has both tables
    terms = candidate_terms(anchors, positives, eps)
    samples = torch.arange(student_rel.shape[1], device=anchors.device)
    # <c_b - a_j + eps, s_bj> / tau = <r_b, s_bj / tau> + <P[p_b, j], s_bj / tau>
    dot = torch.einsum("jbd,bd->bj", student_rel, terms.residual)
    looked_up = relations.anchor_term[:, samples, terms.nearest].T  # [B, A]
    logits = (dot + looked_up) * inverse_norms(relations.anchor_diff_sq, terms, anchors)
    return within_cosine_bound(logits, torch.linalg.vector_norm(student_rel, dim=-1).T)  # [B, A]


def _gram_scores(relations: SharedRelations, terms: CandidateTerms, anchors: torch.Tensor) -> torch.Tensor:
    """The Gram form: ``<c_m - a_j + eps, s_bj> = <P[p_m, j], s_bj> + <r_m, s_bj>`` over the ``A * B``
    rows of (anchor, sample) pairs, with ``r_m = c_m - a_p`` (see :func:`gram_relation_logits`).

    The table look-up by nearest anchor is a product with the one-hot ``[M, A]`` matrix of ``p``
    (exact: one term times 1, the others times 0; an ``index_select`` along the table's last dim
    was several times slower on CPU), and the residual product is added to it in place.
    """
    student_rel, anchor_term = relations.student_rel, relations.anchor_term
    assert anchor_term is not None and relations.anchor_diff_sq is not None  # the Gram form has both tables
    num_anchors, batch, dim = student_rel.shape
    num_candidates = terms.nearest.shape[0]
    one_hot = F.one_hot(terms.nearest, num_anchors).to(anchor_term.dtype)  # [M, A(p)]
    dot = torch.mm(anchor_term.reshape(num_anchors * batch, num_anchors), one_hot.T)  # [A * B, M]
    dot = dot.addmm_(student_rel.reshape(num_anchors * batch, dim), terms.residual.T)
    norms = inverse_norms(relations.anchor_diff_sq, terms, anchors).T  # [A, M]
    logits = dot.view(num_anchors, batch, num_candidates) * norms[:, None, :]  # [A, B, M]
    bound = torch.linalg.vector_norm(student_rel, dim=-1)[:, :, None]  # [A, B, 1]: 1 / tau
    return within_cosine_bound(logits, bound).transpose(0, 1)


def candidate_scores(
    query: torch.Tensor,
    anchors: Optional[torch.Tensor],
    candidates: torch.Tensor,
    temperature: Union[float, torch.Tensor],
    eps: float,
    relations: Optional[SharedRelations] = None,
) -> torch.Tensor:
    """Scores of every sample against the shared ``candidates``, in fp32 at least.

    ``anchors=None`` gives CRD's scores ``<c_m, s_b> / tau``; ``relations`` are those of
    :func:`shared_student_relations`, made once when the candidates come in chunks.

    Shape:
        query ``[B, D]``, anchors ``[A, D]`` or None, candidates ``[M, D]`` -> ``[B, A, M]``
        (``A = 1`` without anchors).
    """
    if anchors is None:
        return at_least_fp32((query @ candidates.T / temperature)[:, None, :])  # [B, 1, M]
    if relations is None:
        relations = shared_student_relations(query, anchors, temperature, eps)
    return at_least_fp32(shared_scores(relations, anchors, candidates, eps))


def positive_scores(
    query: torch.Tensor,
    anchors: Optional[torch.Tensor],
    positives: torch.Tensor,
    temperature: Union[float, torch.Tensor],
    eps: float,
    relations: Optional[SharedRelations] = None,
) -> torch.Tensor:
    """Scores of every sample against its own candidate ``positives[b]``, in fp32 at least.

    Shape:
        query ``[B, D]``, anchors ``[A, D]`` or None, positives ``[B, D]`` -> ``[B, A]``.
    """
    if anchors is None:
        return at_least_fp32((query * positives).sum(-1, keepdim=True) / temperature)  # [B, 1]
    if relations is None:
        relations = shared_student_relations(query, anchors, temperature, eps)
    return at_least_fp32(shared_positive_scores(relations, anchors, positives, eps))

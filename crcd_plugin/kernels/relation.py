"""Relation scores of CRCD: the exact Gram-expanded kernel and the naive reference.

Both compute, for student embeddings ``s [B, D]``, anchors ``a [A, D]`` and candidates
``c [B, K+1, D]``, the score ``<normalize(c[b,k] - a[j] + eps), normalize(s[b] - a[j] + eps)> / tau``
laid out as ``[B, A, K+1]``. Only the naive one builds the ``[B, A, K+1, D]`` tensor.
"""

from __future__ import annotations

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
    of with ``|c| |a|``. The entry ``j = p`` itself, where the relation can be as short as ``eps``,
    is assembled from ``r``-only terms (``|r + eps|^2 = |r|^2 + 2 eps sum(r) + D eps^2``), so its
    large gradient (``~1 / |r + eps|``) never meets the ``a_p - a_j`` terms that would cancel.
    The identity holds for any ``p``: the nearest-anchor search only decides where precision goes.

    Cost: three ``[B, K+1, D] x [D, A]`` products forward (one of them without gradient), one
    ``[B, K+1, D]`` residual, ``[A, A, D]`` / ``[B, A, A]`` side tensors and ``[B, A, K+1]`` scores.

    Shape:
        student ``[B, D]``, anchors ``[A, D]``, candidates ``[B, K+1, D]`` -> ``[B, A, K+1]``.
    """
    batch, num_anchors = student.shape[0], anchors.shape[0]
    num_candidates = candidates.shape[1]

    student_rel = F.normalize(student[:, None, :] - anchors[None, :, :] + eps, dim=-1)  # [B, A, D]

    # Nearest anchor of every candidate: an index choice only, so no gradient flows through it.
    anchors_d = anchors.detach()
    proximity = candidates.detach() @ anchors_d.T - 0.5 * (anchors_d * anchors_d).sum(-1)
    nearest = proximity.argmax(-1)  # [B, K+1]
    gather_index = nearest[:, None, :].expand(batch, num_anchors, num_candidates)  # [B, A, K+1]

    residual = candidates - anchors[nearest]  # [B, K+1, D], the only tensor of that size we make
    residual_t = rearrange(residual, "b k d -> b d k")
    res_anchor = torch.matmul(anchors, residual_t)  # [B, A, K+1]: <r_bk, a_j>
    res_student = torch.bmm(student_rel, residual_t)  # [B, A, K+1]: <r_bk, s_bj>
    res_sq = torch.linalg.vector_norm(residual, dim=-1).square()[:, None, :]  # [B, 1, K+1]
    res_sum = residual.sum(-1)[:, None, :]  # [B, 1, K+1]

    # Entries j = p, from the exact difference r + eps: no term of these sums cancels.
    near_index = nearest[:, None, :]  # [B, 1, K+1]
    student_sum = student_rel.sum(-1)  # [B, A]
    near_dot = torch.gather(res_student, 1, near_index) + eps * torch.gather(student_sum, 1, nearest)[:, None, :]
    near_sq = res_sq + 2.0 * eps * res_sum + student.shape[-1] * eps * eps
    near_logits = near_dot * torch.rsqrt(near_sq.clamp_min(_MIN_NORM_SQ))  # [B, 1, K+1]

    # Entries j != p, through the Gram products of the residual.
    anchor_diff = anchors[:, None, :] - anchors[None, :, :] + eps  # [A(p), A(j), D]
    anchor_diff_sq = rearrange((anchor_diff * anchor_diff).sum(-1), "p j -> j p")
    anchor_term = torch.einsum("pjd,bjd->bjp", anchor_diff, student_rel)  # [B, A(j), A(p)]
    res_near = torch.gather(res_anchor, 1, near_index)  # [B, 1, K+1]: <r_bk, a_p>
    diff_sq = torch.gather(anchor_diff_sq.expand(batch, num_anchors, num_anchors), 2, gather_index)
    # |c - a_j + eps|^2 = |r|^2 + 2 <r, P[p, j]> + |P[p, j]|^2
    cand_sq = res_sq + 2.0 * (res_near + eps * res_sum - res_anchor) + diff_sq
    # <c - a_j + eps, s_bj> = <r, s_bj> + <P[p, j], s_bj>
    dot = res_student + torch.gather(anchor_term, 2, gather_index)
    gram_logits = dot * torch.rsqrt(cand_sq.clamp_min(_MIN_NORM_SQ))

    anchor_ids = torch.arange(num_anchors, device=nearest.device)[None, :, None]
    logits = torch.where(anchor_ids == near_index, near_logits, gram_logits)
    return logits / temperature


def anchor_free_logits(student: torch.Tensor, candidates: torch.Tensor, temperature: float) -> torch.Tensor:
    """CRD's scores ``<c[b,k], s[b]> / tau`` laid out as ``[B, 1, K+1]`` (one row per sample).

    Shape:
        student ``[B, D]``, candidates ``[B, K+1, D]`` -> ``[B, 1, K+1]``.
    """
    return torch.bmm(student[:, None, :], rearrange(candidates, "b k d -> b d k")) / temperature

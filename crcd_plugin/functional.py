"""Pure functions of CRCD: relation scores, the NCE and InfoNCE objectives and Hinton KD.

Stateless, like ``torch.nn.functional``: the state (memories, NCE constant) lives in ``CRCDLoss``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from crcd_plugin._checks import check_positive_int
from crcd_plugin.kernels.objectives import at_least_fp32
from crcd_plugin.kernels.objectives import infonce_loss as _infonce_loss
from crcd_plugin.kernels.objectives import nce_log_normalizer as _nce_log_normalizer
from crcd_plugin.kernels.objectives import nce_loss as _nce_loss
from crcd_plugin.kernels.relation import gram_relation_logits

__all__ = ["infonce_loss", "kd_loss", "nce_log_normalizer", "nce_loss", "relation_logits"]


def relation_logits(
    student: torch.Tensor,
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    temperature: float,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Relation scores ``<normalize(c[b,k] - a[j] + eps), normalize(s[b] - a[j] + eps)> / temperature``.

    Exact also where a candidate equals or nearly equals an anchor (the relation then points along
    the constant ``eps`` direction), and never builds a ``[B, A, K+1, D]`` tensor; see
    :func:`crcd_plugin.kernels.gram_relation_logits` for how. Differentiable with respect to all
    three inputs. Computed in fp32 at least (fp16/bf16 inputs are upcast, fp64 stays fp64).

    Args:
        student: ``[B, D]`` embeddings being trained.
        anchors: ``[A, D]`` anchors.
        candidates: ``[B, K+1, D]`` candidates per sample; index 0 is the positive.
        temperature: Divides the cosine.
        eps: Added to every coordinate of each relation vector.

    Returns:
        ``[B, A, K+1]`` scores.

    Example:
        >>> s, a, c = torch.randn(4, 8), torch.randn(3, 8), torch.randn(4, 6, 8)
        >>> relation_logits(s, a, c, temperature=0.05).shape
        torch.Size([4, 3, 6])
    """
    _check_relation_inputs(student, anchors, candidates)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.promote_types(torch.promote_types(student.dtype, anchors.dtype), candidates.dtype)
    student, anchors, candidates = (at_least_fp32(x.to(dtype)) for x in (student, anchors, candidates))
    return gram_relation_logits(student, anchors, candidates, float(temperature), float(eps))


def nce_log_normalizer(logits: torch.Tensor, num_samples: int) -> torch.Tensor:
    """``log Z`` for NCE, ``Z = mean(exp(logits)) * num_samples`` (detached, computed in log space).

    ``CRCDLoss`` fixes it from the first training batch and keeps it in a buffer.
    """
    check_positive_int("num_samples", num_samples)
    return _nce_log_normalizer(logits, num_samples)


def nce_loss(
    logits: torch.Tensor,
    log_z: torch.Tensor,
    num_samples: int,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """CRD's NCE objective: ``P = exp(logit) / Z``, noise ``Pn = 1 / num_samples``.

    ``L = -(sum_rows log(P0 / (P0 + K Pn)) + sum_rows,k log(K Pn / (Pk + K Pn))) / rows``, evaluated
    as softplus terms in fp32 so that ``exp(1 / tau)`` never overflows, also for fp16 inputs.

    Args:
        logits: ``[..., K+1]`` scores, index 0 the positive.
        log_z: Scalar ``log Z`` (see :func:`nce_log_normalizer`).
        num_samples: ``N`` of the noise distribution.
        mask: Optional bool tensor like ``logits``; ``True`` entries are left out, rows whose
            positive is masked are dropped from the mean.

    Returns:
        Scalar loss: sum over a row's entries, mean over (kept) rows.
    """
    check_positive_int("num_samples", num_samples)
    _check_objective_inputs(logits, mask)
    return _nce_loss(logits, torch.as_tensor(log_z, device=logits.device), num_samples, mask)


def infonce_loss(logits: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """InfoNCE: cross-entropy of the ``K+1`` scores with target 0, mean over (kept) rows, in fp32.

    Args:
        logits: ``[..., K+1]`` scores, index 0 the positive.
        mask: Optional bool tensor like ``logits`` (see :func:`nce_loss`).
    """
    _check_objective_inputs(logits, mask)
    return _infonce_loss(logits, mask)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton KD: ``KL(softmax(t / T) || softmax(s / T)) * T^2``, mean over the batch, in fp32.

    Shape:
        student_logits ``[B, C]``, teacher_logits ``[B, C]`` -> scalar.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got "
            f"{list(student_logits.shape)} and {list(teacher_logits.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p_student = F.log_softmax(at_least_fp32(student_logits) / temperature, dim=-1)
    log_p_teacher = F.log_softmax(at_least_fp32(teacher_logits.detach()) / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature**2


def _check_relation_inputs(student: torch.Tensor, anchors: torch.Tensor, candidates: torch.Tensor) -> None:
    for name, value, ndim in (("student", student, 2), ("anchors", anchors, 2), ("candidates", candidates, 3)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
        if value.ndim != ndim:
            raise ValueError(f"{name} must be {ndim}-D, got shape {list(value.shape)}")
    dim = student.shape[1]
    if anchors.shape[1] != dim or candidates.shape[2] != dim:
        raise ValueError(
            f"student [B, D], anchors [A, D] and candidates [B, K+1, D] must share D, got "
            f"{list(student.shape)}, {list(anchors.shape)}, {list(candidates.shape)}"
        )
    if candidates.shape[0] != student.shape[0]:
        raise ValueError(
            f"candidates must have the batch size of student ({student.shape[0]}), got {candidates.shape[0]}"
        )
    if anchors.shape[0] < 1 or candidates.shape[1] < 1:
        raise ValueError("anchors and candidates must not be empty")
    if len({student.device, anchors.device, candidates.device}) != 1:
        raise ValueError(
            f"student, anchors and candidates must be on one device, got {student.device}, "
            f"{anchors.device}, {candidates.device}"
        )


def _check_objective_inputs(logits: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError("logits must be a floating-point torch.Tensor")
    if logits.shape[-1] < 2:
        raise ValueError(f"logits need a positive and at least one negative in the last dim, got {list(logits.shape)}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != logits.shape):
        raise ValueError(
            f"mask must be a bool tensor of shape {list(logits.shape)}, got {mask.dtype} {list(mask.shape)}"
        )

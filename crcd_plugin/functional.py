"""Pure functions of CRCD, checked: relation scores, the NCE and InfoNCE objectives and Hinton KD.

Stateless, like ``torch.nn.functional``: the state (memories, NCE constant) lives in ``CRCDLoss``.
These are the public, argument-checking forms; the math they run is in :mod:`crcd_plugin.kernels`
(:func:`contrastive_loss`, the objective over scores in any positive layout, is the kernels' own,
which ``CRCDLoss`` reaches through the backend dispatcher).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from crcd_plugin._checks import check_choice, check_positive_int
from crcd_plugin._dtypes import at_least_fp32
from crcd_plugin.kernels.objectives import (
    POSITIVE_LAYOUTS,
    PositiveLayout,
    contrastive_loss_unchecked,
    infonce_loss_unchecked,
    nce_log_normalizer_unchecked,
    nce_loss_unchecked,
)
from crcd_plugin.kernels.relation import gram_relation_logits

__all__ = ["contrastive_loss", "infonce_loss", "kd_loss", "nce_log_normalizer", "nce_loss", "relation_logits"]

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


def _legacy_noise_size(noise_size: Optional[int], num_samples: Optional[int], owner: str) -> int:
    """``noise_size``, or 0.2.0's name for it, ``num_samples=`` (with a ``DeprecationWarning``)."""
    if num_samples is not None:
        warnings.warn(f"{owner}(num_samples=...) is deprecated since crcd-plugin 0.3: use noise_size=",
                      DeprecationWarning, stacklevel=3)
        if noise_size is not None:
            raise TypeError(f"{owner}: pass noise_size or num_samples (deprecated), not both")
        noise_size = num_samples
    if noise_size is None:
        raise TypeError(f"{owner} needs noise_size (NCE's N)")
    return noise_size


def nce_log_normalizer(
    logits: torch.Tensor, noise_size: Optional[int] = None, *, num_samples: Optional[int] = None
) -> torch.Tensor:
    """``log Z`` for NCE, ``Z = mean(exp(logits)) * noise_size`` (detached, computed in log space).

    ``CRCDLoss`` fixes it from the first training batch and keeps it in a buffer. ``num_samples``
    is 0.2.0's name of ``noise_size`` (deprecated).
    """
    noise_size = _legacy_noise_size(noise_size, num_samples, "nce_log_normalizer")
    check_positive_int("noise_size", noise_size)
    return nce_log_normalizer_unchecked(logits, noise_size)


def nce_loss(
    logits: torch.Tensor,
    log_z: torch.Tensor,
    noise_size: Optional[int] = None,
    mask: Optional[torch.Tensor] = None,
    *,
    num_samples: Optional[int] = None,
) -> torch.Tensor:
    """CRD's NCE objective: ``P = exp(logit) / Z``, noise ``Pn = 1 / noise_size``.

    ``L = -(sum_rows log(P0 / (P0 + K Pn)) + sum_rows,k log(K Pn / (Pk + K Pn))) / rows``, evaluated
    as softplus terms in fp32 so that ``exp(1 / tau)`` never overflows, also for fp16 inputs.

    Args:
        logits: ``[..., K+1]`` scores, index 0 the positive.
        log_z: Scalar ``log Z`` (see :func:`nce_log_normalizer`).
        noise_size: ``N`` of the noise distribution.
        mask: Optional bool tensor like ``logits``; ``True`` entries are left out, rows whose
            positive is masked are dropped from the mean.
        num_samples: 0.2.0's name of ``noise_size`` (deprecated).

    Returns:
        Scalar loss: sum over a row's entries, mean over (kept) rows.
    """
    noise_size = _legacy_noise_size(noise_size, num_samples, "nce_loss")
    check_positive_int("noise_size", noise_size)
    _check_objective_inputs(logits, mask)
    return nce_loss_unchecked(logits, torch.as_tensor(log_z, device=logits.device), noise_size, mask)


def infonce_loss(logits: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """InfoNCE: cross-entropy of the ``K+1`` scores with target 0, mean over (kept) rows, in fp32.

    Args:
        logits: ``[..., K+1]`` scores, index 0 the positive.
        mask: Optional bool tensor like ``logits`` (see :func:`nce_loss`).
    """
    _check_objective_inputs(logits, mask)
    return infonce_loss_unchecked(logits, mask)


def contrastive_loss(
    scores: torch.Tensor,
    log_z: torch.Tensor,
    z_ready: torch.Tensor,
    *,
    objective: str,
    noise_size: int,
    layout: PositiveLayout = "first",
    positive: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    positive_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NCE or InfoNCE over relation scores whose positives sit in one of three layouts.

    - ``"first"``: per-sample candidates, column 0 of each row is its positive (``C = K+1``).
    - ``"diagonal"``: in-batch shared candidates, column ``b`` is sample ``b``'s positive (``C = B``).
    - ``"separate"``: shared negatives, the positives scored apart in ``positive`` (``C = K``).

    For NCE, ``log_z`` is used where ``z_ready`` is set, otherwise it is taken from these scores (a
    non-finite batch never fixes it); InfoNCE passes ``log_z`` through. Rows whose positive is
    masked are left out of the mean. Reductions: sum over a row's entries, mean over kept rows.

    Args:
        scores: ``[B, A, C]`` relation scores (``A = 1`` without anchors).
        log_z: Scalar stored ``log Z``; z_ready: scalar bool, whether it is fixed.
        objective: ``"nce"`` or ``"infonce"``.
        noise_size: NCE's ``N`` (noise ``Pn = 1 / N``).
        layout: Where the positives are (see above).
        positive: ``[B, A]`` scores of the separate positives (``layout="separate"`` only).
        mask: Bool, ``True`` = entry left out: ``[B, A, C]`` (``"first"``) or ``[A, C]`` shared.
        positive_mask: ``[B, A]`` bool, rows whose separate positive is masked (dropped).

    Returns:
        ``(loss, log_z_to_store)``, two scalars.

    Raises:
        ValueError: an unknown ``objective`` or ``layout``, ``noise_size`` not a positive int,
            ``scores`` not ``[B, A, C]``, or ``positive`` given for another layout than
            ``"separate"`` (or missing for it).

    Example:
        >>> scores = torch.randn(4, 3, 6)
        >>> state = torch.zeros(()), torch.tensor(False)  # log Z, not fixed yet
        >>> loss, log_z = contrastive_loss(scores, *state, objective="nce", noise_size=100)
        >>> loss.shape, bool(log_z == nce_log_normalizer(scores, 100))
        (torch.Size([]), True)
    """
    check_choice("objective", objective, ("nce", "infonce"))
    check_choice("layout", layout, POSITIVE_LAYOUTS)
    check_positive_int("noise_size", noise_size)
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point() or scores.dim() != 3:
        raise ValueError(f"scores must be a floating-point [B, A, C] tensor, got {_describe(scores)}")
    if (positive is not None) != (layout == "separate"):
        raise ValueError(f'positive is needed with layout="separate" and only then; got layout={layout!r} '
                         f"and positive={_describe(positive)}")
    return contrastive_loss_unchecked(
        scores, log_z, z_ready, objective=objective, noise_size=noise_size, layout=layout, positive=positive,
        mask=mask, positive_mask=positive_mask,
    )


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return "None" if value is None else type(value).__name__


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 4.0,
    standardize: bool = False,
) -> torch.Tensor:
    """Hinton KD: ``KL(softmax(t / T) || softmax(s / T)) * T^2``, mean over the batch, in fp32.

    With ``standardize``, each row of both logits is first z-scored (``(z - mean) / std``, the
    logit standardisation of Sun et al., CVPR 2024): the student then matches the teacher's logit
    *relations*, not its logit scale, and the loss no longer depends on the student logits' norm,
    so its gradient shrinks as they grow instead of staying large (docs/reliability.md).

    Shape:
        student_logits ``[B, C]``, teacher_logits ``[B, C]`` -> scalar.

    Example:
        >>> s, t = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[2.0, 4.0, 6.0]])
        >>> float(kd_loss(s, t, 2.0, standardize=True)) < 1e-6   # same relations, other scale
        True
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got "
            f"{list(student_logits.shape)} and {list(teacher_logits.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    student, teacher = at_least_fp32(student_logits), at_least_fp32(teacher_logits.detach())
    if standardize:
        if student.shape[-1] < 2:
            raise ValueError(f"standardize=True needs at least 2 classes, got logits of shape {list(student.shape)}")
        student, teacher = _standardize(student), _standardize(teacher)
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature**2


def _standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Each row z-scored: ``(z - mean) / (std + eps)`` (unbiased std, as Sun et al.'s code)."""
    return (logits - logits.mean(dim=-1, keepdim=True)) / (logits.std(dim=-1, keepdim=True) + eps)


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

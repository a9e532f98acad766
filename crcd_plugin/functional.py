"""Pure functions of CRCD: relation scores, the NCE and InfoNCE objectives and Hinton KD.

Stateless, like ``torch.nn.functional``: the state (memories, NCE constant) lives in ``CRCDLoss``,
which reaches the objectives through :func:`contrastive_loss` (via the kernel dispatcher).
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from crcd_plugin._checks import check_choice, check_positive_int
from crcd_plugin._dtypes import at_least_fp32
from crcd_plugin.kernels.nce import keep_or_fix_log_z, nce_log_normalizer_from_parts, nce_shift  # noqa: F401
from crcd_plugin.kernels.relation import gram_relation_logits

__all__ = ["contrastive_loss", "infonce_loss", "kd_loss", "nce_log_normalizer", "nce_loss", "relation_logits"]

PositiveLayout = Literal["first", "diagonal", "separate"]
POSITIVE_LAYOUTS = ("first", "diagonal", "separate")


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
    return _nce_log_normalizer(logits, noise_size)


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
    return _nce_loss(logits, torch.as_tensor(log_z, device=logits.device), noise_size, mask)


def infonce_loss(logits: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """InfoNCE: cross-entropy of the ``K+1`` scores with target 0, mean over (kept) rows, in fp32.

    Args:
        logits: ``[..., K+1]`` scores, index 0 the positive.
        mask: Optional bool tensor like ``logits`` (see :func:`nce_loss`).
    """
    _check_objective_inputs(logits, mask)
    return _infonce_loss(logits, mask)


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

    Example:
        >>> scores = torch.randn(4, 3, 6)
        >>> state = torch.zeros(()), torch.tensor(False)  # log Z, not fixed yet
        >>> loss, log_z = contrastive_loss(scores, *state, objective="nce", noise_size=100)
        >>> loss.shape, bool(log_z == nce_log_normalizer(scores, 100))
        (torch.Size([]), True)
    """
    check_choice("layout", layout, POSITIVE_LAYOUTS)
    if layout == "first":
        if objective == "infonce":
            return _infonce_loss(scores, mask), log_z
        log_z = keep_or_fix_log_z(log_z, z_ready, _nce_log_normalizer(scores, noise_size))
        return _nce_loss(scores, log_z, noise_size, mask), log_z
    separate = layout == "separate"
    is_positive = None if separate else _diagonal(scores)  # [B, 1, M]
    dropped = positive_mask if separate else (None if mask is None else mask.T)  # [B, A]
    if objective == "infonce":
        masked = _masked_shared(scores, mask, is_positive, float("-inf"))
        if not separate:
            return kept_row_mean(_diagonal_cross_entropy(masked), dropped), log_z
        assert positive is not None, 'layout="separate" needs the positive scores'
        return kept_row_mean(_separate_positive_cross_entropy(positive, masked), dropped), log_z
    if positive is None:
        fresh = _nce_log_normalizer(scores, noise_size)
    else:
        fresh = nce_log_normalizer_with_positives(positive, scores, noise_size)
    log_z = keep_or_fix_log_z(log_z, z_ready, fresh)
    num_negatives = scores.shape[-1] - (0 if separate else 1)
    shift = nce_shift(log_z.to(scores.dtype), num_negatives, noise_size)
    per_row = nce_row_sums(scores, shift, mask, has_positive=False, is_positive=is_positive)
    if positive is not None:
        per_row = per_row + F.softplus(shift - positive)
    return kept_row_mean(per_row, dropped), log_z


def positive_columns(layout: str, batch: int, start: int, stop: int, device: torch.device) -> Optional[torch.Tensor]:
    """Where columns ``start .. stop`` of the scores hold positives: bool broadcastable to
    ``[B, A, stop - start]`` (None for ``"separate"``, whose positives are apart)."""
    columns = torch.arange(start, stop, device=device)
    if layout == "first":
        return columns == 0
    if layout == "diagonal":
        return (torch.arange(batch, device=device)[:, None] == columns)[:, None, :]
    return None


# ---------------------------------------------------------------------- the pieces of the objectives



def _nce_log_normalizer(logits: torch.Tensor, noise_size: int) -> torch.Tensor:
    """``log Z`` with ``Z = mean(exp(logits)) * N``, the constant NCE fixes on its first batch.

    Computed in log space, so no ``exp(1 / tau)`` overflow; returned detached (Z is a constant).
    """
    return log_mean_exp(at_least_fp32(logits.detach())) + math.log(noise_size)


def nce_log_normalizer_with_positives(
    positive: torch.Tensor, negatives: torch.Tensor, noise_size: int
) -> torch.Tensor:
    """:func:`_nce_log_normalizer` of the scores ``cat([positive[..., None], negatives], -1)``,
    without making that tensor (shared negatives scored apart from the per-sample positives).

    Shape:
        positive ``[...]``, negatives ``[..., K]`` -> scalar.
    """
    positive, negatives = at_least_fp32(positive.detach()), at_least_fp32(negatives.detach())
    # mean over all = (mean(pos) + K mean(neg)) / (K + 1); K as a tensor so compile does not specialise.
    num_negatives = positive.new_full((), negatives.shape[-1])
    log_sum = torch.logaddexp(log_mean_exp(positive), torch.log(num_negatives) + log_mean_exp(negatives))
    return log_sum - torch.log1p(num_negatives) + math.log(noise_size)


def nce_row_sums(
    logits: torch.Tensor,
    shift: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    has_positive: bool = True,
    is_positive: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-row NCE sums ``softplus(-l0) + sum_k softplus(lk)``, ``l = logit - shift``.

    The positive is column 0; ``has_positive=False`` treats every column as a negative (a later
    chunk of a row's candidates, or shared negatives whose positive is scored apart), and a bool
    ``is_positive`` broadcastable to ``logits`` marks the positives anywhere (shared in-batch
    candidates, where sample ``b``'s positive is column ``b``).

    Shape:
        logits ``[..., k]``, mask broadcastable to logits -> ``[...]``.
    """
    logits = at_least_fp32(logits)
    if is_positive is None:
        is_positive = (torch.arange(logits.shape[-1], device=logits.device) == 0) & has_positive
    # One softplus over all entries, the positive's sign flipped, rather than separate terms for
    # the [..., 0] and [..., 1:] slices: with the slices, torch 2.13's inductor produced a backward
    # through the relation kernel 0.3% off eager. sign * logit - sign * shift in one addcmul pass
    # (exact: sign = +-1) is 2x faster in eager than a subtraction, a negation and a where().
    signs = 1.0 - 2.0 * is_positive.to(logits.dtype)
    terms = F.softplus(torch.addcmul(-shift * signs, logits, signs))
    if mask is not None:
        terms = terms.masked_fill(mask & ~is_positive, 0.0)
    return terms.sum(-1)


def masked_row_mean(per_row: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over rows, leaving out rows whose positive (``mask[..., 0]``) is masked."""
    return kept_row_mean(per_row, None if mask is None else mask[..., 0])


def kept_row_mean(per_row: torch.Tensor, dropped: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over rows, leaving out rows where ``dropped`` (like ``per_row``) is set."""
    if dropped is None:
        return per_row.mean()
    keep = ~dropped
    return torch.where(keep, per_row, torch.zeros_like(per_row)).sum() / keep.sum().clamp_min(1)


def log_mean_exp(x: torch.Tensor) -> torch.Tensor:
    """``log(mean(exp(x)))`` over all entries, without overflow (detach first where it is a constant)."""
    # No reshape: the scores may be a permuted view, and flattening it would copy it (eager) or
    # make the compiled reduction walk it against its memory order. mean() rather than
    # logsumexp - log(numel), so that torch.compile does not specialise on the number of scores.
    peak = x.amax()
    return peak + torch.log(torch.exp(x - peak).mean())


def _nce_loss(
    logits: torch.Tensor,
    log_z: torch.Tensor,
    noise_size: int,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """CRD's NCE loss with ``P = exp(logit) / Z`` and noise ``Pn = 1 / N``, averaged over rows.

    ``-log(P0 / (P0 + K Pn)) = softplus(-l0)`` and ``-log(K Pn / (Pk + K Pn)) = softplus(lk)`` with
    ``l = logit - log(Z K / N)``, so no probability is ever formed and nothing overflows.

    Shape:
        logits ``[..., K+1]``; log_z scalar; mask like logits -> scalar (sum over entries of a row,
        mean over kept rows).
    """
    shift = nce_shift(log_z.to(at_least_fp32(logits).dtype), logits.shape[-1] - 1, noise_size)
    return masked_row_mean(nce_row_sums(logits, shift, mask), mask)


def masked_negatives(logits: torch.Tensor, mask: Optional[torch.Tensor], has_positive: bool = True) -> torch.Tensor:
    """``logits`` with masked negatives at ``-inf``; the positive column stays, so that a dropped
    row never becomes all ``-inf``."""
    if mask is None:
        return logits
    is_positive = (torch.arange(logits.shape[-1], device=logits.device) == 0) & has_positive
    return logits.masked_fill(mask & ~is_positive, float("-inf"))


def _infonce_loss(logits: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross-entropy of the ``K+1`` scores with target 0, averaged over rows.

    Shape:
        logits ``[..., K+1]``; mask like logits -> scalar.
    """
    logits = at_least_fp32(logits)
    per_row = torch.logsumexp(masked_negatives(logits, mask), dim=-1) - logits[..., 0]
    return masked_row_mean(per_row, mask)


def _diagonal(scores: torch.Tensor) -> torch.Tensor:
    """In-batch candidates: ``[B, 1, M]`` bool, True where candidate ``m`` is sample ``b`` (its positive)."""
    samples = torch.arange(scores.shape[0], device=scores.device)
    columns = torch.arange(scores.shape[-1], device=scores.device)
    return (samples[:, None] == columns)[:, None, :]


def _diagonal_cross_entropy(scores: torch.Tensor) -> torch.Tensor:
    """InfoNCE rows ``[B, A]`` of in-batch scores ``[B, A, B]``, whose positive is column ``b``.

    One fused ``cross_entropy`` over the ``[A * B, B]`` rows (2x faster on CPU than a
    log-sum-exp and a diagonal, whose backward writes a zero tensor of the scores' size). The
    shared scores are anchor-major in memory, so the rows are a view.
    """
    batch = scores.shape[0]
    targets = torch.arange(batch, device=scores.device)  # sample b's positive is column b
    return _anchor_major_cross_entropy(scores.transpose(0, 1), targets)


def _separate_positive_cross_entropy(positive: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """InfoNCE rows ``[B, A]`` of separate positives ``[B, A]`` and shared scores ``[B, A, M]``.

    One fused ``cross_entropy`` over the ``[A * B, 1 + M]`` rows, the positive first (on CPU about
    2x faster in forward and backward than a log-sum-exp, a ``logaddexp`` and a subtraction).
    """
    rows = torch.cat([positive.T[:, :, None], scores.transpose(0, 1)], dim=-1)  # [A, B, 1 + M]
    targets = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)  # the positive first
    return _anchor_major_cross_entropy(rows, targets)


def _anchor_major_cross_entropy(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy of anchor-major scores ``rows [A, B, C]`` with sample ``b``'s target
    column ``targets[b]`` for every anchor: ``[B, A]``."""
    num_anchors, batch, num_columns = rows.shape
    flat = rows.reshape(num_anchors * batch, num_columns)  # row (j, b); a view where rows allow
    loss = F.cross_entropy(flat, targets.repeat(num_anchors), reduction="none")
    return loss.view(num_anchors, batch).T


def _masked_shared(
    scores: torch.Tensor, mask: Optional[torch.Tensor], is_positive: Optional[torch.Tensor], value: float
) -> torch.Tensor:
    """``scores`` with masked negatives set to ``value``; positives among them are never masked."""
    if mask is None:
        return scores
    excluded = mask if is_positive is None else mask & ~is_positive  # [A, M] or [B, A, M]
    return scores.masked_fill(excluded, value)


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

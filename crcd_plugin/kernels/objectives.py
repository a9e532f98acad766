"""The two contrastive objectives over relation scores ``[..., K+1]`` (index 0 = positive), in fp32.

Both take an optional boolean ``mask`` of the scores' shape (``True`` = excluded entry); a row whose
positive is masked is dropped from the average.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcasts fp16/bf16 to fp32 and leaves fp32/fp64 alone (fp64 keeps ``gradcheck`` possible)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def nce_log_normalizer(logits: torch.Tensor, num_samples: int) -> torch.Tensor:
    """``log Z`` with ``Z = mean(exp(logits)) * N``, the constant NCE fixes on its first batch.

    Computed in log space, so no ``exp(1 / tau)`` overflow; returned detached (Z is a constant).
    """
    return log_mean_exp(at_least_fp32(logits.detach())) + math.log(num_samples)


def nce_log_normalizer_with_positives(
    positive: torch.Tensor, negatives: torch.Tensor, num_samples: int
) -> torch.Tensor:
    """:func:`nce_log_normalizer` of the scores ``cat([positive[..., None], negatives], -1)``,
    without making that tensor (shared negatives scored apart from the per-sample positives).

    Shape:
        positive ``[...]``, negatives ``[..., K]`` -> scalar.
    """
    positive, negatives = at_least_fp32(positive.detach()), at_least_fp32(negatives.detach())
    # mean over all = (mean(pos) + K mean(neg)) / (K + 1); K as a tensor so compile does not specialise.
    num_negatives = positive.new_full((), negatives.shape[-1])
    log_sum = torch.logaddexp(log_mean_exp(positive), torch.log(num_negatives) + log_mean_exp(negatives))
    return log_sum - torch.log1p(num_negatives) + math.log(num_samples)


def nce_log_normalizer_from_parts(part_lse: torch.Tensor, num_scores: int, num_samples: int) -> torch.Tensor:
    """``log Z`` as :func:`nce_log_normalizer` gives it, from the log-sum-exps of disjoint parts of
    the scores (chunks of candidates, or rows), ``num_scores`` scores in all."""
    return torch.logsumexp(part_lse.reshape(-1), 0) - math.log(num_scores) + math.log(num_samples)


def keep_or_fix_log_z(log_z: torch.Tensor, z_ready: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """The stored ``log Z`` once it is fixed, else this batch's; a non-finite batch never fixes it."""
    return torch.where(z_ready | ~torch.isfinite(fresh), log_z, fresh)


def nce_shift(log_z: torch.Tensor, num_negatives: int, num_samples: int) -> torch.Tensor:
    """``log(Z K / N)``, what NCE subtracts from every score."""
    # log K as a tensor op: K = B - 1 for in-batch negatives, and compile must not specialise on B.
    return log_z + torch.log(log_z.new_full((), num_negatives)) - math.log(num_samples)


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


def nce_loss(
    logits: torch.Tensor,
    log_z: torch.Tensor,
    num_samples: int,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """CRD's NCE loss with ``P = exp(logit) / Z`` and noise ``Pn = 1 / N``, averaged over rows.

    ``-log(P0 / (P0 + K Pn)) = softplus(-l0)`` and ``-log(K Pn / (Pk + K Pn)) = softplus(lk)`` with
    ``l = logit - log(Z K / N)``, so no probability is ever formed and nothing overflows.

    Shape:
        logits ``[..., K+1]``; log_z scalar; mask like logits -> scalar (sum over entries of a row,
        mean over kept rows).
    """
    shift = nce_shift(log_z.to(at_least_fp32(logits).dtype), logits.shape[-1] - 1, num_samples)
    return masked_row_mean(nce_row_sums(logits, shift, mask), mask)


def masked_negatives(logits: torch.Tensor, mask: Optional[torch.Tensor], has_positive: bool = True) -> torch.Tensor:
    """``logits`` with masked negatives at ``-inf``; the positive column stays, so that a dropped
    row never becomes all ``-inf``."""
    if mask is None:
        return logits
    is_positive = (torch.arange(logits.shape[-1], device=logits.device) == 0) & has_positive
    return logits.masked_fill(mask & ~is_positive, float("-inf"))


def infonce_loss(logits: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross-entropy of the ``K+1`` scores with target 0, averaged over rows.

    Shape:
        logits ``[..., K+1]``; mask like logits -> scalar.
    """
    logits = at_least_fp32(logits)
    per_row = torch.logsumexp(masked_negatives(logits, mask), dim=-1) - logits[..., 0]
    return masked_row_mean(per_row, mask)

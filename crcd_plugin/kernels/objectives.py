"""The objectives over relation scores: NCE and InfoNCE, their pieces, and NCE's constant ``log Z``.

The bottom of the loss math, beside the score kernels: :func:`contrastive_loss_unchecked` takes scores whose
positives sit in one of three layouts (first, diagonal, separate), and
:func:`chunked_contrastive_loss` the same scores a chunk of candidates at a time under activation
checkpointing. The eager and compiled backends, the chunked reducer and the Triton kernel all fix,
keep and subtract ``log Z`` with the functions here. Nothing here checks its inputs: the public,
checked forms are in :mod:`crcd_plugin.functional`; the dispatcher
(:mod:`crcd_plugin.relation_loss`) and ``CRCDLoss`` check before they call.

Chunk-and-checkpoint: each chunk's ``[B, A, chunk]`` scores are reduced at once (to per-row
log-sum-exps for InfoNCE, or per-row NCE sums) under activation checkpointing, so peak memory is
``O(B * A * chunk)`` instead of ``O(B * A * C)``, for about one extra forward of time. Values and
gradients equal the unchunked loss.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Optional, cast

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from crcd_plugin._dtypes import at_least_fp32

PositiveLayout = Literal["first", "diagonal", "separate"]
POSITIVE_LAYOUTS = ("first", "diagonal", "separate")


def contrastive_loss_unchecked(
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
    """:func:`crcd_plugin.functional.contrastive_loss` without its argument checks: what every
    backend runs (the dispatcher sets ``layout`` and ``positive`` itself)."""
    if layout == "first":
        if objective == "infonce":
            return infonce_loss_unchecked(scores, mask), log_z
        log_z = keep_or_fix_log_z(log_z, z_ready, nce_log_normalizer_unchecked(scores, noise_size))
        return nce_loss_unchecked(scores, log_z, noise_size, mask), log_z
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
        fresh = nce_log_normalizer_unchecked(scores, noise_size)
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


def nce_log_normalizer_unchecked(logits: torch.Tensor, noise_size: int) -> torch.Tensor:
    """``log Z`` with ``Z = mean(exp(logits)) * N``, the constant NCE fixes on its first batch.

    Computed in log space, so no ``exp(1 / tau)`` overflow; returned detached (Z is a constant).
    """
    return log_mean_exp(at_least_fp32(logits.detach())) + math.log(noise_size)


def nce_log_normalizer_with_positives(
    positive: torch.Tensor, negatives: torch.Tensor, noise_size: int
) -> torch.Tensor:
    """:func:`nce_log_normalizer_unchecked` of the scores ``cat([positive[..., None], negatives], -1)``,
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


def nce_loss_unchecked(
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


def infonce_loss_unchecked(logits: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
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


# ---------------------------------------------------------------------- log Z
def nce_log_normalizer_from_parts(part_lse: torch.Tensor, num_scores: int, noise_size: int) -> torch.Tensor:
    """``log Z`` as :func:`nce_log_normalizer_unchecked` gives it, from the log-sum-exps of disjoint parts of
    the scores (chunks of candidates, or rows), ``num_scores`` scores in all."""
    return torch.logsumexp(part_lse.reshape(-1), 0) - math.log(num_scores) + math.log(noise_size)


def keep_or_fix_log_z(log_z: torch.Tensor, z_ready: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """The stored ``log Z`` once it is fixed, else this batch's; a non-finite batch never fixes it."""
    return torch.where(z_ready | ~torch.isfinite(fresh), log_z, fresh)


def nce_shift(log_z: torch.Tensor, num_negatives: int, noise_size: int) -> torch.Tensor:
    """``log(Z K / N)``, what NCE subtracts from every score."""
    # log K as a tensor op: K = B - 1 for in-batch negatives, and compile must not specialise on B.
    return log_z + torch.log(log_z.new_full((), num_negatives)) - math.log(noise_size)


# ---------------------------------------------------------------------- chunk-and-checkpoint
ScoreChunk = Callable[[int, int], torch.Tensor]


def chunked_contrastive_loss(
    score_chunk: ScoreChunk,
    num_candidates: int,
    chunk_size: int,
    log_z: torch.Tensor,
    z_ready: torch.Tensor,
    *,
    objective: str,
    noise_size: int,
    layout: str,
    positive: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    positive_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`contrastive_loss_unchecked` of the scores ``score_chunk(start, stop)``
    makes for candidate columns ``start .. stop``, ``chunk_size`` columns at a time.

    NCE's first-batch constant needs all scores before any loss term, so it costs one more forward
    without gradient (a detached log-sum-exp over the chunks).

    Shape:
        score_chunk(start, stop) -> ``[B, A, stop - start]``; positive, positive_mask ``[B, A]``;
        mask ``[B, A, C]`` or shared ``[A, C]`` -> two scalars.
    """
    bounds = [(start, min(start + chunk_size, num_candidates)) for start in range(0, num_candidates, chunk_size)]

    def pieces(scores: torch.Tensor, start: int, stop: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        chunk_mask = None if mask is None else mask[..., start:stop]
        return chunk_mask, positive_columns(layout, scores.shape[0], start, stop, scores.device)

    if layout == "first":
        dropped = None if mask is None else mask[..., 0]
    else:
        dropped = positive_mask if layout == "separate" else (None if mask is None else mask.T)

    if objective == "infonce":

        def chunk_lse(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
            scores = score_chunk(start, stop)
            chunk_mask, is_positive = pieces(scores, start, stop)
            kept = scores
            if chunk_mask is not None:  # masked negatives out of the log-sum-exp, positives never
                excluded = chunk_mask if is_positive is None else chunk_mask & ~is_positive
                kept = scores.masked_fill(excluded, float("-inf"))
            # The positives in this chunk, summed with zeros elsewhere (exact): [B, A].
            positives = scores.new_zeros(scores.shape[:2]) if is_positive is None else (
                torch.where(is_positive, scores, torch.zeros_like(scores)).sum(-1)
            )
            return torch.logsumexp(kept, -1), positives

        parts = [checkpoint(chunk_lse, start, stop, use_reentrant=False) for start, stop in bounds]
        lse = torch.logsumexp(torch.stack([part[0] for part in parts]), 0)  # [B, A]
        if positive is None:
            positive = cast(torch.Tensor, sum(part[1] for part in parts))
        else:
            lse = torch.logaddexp(lse, positive)
        return kept_row_mean(lse - positive, dropped), log_z

    with torch.no_grad():
        part_lses, num_scores = [], 0
        for start, stop in bounds:  # one chunk's scores at a time
            scores = score_chunk(start, stop)
            part_lses.append(torch.logsumexp(scores.reshape(-1), 0))
            num_scores += scores.numel()
        if positive is not None:  # a single score's log-sum-exp is the score
            part_lses.append(torch.logsumexp(positive.reshape(-1), 0))
            num_scores += positive.numel()
        fresh = nce_log_normalizer_from_parts(torch.stack(part_lses), num_scores, noise_size)
    log_z = keep_or_fix_log_z(log_z, z_ready, fresh)
    shift = nce_shift(log_z, num_candidates - (0 if layout == "separate" else 1), noise_size)

    def chunk_sums(start: int, stop: int) -> torch.Tensor:
        scores = score_chunk(start, stop)
        chunk_mask, is_positive = pieces(scores, start, stop)
        return nce_row_sums(scores, shift, chunk_mask, has_positive=False, is_positive=is_positive)

    # ``sum`` starts from the int 0; there is always at least one chunk, so the result is a tensor.
    per_row = cast(torch.Tensor, sum(checkpoint(chunk_sums, *bound, use_reentrant=False) for bound in bounds))
    if positive is not None:
        per_row = per_row + F.softplus(shift - positive)
    return kept_row_mean(per_row, dropped), log_z

"""Chunk-and-checkpoint: the relation loss over chunks of candidates, recomputed in backward.

Each chunk's ``[B, A, chunk]`` scores are reduced at once (to per-row log-sum-exps for InfoNCE, or
per-row NCE sums) under activation checkpointing, so peak memory is ``O(B * A * chunk)`` instead
of ``O(B * A * C)``, for about one extra forward of time. Values and gradients equal the
unchunked loss. The reducer is generic over the positive layout of
:func:`crcd_plugin.functional.contrastive_loss`.
"""

from __future__ import annotations

from typing import Callable, Optional, cast

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from crcd_plugin.functional import (
    keep_or_fix_log_z,
    kept_row_mean,
    nce_log_normalizer_from_parts,
    nce_row_sums,
    nce_shift,
    positive_columns,
)

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
    """:func:`~crcd_plugin.functional.contrastive_loss` of the scores ``score_chunk(start, stop)``
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

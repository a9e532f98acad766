"""The relation loss core (scores + objective) as one function, eager or through ``torch.compile``.

Fusing the objective with the scores lets the compiler merge the element-wise tail (norms, gathers,
``where``, softplus / logsumexp) into a few kernels instead of a dozen ``[B, A, K+1]`` passes.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Optional, Union, cast

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from crcd_plugin._checks import check_choice
from crcd_plugin.kernels.objectives import (
    at_least_fp32,
    infonce_loss,
    keep_or_fix_log_z,
    kept_row_mean,
    masked_negatives,
    masked_row_mean,
    nce_log_normalizer,
    nce_log_normalizer_from_parts,
    nce_log_normalizer_with_positives,
    nce_loss,
    nce_row_sums,
    nce_shift,
)
from crcd_plugin.kernels.relation import anchor_free_logits, gram_relation_logits, naive_relation_logits
from crcd_plugin.kernels.shared import shared_positive_scores, shared_scores, shared_student_relations

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "eager", "compile", "naive", "triton")


def relation_loss_core(
    query: torch.Tensor,
    anchors: Optional[torch.Tensor],
    candidates: torch.Tensor,
    log_z: torch.Tensor,
    z_ready: torch.Tensor,
    mask: Optional[torch.Tensor],
    temperature: Union[float, torch.Tensor],
    eps: float,
    objective: str,
    num_samples: int,
    naive: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and objective for one side. Returns ``(loss, log_z_to_store)``.

    ``anchors=None`` is the anchor-free (CRD) setting. For NCE, ``log_z`` is used where ``z_ready``
    is set, otherwise it is taken from this batch; a non-finite first batch never fixes it.

    Shape:
        query ``[B, D]``, anchors ``[A, D]`` or None, candidates ``[B, K+1, D]``,
        mask ``[B, A, K+1]`` (``A = 1`` without anchors) or None -> two scalars.
    """
    logits = _scores(query, anchors, candidates, temperature, eps, naive)
    if objective == "infonce":
        return infonce_loss(logits, mask), log_z
    log_z = keep_or_fix_log_z(log_z, z_ready, nce_log_normalizer(logits, num_samples))
    return nce_loss(logits, log_z, num_samples, mask), log_z


def _scores(query, anchors, candidates, temperature, eps, naive=False) -> torch.Tensor:
    if anchors is None:
        return anchor_free_logits(query, candidates, temperature)
    kernel = naive_relation_logits if naive else gram_relation_logits
    return kernel(query, anchors, candidates, temperature, eps)


def chunked_relation_loss_core(
    query: torch.Tensor,
    anchors: Optional[torch.Tensor],
    candidates: torch.Tensor,
    log_z: torch.Tensor,
    z_ready: torch.Tensor,
    mask: Optional[torch.Tensor],
    temperature: float,
    eps: float,
    objective: str,
    num_samples: int,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`relation_loss_core` over chunks of ``chunk_size`` candidates, recomputed in backward.

    Each chunk's scores are reduced to per-row sums (NCE) or log-sum-exps (InfoNCE) at once, under
    activation checkpointing, so peak memory is ``O(B * A * chunk_size)`` instead of
    ``O(B * A * (K+1))``, for about one extra forward of time. NCE's first-batch constant needs all
    scores before any loss term, so it costs one more forward without gradient (a detached
    log-sum-exp over the chunks). Values and gradients equal the unchunked core.
    """
    num_candidates = candidates.shape[1]
    starts = range(0, num_candidates, chunk_size)

    def chunk_mask(start: int) -> Optional[torch.Tensor]:
        return None if mask is None else mask[..., start : start + chunk_size]

    def chunk_scores(start: int) -> torch.Tensor:
        return _scores(query, anchors, candidates[:, start : start + chunk_size], temperature, eps)

    if objective == "infonce":

        def chunk_lse(start: int) -> tuple[torch.Tensor, torch.Tensor]:
            scores = chunk_scores(start)
            return torch.logsumexp(masked_negatives(scores, chunk_mask(start), start == 0), -1), scores[..., 0]

        parts = [checkpoint(chunk_lse, start, use_reentrant=False) for start in starts]
        lse = torch.logsumexp(torch.stack([part[0] for part in parts]), 0)  # [B, A]
        return masked_row_mean(lse - parts[0][1], mask), log_z

    with torch.no_grad():
        chunk_lses = torch.stack([torch.logsumexp(chunk_scores(start).reshape(-1), 0) for start in starts])
        rows = query.shape[0] * (1 if anchors is None else anchors.shape[0])
        fresh = nce_log_normalizer_from_parts(chunk_lses, rows * num_candidates, num_samples)
    log_z = keep_or_fix_log_z(log_z, z_ready, fresh)
    # K is the total number of negatives, whatever the chunk.
    shift = nce_shift(log_z, num_candidates - 1, num_samples)

    def chunk_sums(start: int) -> torch.Tensor:
        return nce_row_sums(chunk_scores(start), shift, chunk_mask(start), start == 0)

    # ``sum`` starts from the int 0; there is always at least one chunk, so the result is a tensor.
    per_row = cast(torch.Tensor, sum(checkpoint(chunk_sums, start, use_reentrant=False) for start in starts))
    return masked_row_mean(per_row, mask), log_z


# ---------------------------------------------------------------------- shared candidates
def shared_relation_loss_core(
    query: torch.Tensor,
    anchors: Optional[torch.Tensor],
    candidates: torch.Tensor,
    positives: Optional[torch.Tensor],
    log_z: torch.Tensor,
    z_ready: torch.Tensor,
    mask: Optional[torch.Tensor],
    positive_mask: Optional[torch.Tensor],
    temperature: Union[float, torch.Tensor],
    eps: float,
    objective: str,
    num_samples: int,
    naive: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`relation_loss_core` where every sample has the same candidates. Returns ``(loss, log_z)``.

    Two layouts, both the loss of :func:`relation_loss_core` on the per-sample candidates they
    stand for (same value, same gradients, up to rounding):

    - ``positives=None`` (in-batch negatives): ``candidates`` are the batch itself, ``M = B``, and
      sample ``b``'s positive is candidate ``b``; its ``K = B - 1`` negatives are the others.
    - ``positives [B, D]`` (queue negatives): sample ``b``'s positive is ``positives[b]`` and its
      ``K = M`` negatives are all the shared ``candidates``.

    The candidate side is computed once for the batch (:func:`shared_relation_logits`), the
    positive (if apart) per sample, and the objective reduces the ``[B, A, M]`` scores in place,
    without a ``[B, A, K+1]`` copy.

    Args:
        mask: ``[A, M]`` bool (``A = 1`` without anchors), entries left out for every sample; with
            ``positives=None``, a masked ``(j, b)`` is sample ``b``'s positive, so that row is
            dropped.
        positive_mask: ``[B, A]`` bool, rows whose separate positive is masked (dropped rows);
            only with ``positives``.

    Shape:
        query ``[B, D]``, anchors ``[A, D]`` or None, candidates ``[M, D]``, positives ``[B, D]``
        or None -> two scalars.
    """
    positive, scores = _shared_scores(query, anchors, candidates, positives, temperature, eps, naive)
    is_positive = None if positives is not None else _diagonal(scores)  # [B, 1, M]
    dropped = positive_mask if positives is not None else (None if mask is None else mask.T)  # [B, A]
    if objective == "infonce":
        masked = _masked_shared(scores, mask, is_positive, float("-inf"))
        if positives is None:
            return kept_row_mean(_diagonal_cross_entropy(masked), dropped), log_z
        assert positive is not None  # scored apart whenever positives are given
        return kept_row_mean(_separate_positive_cross_entropy(positive, masked), dropped), log_z
    if positive is None:
        fresh = nce_log_normalizer(scores, num_samples)
    else:
        fresh = nce_log_normalizer_with_positives(positive, scores, num_samples)
    log_z = keep_or_fix_log_z(log_z, z_ready, fresh)
    num_negatives = scores.shape[-1] - (1 if positives is None else 0)
    shift = nce_shift(log_z.to(scores.dtype), num_negatives, num_samples)
    per_row = nce_row_sums(scores, shift, mask, has_positive=False, is_positive=is_positive)
    if positive is not None:
        per_row = per_row + F.softplus(shift - positive)
    return kept_row_mean(per_row, dropped), log_z


def _diagonal(scores: torch.Tensor) -> torch.Tensor:
    """In-batch candidates: ``[B, 1, M]`` bool, True where candidate ``m`` is sample ``b`` (its positive)."""
    samples = torch.arange(scores.shape[0], device=scores.device)
    columns = torch.arange(scores.shape[-1], device=scores.device)
    return (samples[:, None] == columns)[:, None, :]


def _diagonal_cross_entropy(scores: torch.Tensor) -> torch.Tensor:
    """InfoNCE rows ``[B, A]`` of in-batch scores ``[B, A, B]``, whose positive is column ``b``.

    One fused ``cross_entropy`` over the ``[A * B, B]`` rows (2x faster on CPU than a
    log-sum-exp and a diagonal, whose backward writes a zero tensor of the scores' size). The
    scores are anchor-major in memory (see :func:`shared_scores`), so the rows are a view.
    """
    batch = scores.shape[0]
    targets = torch.arange(batch, device=scores.device)  # sample b's positive is column b
    return _anchor_major_cross_entropy(scores.transpose(0, 1), targets)


def _separate_positive_cross_entropy(positive: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """InfoNCE rows ``[B, A]`` of separate positives ``[B, A]`` and shared scores ``[B, A, M]``.

    One fused ``cross_entropy`` over the ``[A * B, 1 + M]`` rows, the positive first (on CPU about
    2x faster in forward and backward than a log-sum-exp, a ``logaddexp`` and a subtraction, whose
    backward passes make several tensors of the scores' size).
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


def _shared_scores(
    query: torch.Tensor,
    anchors: Optional[torch.Tensor],
    candidates: torch.Tensor,
    positives: Optional[torch.Tensor],
    temperature: Union[float, torch.Tensor],
    eps: float,
    naive: bool = False,
) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """The separate positives' scores ``[B, A]`` (None without ``positives``) and the shared
    candidates' ``[B, A, M]`` (``A = 1`` without anchors), in fp32 at least."""
    relations = None if anchors is None or naive else shared_student_relations(query, anchors, temperature, eps)
    positive = None
    if positives is not None:
        positive = _positive_scores(query, anchors, positives, temperature, eps, naive, relations)
    return positive, _candidate_scores(query, anchors, candidates, temperature, eps, naive, relations)


def _candidate_scores(query, anchors, candidates, temperature, eps, naive=False, relations=None) -> torch.Tensor:
    """Scores of every sample against the shared ``candidates [M, D]``: ``[B, A, M]``."""
    if anchors is None:
        scores = (query @ candidates.T / temperature)[:, None, :]  # [B, 1, M]
    elif naive:
        expanded = candidates.expand(query.shape[0], *candidates.shape)
        scores = naive_relation_logits(query, anchors, expanded, temperature, eps)
    else:
        scores = shared_scores(relations, anchors, candidates, eps)
    return at_least_fp32(scores)


def _positive_scores(query, anchors, positives, temperature, eps, naive=False, relations=None) -> torch.Tensor:
    """Scores of every sample against its own positive ``positives [B, D]``: ``[B, A]``."""
    if anchors is None:
        scores = (query * positives).sum(-1, keepdim=True) / temperature  # [B, 1]
    elif naive:
        scores = naive_relation_logits(query, anchors, positives[:, None], temperature, eps)[..., 0]
    else:
        scores = shared_positive_scores(relations, anchors, positives, eps)
    return at_least_fp32(scores)


def _masked_shared(
    scores: torch.Tensor, mask: Optional[torch.Tensor], is_positive: Optional[torch.Tensor], value: float
) -> torch.Tensor:
    """``scores`` with masked negatives set to ``value``; positives among them are never masked."""
    if mask is None:
        return scores
    excluded = mask if is_positive is None else mask & ~is_positive  # [A, M] or [B, A, M]
    return scores.masked_fill(excluded, value)


def chunked_shared_relation_loss_core(
    query: torch.Tensor,
    anchors: Optional[torch.Tensor],
    candidates: torch.Tensor,
    positives: Optional[torch.Tensor],
    log_z: torch.Tensor,
    z_ready: torch.Tensor,
    mask: Optional[torch.Tensor],
    positive_mask: Optional[torch.Tensor],
    temperature: float,
    eps: float,
    objective: str,
    num_samples: int,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`shared_relation_loss_core` over chunks of ``chunk_size`` shared candidates.

    As :func:`chunked_relation_loss_core`: each chunk's ``[B, A, chunk]`` scores are reduced at
    once under activation checkpointing; the anchor tables (``[B, A, D]``, ``[B, A, A]``) and the
    separate positives' scores are made once, outside the chunks.
    """
    relations = None if anchors is None else shared_student_relations(query, anchors, temperature, eps)
    positive = None
    if positives is not None:
        positive = _positive_scores(query, anchors, positives, temperature, eps, False, relations)
    batch, num_candidates = query.shape[0], candidates.shape[0]
    starts = range(0, num_candidates, chunk_size)

    def chunk_scores(start: int) -> torch.Tensor:
        chunk = candidates[start : start + chunk_size]
        return _candidate_scores(query, anchors, chunk, temperature, eps, False, relations)

    def chunk_pieces(start: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The chunk's mask and, in-batch, where its columns are positives: ``[B, 1, chunk]``."""
        chunk_mask = None if mask is None else mask[:, start : start + chunk_size]
        if positives is not None:
            return chunk_mask, None
        columns = torch.arange(start, min(start + chunk_size, num_candidates), device=query.device)
        return chunk_mask, (torch.arange(batch, device=query.device)[:, None] == columns)[:, None, :]

    dropped = positive_mask if positives is not None else (None if mask is None else mask.T)
    if objective == "infonce":

        def chunk_lse(start: int) -> tuple[torch.Tensor, torch.Tensor]:
            scores = chunk_scores(start)
            chunk_mask, is_positive = chunk_pieces(start)
            lse = torch.logsumexp(_masked_shared(scores, chunk_mask, is_positive, float("-inf")), -1)
            # In-batch, this chunk holds the positives of samples start .. start + chunk: [A, chunk].
            diagonal = torch.diagonal(scores[start : start + chunk_size], dim1=0, dim2=2)
            return lse, diagonal

        parts = [checkpoint(chunk_lse, start, use_reentrant=False) for start in starts]
        lse = torch.logsumexp(torch.stack([part[0] for part in parts]), 0)  # [B, A]
        if positive is None:
            positive = torch.cat([part[1] for part in parts], dim=1).T  # [B, A]
        else:
            lse = torch.logaddexp(lse, positive)
        return kept_row_mean(lse - positive, dropped), log_z

    with torch.no_grad():
        part_lses = [torch.logsumexp(chunk_scores(start).reshape(-1), 0) for start in starts]
        if positive is not None:
            part_lses.append(torch.logsumexp(positive.reshape(-1), 0))
        columns = num_candidates + (0 if positive is None else 1)
        num_scores = batch * (1 if anchors is None else anchors.shape[0]) * columns
        fresh = nce_log_normalizer_from_parts(torch.stack(part_lses), num_scores, num_samples)
    log_z = keep_or_fix_log_z(log_z, z_ready, fresh)
    shift = nce_shift(log_z, num_candidates - (1 if positives is None else 0), num_samples)

    def chunk_sums(start: int) -> torch.Tensor:
        chunk_mask, is_positive = chunk_pieces(start)
        return nce_row_sums(chunk_scores(start), shift, chunk_mask, has_positive=False, is_positive=is_positive)

    # ``sum`` starts from the int 0; there is always at least one chunk, so the result is a tensor.
    per_row = cast(torch.Tensor, sum(checkpoint(chunk_sums, start, use_reentrant=False) for start in starts))
    if positive is not None:
        per_row = per_row + F.softplus(shift - positive)
    return kept_row_mean(per_row, dropped), log_z


_compiled: Dict[tuple, Callable] = {}
_compile_failure: Dict[str, Exception] = {}
_triton_refusals: set = set()


def _compiled_core(
    temperature: float, eps: float, objective: str, num_samples: int, shared: bool = False
) -> Callable:
    """One compiled function per option set and form (per-sample or shared candidates); dynamo
    specialises it further per shape family (and per ``None``-ness of the optional tensors).

    The scalar options are closed over and traced as constants (``specialize_float``): with
    ``dynamic=True`` dynamo would otherwise trace the temperature as a symbolic float, and torch
    2.13 then produced a wrong backward through the relation kernel (gradients off by up to 15%,
    values right; the same with the temperature as a tensor input). As a constant it is exact.
    """
    key = (temperature, eps, objective, num_samples, shared)
    if key not in _compiled:
        core = shared_relation_loss_core if shared else relation_loss_core

        def compiled(*tensors):
            return core(*tensors, temperature, eps, objective, num_samples)

        _compiled[key] = torch.compile(compiled, fullgraph=True, dynamic=True)
    return _compiled[key]


def resolve_backend(backend: str, device: torch.device) -> str:
    """Maps ``"auto"`` to a concrete backend: compiled on CUDA, eager elsewhere.

    On CPU the first compile of each shape family costs tens of seconds, which would dominate short
    runs, so ``"auto"`` stays eager there; ask for ``"compile"`` explicitly for long CPU runs.
    ``"auto"`` never picks ``"triton"``: that kernel is checked for exactness (under Triton's
    interpreter) but has no GPU timing yet to show that it beats ``"compile"``.
    """
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        return "compile" if device.type == "cuda" else "eager"
    return backend


def run_relation_loss_core(
    backend: str,
    query: torch.Tensor,
    anchors: Optional[torch.Tensor],
    candidates: torch.Tensor,
    log_z: torch.Tensor,
    z_ready: torch.Tensor,
    mask: Optional[torch.Tensor],
    *,
    temperature: float,
    eps: float,
    objective: str,
    num_samples: int,
    chunk_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs :func:`relation_loss_core` with a concrete backend (see :func:`resolve_backend`).

    ``"compile"`` falls back to eager, with one warning, when compilation is unavailable. With
    ``chunk_size`` smaller than ``K+1``, the chunked core runs instead (eager kernels; ``"naive"``
    is not chunked). ``"triton"`` never stores the scores, so it ignores ``chunk_size``; where it
    cannot run (see :func:`triton_unsupported_reason`) it falls back to the eager or chunked core,
    with one warning per reason.
    """
    tensors = (query, anchors, candidates, log_z, z_ready, mask)
    options = (float(temperature), float(eps), objective, int(num_samples))
    if backend == "triton":
        reason = triton_unsupported_reason(query, anchors, candidates, mask)
        if reason is None:
            from crcd_plugin.kernels.triton_relation import triton_relation_loss_core

            assert anchors is not None  # triton_unsupported_reason refuses the anchor-free setting
            return triton_relation_loss_core(query, anchors, candidates, log_z, z_ready, *options)
        _warn_triton_refusal(reason)
    if chunk_size is not None and chunk_size < candidates.shape[1] and backend != "naive":
        return chunked_relation_loss_core(*tensors, *options, chunk_size)
    return _run_plain_or_compiled(backend, False, tensors, options)


def run_shared_relation_loss_core(
    backend: str,
    query: torch.Tensor,
    anchors: Optional[torch.Tensor],
    candidates: torch.Tensor,
    positives: Optional[torch.Tensor],
    log_z: torch.Tensor,
    z_ready: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    positive_mask: Optional[torch.Tensor] = None,
    *,
    temperature: float,
    eps: float,
    objective: str,
    num_samples: int,
    chunk_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs :func:`shared_relation_loss_core` with a concrete backend, as :func:`run_relation_loss_core`.

    ``chunk_size`` below ``M`` chunks the shared candidates; ``"triton"`` runs its shared-candidate
    kernel, or falls back (one warning per reason) to the eager or chunked shared core.

    Shape:
        query ``[B, D]``, anchors ``[A, D]`` or None, candidates ``[M, D]``, positives ``[B, D]``
        or None (then ``M = B`` and sample ``b``'s positive is candidate ``b``), mask ``[A, M]``,
        positive_mask ``[B, A]`` -> two scalars.
    """
    tensors = (query, anchors, candidates, positives, log_z, z_ready, mask, positive_mask)
    options = (float(temperature), float(eps), objective, int(num_samples))
    if backend == "triton":
        any_mask = mask if mask is not None else positive_mask
        reason = triton_unsupported_reason(query, anchors, candidates, any_mask, positives)
        if reason is None:
            from crcd_plugin.kernels.triton_relation import triton_shared_relation_loss_core

            assert anchors is not None  # triton_unsupported_reason refuses the anchor-free setting
            return triton_shared_relation_loss_core(query, anchors, candidates, positives, log_z, z_ready, *options)
        _warn_triton_refusal(reason)
    if chunk_size is not None and chunk_size < candidates.shape[0] and backend != "naive":
        return chunked_shared_relation_loss_core(*tensors, *options, chunk_size)
    return _run_plain_or_compiled(backend, True, tensors, options)


def _warn_triton_refusal(reason: str) -> None:
    if reason not in _triton_refusals:
        _triton_refusals.add(reason)
        logger.warning("backend='triton' cannot run %s; running the eager kernels instead", reason)


def _run_plain_or_compiled(
    backend: str, shared: bool, tensors: tuple, options: tuple[float, float, str, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The compiled core for ``"compile"`` (eager after a failed compile), the plain one otherwise."""
    if backend == "compile" and not _compile_failure:
        try:
            with torch._dynamo.config.patch(specialize_float=True):
                return _compiled_core(*options, shared=shared)(*tensors)
        except Exception as error:  # noqa: BLE001 - any compiler failure means: run eager
            _compile_failure["error"] = error
            logger.warning("torch.compile of the CRCD loss core failed, running eager: %s", error)
    # ``tensors`` holds the six (or eight, shared) leading arguments of the chosen core.
    core: Callable[..., tuple[torch.Tensor, torch.Tensor]] = (
        shared_relation_loss_core if shared else relation_loss_core
    )
    return core(*tensors, *options, naive=backend == "naive")


def triton_unsupported_reason(
    query: torch.Tensor,
    anchors: Optional[torch.Tensor],
    candidates: torch.Tensor,
    mask: Optional[torch.Tensor],
    positives: Optional[torch.Tensor] = None,
) -> Optional[str]:
    """Why the Triton kernel cannot run these inputs (``None`` when it can), Triton missing included."""
    try:
        from crcd_plugin.kernels.triton_relation import unsupported_reason
    except ImportError:
        return "without the triton package"
    return unsupported_reason(query, anchors, candidates, mask, positives)

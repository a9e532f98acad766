"""The relation loss core (scores + objective) as one function, eager or through ``torch.compile``.

Fusing the objective with the scores lets the compiler merge the element-wise tail (norms, gathers,
``where``, softplus / logsumexp) into a few kernels instead of a dozen ``[B, A, K+1]`` passes.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Optional, Union

import torch

from torch.utils.checkpoint import checkpoint

from crcd_plugin._checks import check_choice
from crcd_plugin.kernels.objectives import (
    infonce_loss,
    keep_or_fix_log_z,
    masked_negatives,
    masked_row_mean,
    nce_log_normalizer,
    nce_log_normalizer_from_parts,
    nce_loss,
    nce_row_sums,
    nce_shift,
)
from crcd_plugin.kernels.relation import anchor_free_logits, gram_relation_logits, naive_relation_logits

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

        def chunk_lse(start: int) -> torch.Tensor:
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

    per_row = sum(checkpoint(chunk_sums, start, use_reentrant=False) for start in starts)
    return masked_row_mean(per_row, mask), log_z


_compiled: Dict[tuple, Callable] = {}
_compile_failure: Dict[str, Exception] = {}
_triton_refusals: set = set()


def _compiled_core(temperature: float, eps: float, objective: str, num_samples: int) -> Callable:
    """One compiled function per option set; dynamo specialises it further per shape family.

    The scalar options are closed over and traced as constants (``specialize_float``): with
    ``dynamic=True`` dynamo would otherwise trace the temperature as a symbolic float, and torch
    2.13 then produced a wrong backward through the relation kernel (gradients off by up to 15%,
    values right; the same with the temperature as a tensor input). As a constant it is exact.
    """
    key = (temperature, eps, objective, num_samples)
    if key not in _compiled:

        def core(query, anchors, candidates, log_z, z_ready, mask):
            return relation_loss_core(
                query, anchors, candidates, log_z, z_ready, mask, temperature, eps, objective, num_samples
            )

        _compiled[key] = torch.compile(core, fullgraph=True, dynamic=True)
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

            return triton_relation_loss_core(query, anchors, candidates, log_z, z_ready, *options)
        if reason not in _triton_refusals:
            _triton_refusals.add(reason)
            logger.warning("backend='triton' cannot run %s; running the eager kernels instead", reason)
    if chunk_size is not None and chunk_size < candidates.shape[1] and backend != "naive":
        return chunked_relation_loss_core(*tensors, *options, chunk_size)
    if backend == "compile" and not _compile_failure:
        try:
            with torch._dynamo.config.patch(specialize_float=True):
                return _compiled_core(*options)(*tensors)
        except Exception as error:  # noqa: BLE001 - any compiler failure means: run eager
            _compile_failure["error"] = error
            logger.warning("torch.compile of the CRCD loss core failed, running eager: %s", error)
    return relation_loss_core(*tensors, *options, naive=backend == "naive")


def triton_unsupported_reason(
    query: torch.Tensor, anchors: Optional[torch.Tensor], candidates: torch.Tensor, mask: Optional[torch.Tensor]
) -> Optional[str]:
    """Why the Triton kernel cannot run these inputs (``None`` when it can), Triton missing included."""
    try:
        from crcd_plugin.kernels.triton_relation import unsupported_reason
    except ImportError:
        return "without the triton package"
    return unsupported_reason(query, anchors, candidates, mask)

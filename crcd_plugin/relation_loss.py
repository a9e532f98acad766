"""The one entry point of the relation loss: scores by the chosen backend, then the objective.

``relation_loss`` hands the inputs to the chosen backend's loss (:data:`BACKEND_LOSSES`: eager Gram
kernels, ``torch.compile`` of the same, Triton, or the naive formulation for checks); the eager and
compiled ones run the chunk-and-checkpoint reducer where ``chunk_size`` is below the number of
candidates. Candidates come per sample (``[B, K+1, D]``, positive first) or shared by the batch
(``[M, D]``, positives on the diagonal or apart): the same function serves both. It sits above
what it dispatches to, the score kernels and the objectives (:mod:`crcd_plugin.kernels`), which
import nothing from here.
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections import OrderedDict
from typing import Callable, Iterator, Optional

import torch

from crcd_plugin._checks import check_choice
from crcd_plugin.config import BACKENDS
from crcd_plugin.kernels.objectives import chunked_contrastive_loss, contrastive_loss_unchecked
from crcd_plugin.kernels.relation import (
    anchor_free_logits,
    gram_relation_logits,
    in_batch_candidate_index,
    naive_relation_logits,
)
from crcd_plugin.kernels.shared_candidates import candidate_scores, positive_scores, shared_student_relations

_logger = logging.getLogger(__name__)

Loss = tuple[torch.Tensor, torch.Tensor]


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


def relation_loss(
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
    noise_size: int,
    chunk_size: Optional[int] = None,
) -> Loss:
    """The relation loss of one side with a concrete backend (see :func:`resolve_backend`).

    ``"compile"`` runs eager for the inputs whose compile failed (one warning each); ``"triton"``
    runs eager (one warning per reason) where its kernel cannot. With ``chunk_size`` below the
    number of candidates, the eager and compiled backends run over chunks
    (:func:`~crcd_plugin.kernels.objectives.chunked_contrastive_loss`); Triton never stores the
    scores and ignores it. An unknown backend (``"auto"`` included: resolve it first) is a ``ValueError``.

    Args:
        candidates: ``[B, K+1, D]`` per sample (index 0 the positive), or ``[M, D]`` shared.
        positives: Shared candidates only: ``[B, D]`` scored apart (queue, shared bank draws), or
            None when sample ``b``'s positive is candidate ``b`` (in-batch, ``M = B``).
        mask: ``True`` = entry left out: ``[B, A, K+1]``, or ``[A, M]`` for shared candidates.
        positive_mask: ``[B, A]``, rows whose separate positive is masked.

    Shape:
        query ``[B, D]``, anchors ``[A, D]`` or None (CRD) -> ``(loss, log_z_to_store)``, scalars.
    """
    if candidates.dim() == 2 and (_expand_shared or backend == "naive"):
        candidates, mask = expand_shared(candidates, positives, mask, positive_mask)
        positives = positive_mask = None
    if backend not in BACKEND_LOSSES:
        raise ValueError(f"backend must be one of {sorted(BACKEND_LOSSES)} (resolve 'auto' first), got {backend!r}")
    tensors = (query, anchors, candidates, positives, log_z, z_ready, mask, positive_mask)
    options = (float(temperature), float(eps), objective, int(noise_size))
    # Chunks run the eager kernels under checkpointing, for "compile" too (checkpoints do not compile).
    loss = _chunked if backend in ("eager", "compile") and _chunks(tensors, chunk_size) else BACKEND_LOSSES[backend]
    return loss(tensors, options, chunk_size)


def relation_loss_core(
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
    noise_size: int,
) -> Loss:
    """Scores (Gram kernels) and objective in one function: what ``"eager"`` runs and ``"compile"`` compiles."""
    layout, positive = "first", None
    if candidates.dim() == 3:
        if anchors is None:
            scores = anchor_free_logits(query, candidates, temperature)
        else:
            scores = gram_relation_logits(query, anchors, candidates, temperature, eps)
    else:
        relations = None if anchors is None else shared_student_relations(query, anchors, temperature, eps)
        if positives is not None:
            positive = positive_scores(query, anchors, positives, temperature, eps, relations)
        scores = candidate_scores(query, anchors, candidates, temperature, eps, relations)
        layout = "diagonal" if positives is None else "separate"
    return contrastive_loss_unchecked(
        scores, log_z, z_ready, objective=objective, noise_size=noise_size, layout=layout,  # type: ignore[arg-type]
        positive=positive, mask=mask, positive_mask=positive_mask,
    )


def _chunked_core(query, anchors, candidates, positives, log_z, z_ready, mask, positive_mask, *options_and_chunk):
    temperature, eps, objective, noise_size, chunk_size = options_and_chunk
    layout, positive = "first", None
    if candidates.dim() == 3:

        def score_chunk(start: int, stop: int) -> torch.Tensor:
            chunk = candidates[:, start:stop]
            if anchors is None:
                return anchor_free_logits(query, chunk, temperature)
            return gram_relation_logits(query, anchors, chunk, temperature, eps)

    else:
        # The anchor tables and the separate positives' scores are made once, outside the chunks.
        relations = None if anchors is None else shared_student_relations(query, anchors, temperature, eps)
        if positives is not None:
            positive = positive_scores(query, anchors, positives, temperature, eps, relations)
        layout = "diagonal" if positives is None else "separate"

        def score_chunk(start: int, stop: int) -> torch.Tensor:
            return candidate_scores(query, anchors, candidates[start:stop], temperature, eps, relations)

    return chunked_contrastive_loss(
        score_chunk, candidates.shape[-2], chunk_size, log_z, z_ready, objective=objective, noise_size=noise_size,
        layout=layout, positive=positive, mask=mask, positive_mask=positive_mask,
    )


def _naive_core(query, anchors, candidates, positives, log_z, z_ready, mask, positive_mask, *options) -> Loss:
    """The reference formulation (builds ``[B, A, K+1, D]``) on per-sample candidates: checks only."""
    temperature, eps, objective, noise_size = options
    if anchors is None:
        scores = anchor_free_logits(query, candidates, temperature)
    else:
        scores = naive_relation_logits(query, anchors, candidates, temperature, eps)
    return contrastive_loss_unchecked(scores, log_z, z_ready, objective=objective, noise_size=noise_size, mask=mask)


# ---------------------------------------------------------------------- the backends
BackendLoss = Callable[[tuple, tuple, Optional[int]], Loss]


def _chunks(tensors: tuple, chunk_size: Optional[int]) -> bool:
    """Whether ``chunk_size`` splits the candidates (``tensors[2]``, ``[B, C, D]`` or ``[C, D]``)."""
    return chunk_size is not None and chunk_size < tensors[2].shape[-2]


def _eager(tensors: tuple, options: tuple, chunk_size: Optional[int]) -> Loss:
    """The Gram kernels and the objective in eager mode."""
    return relation_loss_core(*tensors, *options)


def _chunked(tensors: tuple, options: tuple, chunk_size: Optional[int]) -> Loss:
    """The eager kernels ``chunk_size`` candidates at a time, under activation checkpointing."""
    return _chunked_core(*tensors, *options, chunk_size)


def _compiled(tensors: tuple, options: tuple, chunk_size: Optional[int]) -> Loss:
    """:func:`relation_loss_core` under ``torch.compile`` (eager for inputs whose compile failed)."""
    return _COMPILED.run(tensors, options)


def _triton_or_eager(tensors: tuple, options: tuple, chunk_size: Optional[int]) -> Loss:
    """The Triton kernel (it never stores the scores, so it ignores ``chunk_size``), or the eager
    kernels (chunked where ``chunk_size`` asks) where it cannot run."""
    result = _triton(tensors, options)
    if result is not None:
        return result
    return (_chunked if _chunks(tensors, chunk_size) else _eager)(tensors, options, chunk_size)


def _naive(tensors: tuple, options: tuple, chunk_size: Optional[int]) -> Loss:
    """The reference formulation, for checks (never chunked)."""
    return _naive_core(*tensors, *options)


# Backend name -> its loss: a new backend is one entry here and its name in ``config.BACKENDS``.
BACKEND_LOSSES: dict[str, BackendLoss] = {
    "eager": _eager,
    "compile": _compiled,
    "triton": _triton_or_eager,
    "naive": _naive,
}


# ---------------------------------------------------------------------- shared -> per-sample
_expand_shared = False


@contextlib.contextmanager
def per_sample_candidates() -> Iterator[None]:
    """Within this block, shared candidates are expanded to per-sample ones before scoring: the
    same loss by a slower path, which tests and benchmarks compare the shared kernels against."""
    global _expand_shared
    previous, _expand_shared = _expand_shared, True
    try:
        yield
    finally:
        _expand_shared = previous


def expand_shared(
    candidates: torch.Tensor,
    positives: Optional[torch.Tensor],
    mask: Optional[torch.Tensor] = None,
    positive_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The per-sample candidates ``[B, K+1, D]`` (positive first) and mask ``[B, A, K+1]`` that
    shared candidates ``[M, D]`` (with ``positives`` apart, or in-batch) stand for."""
    if positives is None:  # in-batch: sample b's positive is candidate b, its negatives the others
        ids = in_batch_candidate_index(candidates.shape[0], candidates.device)
        return candidates[ids], None if mask is None else mask[:, ids].transpose(0, 1)
    batch = positives.shape[0]
    expanded = torch.cat([positives[:, None], candidates[None].expand(batch, -1, -1)], dim=1)
    if mask is None and positive_mask is None:
        return expanded, None
    num_anchors = (mask if mask is not None else positive_mask.T).shape[0]  # type: ignore[union-attr]
    first = positive_mask if positive_mask is not None else torch.zeros(batch, num_anchors, dtype=torch.bool)
    rest = mask if mask is not None else torch.zeros(num_anchors, candidates.shape[0], dtype=torch.bool)
    first, rest = first.to(candidates.device), rest.to(candidates.device)
    return expanded, torch.cat([first[..., None], rest.expand(batch, -1, -1)], dim=-1)


# ---------------------------------------------------------------------- torch.compile
class CompileCache:
    """Compiled loss cores, one per option set and positive layout, at most ``size`` of them
    (least recently used dropped first).

    A failed compile is remembered for its key and input signature (layout, dims, which optional
    tensors are given, dtype, device): those inputs run eager from then on, every other key keeps
    compiling. The scalar options are closed over and traced as constants (``specialize_float``):
    with ``dynamic=True`` dynamo would otherwise trace the temperature as a symbolic float, which
    torch 2.13 turned into a wrong backward through the relation kernel (gradients off by up to
    15%); as a constant it is exact.
    """

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self.compiled: "OrderedDict[tuple, Callable[..., Loss]]" = OrderedDict()
        self.failures: dict[tuple, Exception] = {}

    def run(self, tensors: tuple, options: tuple) -> Loss:
        candidates, positives = tensors[2], tensors[3]
        layout = "first" if candidates.dim() == 3 else ("diagonal" if positives is None else "separate")
        key = (*options, layout)
        signature = (key, tuple(None if x is None else (x.dim(), x.dtype, x.device.type) for x in tensors))
        if signature not in self.failures:
            try:
                with torch._dynamo.config.patch(specialize_float=True):
                    return self._compiled(key, options)(*tensors)
            except Exception as error:  # noqa: BLE001 - any compiler failure means: run eager
                self.failures[signature] = error
                _logger.warning("torch.compile of the CRCD loss core failed for %s, running eager: %s", key, error)
        return relation_loss_core(*tensors, *options)

    def _compiled(self, key: tuple, options: tuple) -> Callable[..., Loss]:
        if key in self.compiled:
            self.compiled.move_to_end(key)
            return self.compiled[key]

        def core(*tensors):
            return relation_loss_core(*tensors, *options)

        # Dynamo keeps its graphs, and counts recompiles against ``recompile_limit`` (8), per code
        # object; every closure of ``core`` shares one, so the ninth option set would fail to
        # compile. A code object of each key's own keeps the keys apart, and a dropped key's graphs
        # go with it.
        core = types.FunctionType(core.__code__.replace(), core.__globals__, core.__name__, None, core.__closure__)
        self.compiled[key] = torch.compile(core, fullgraph=True, dynamic=True)
        if len(self.compiled) > self.size:
            self.compiled.popitem(last=False)
        return self.compiled[key]


_COMPILED = CompileCache()


# ---------------------------------------------------------------------- Triton
_triton_refusals: set = set()


def _triton(tensors: tuple, options: tuple) -> Optional[Loss]:
    """The Triton kernel's loss, or None (after one warning per reason) where it cannot run."""
    query, anchors, candidates, positives, log_z, z_ready, mask, positive_mask = tensors
    any_mask = mask if mask is not None else positive_mask
    reason = triton_unsupported_reason(query, anchors, candidates, any_mask, positives)
    if reason is not None:
        if reason not in _triton_refusals:
            _triton_refusals.add(reason)
            _logger.warning("backend='triton' cannot run %s; running the eager kernels instead", reason)
        return None
    from crcd_plugin.kernels.triton_relation import triton_relation_loss_core, triton_shared_relation_loss_core

    if candidates.dim() == 3:
        return triton_relation_loss_core(query, anchors, candidates, log_z, z_ready, *options)
    return triton_shared_relation_loss_core(query, anchors, candidates, positives, log_z, z_ready, *options)


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

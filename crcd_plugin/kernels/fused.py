"""The relation loss core (scores + objective) as one function, eager or through ``torch.compile``.

Fusing the objective with the scores lets the compiler merge the element-wise tail (norms, gathers,
``where``, softplus / logsumexp) into a few kernels instead of a dozen ``[B, A, K+1]`` passes.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Optional, Union

import torch

from crcd_plugin.kernels.objectives import infonce_loss, nce_log_normalizer, nce_loss
from crcd_plugin.kernels.relation import anchor_free_logits, gram_relation_logits, naive_relation_logits

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "eager", "compile", "naive")


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
    if anchors is None:
        logits = anchor_free_logits(query, candidates, temperature)
    elif naive:
        logits = naive_relation_logits(query, anchors, candidates, temperature, eps)
    else:
        logits = gram_relation_logits(query, anchors, candidates, temperature, eps)
    if objective == "infonce":
        return infonce_loss(logits, mask), log_z
    fresh = nce_log_normalizer(logits, num_samples)
    log_z = torch.where(z_ready | ~torch.isfinite(fresh), log_z, fresh)
    return nce_loss(logits, log_z, num_samples, mask), log_z


_compiled: Dict[tuple, Callable] = {}
_compile_failure: Dict[str, Exception] = {}


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
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs :func:`relation_loss_core` with a concrete backend (see :func:`resolve_backend`).

    ``"compile"`` falls back to eager, with one warning, when compilation is unavailable.
    """
    tensors = (query, anchors, candidates, log_z, z_ready, mask)
    options = (float(temperature), float(eps), objective, int(num_samples))
    if backend == "compile" and not _compile_failure:
        try:
            with torch._dynamo.config.patch(specialize_float=True):
                return _compiled_core(*options)(*tensors)
        except Exception as error:  # noqa: BLE001 - any compiler failure means: run eager
            _compile_failure["error"] = error
            logger.warning("torch.compile of the CRCD loss core failed, running eager: %s", error)
    return relation_loss_core(*tensors, *options, naive=backend == "naive")

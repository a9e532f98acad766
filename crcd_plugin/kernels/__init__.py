"""Fast paths of the relation math (exact Gram kernels, ``torch.compile``, Triton) behind one dispatcher.

The kernels make scores (:mod:`~crcd_plugin.kernels.relation` per sample,
:mod:`~crcd_plugin.kernels.shared_candidates` for candidates shared by the batch, and the Triton
kernel); :func:`~crcd_plugin.kernels.dispatch.relation_loss` picks the backend and chunking and
applies the objectives of :mod:`crcd_plugin.functional`. Names are loaded on first use, so that
``crcd_plugin.functional`` can use the score kernels without importing the dispatcher, and the
Triton kernel only when ``backend="triton"`` runs.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BACKENDS": "dispatch",
    "relation_loss": "dispatch",
    "relation_loss_core": "dispatch",
    "resolve_backend": "dispatch",
    "per_sample_candidates": "dispatch",
    "RelationTerms": "relation",
    "anchor_free_logits": "relation",
    "gram_relation_logits": "relation",
    "naive_relation_logits": "relation",
    "relation_terms": "relation",
    "shared_relation_logits": "shared_candidates",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)

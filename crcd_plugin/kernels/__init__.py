"""The math of the relation loss: exact Gram score kernels, per sample and for shared candidates, and the objectives.

:mod:`~crcd_plugin.kernels.relation` makes per-sample relation scores,
:mod:`~crcd_plugin.kernels.shared_candidates` scores candidates shared by the batch, and
:mod:`~crcd_plugin.kernels.objectives` turns scores into NCE or InfoNCE (with ``log Z``, whole or a
chunk at a time); the Triton kernel
(:mod:`~crcd_plugin.kernels.triton_relation`) is imported only where ``backend="triton"`` runs.
The dispatcher that picks among them, :func:`crcd_plugin.relation_loss.relation_loss`, and the
checked public functions (:mod:`crcd_plugin.functional`) sit above; nothing here imports from them.
"""

from crcd_plugin.kernels.relation import (
    RelationTerms,
    anchor_free_logits,
    gram_relation_logits,
    naive_relation_logits,
    relation_terms,
)
from crcd_plugin.kernels.shared_candidates import shared_relation_logits

__all__ = [
    "RelationTerms",
    "anchor_free_logits",
    "gram_relation_logits",
    "naive_relation_logits",
    "relation_terms",
    "shared_relation_logits",
]

"""Score kernels of the relation math: exact Gram forms, per sample and for shared candidates, and NCE's constant.

:mod:`~crcd_plugin.kernels.relation` makes per-sample relation scores,
:mod:`~crcd_plugin.kernels.shared_candidates` scores candidates shared by the batch, and
:mod:`~crcd_plugin.kernels.nce` holds ``log Z``; the Triton kernel
(:mod:`~crcd_plugin.kernels.triton_relation`) is imported only where ``backend="triton"`` runs.
The dispatcher that picks among them, :func:`crcd_plugin.relation_loss.relation_loss`, sits above
both the kernels and the objectives; nothing here imports from a layer above.
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

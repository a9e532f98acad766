"""Fast paths of the relation math (exact Gram kernel, ``torch.compile``, Triton) behind one dispatcher.

The Triton kernel lives in ``crcd_plugin.kernels.triton_relation`` and is imported only when
``backend="triton"`` runs, so that ``import crcd_plugin`` needs only torch.
"""

from crcd_plugin.kernels.fused import (
    BACKENDS,
    relation_loss_core,
    resolve_backend,
    run_relation_loss_core,
    run_shared_relation_loss_core,
    shared_relation_loss_core,
)
from crcd_plugin.kernels.relation import (
    RelationTerms,
    anchor_free_logits,
    gram_relation_logits,
    naive_relation_logits,
    relation_terms,
)
from crcd_plugin.kernels.shared import shared_relation_logits

__all__ = [
    "BACKENDS",
    "RelationTerms",
    "anchor_free_logits",
    "gram_relation_logits",
    "naive_relation_logits",
    "relation_loss_core",
    "relation_terms",
    "resolve_backend",
    "run_relation_loss_core",
    "run_shared_relation_loss_core",
    "shared_relation_logits",
    "shared_relation_loss_core",
]

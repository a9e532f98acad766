"""Fast paths of the relation math (exact Gram kernel, ``torch.compile``) behind one dispatcher."""

from crcd_plugin.kernels.fused import BACKENDS, relation_loss_core, resolve_backend, run_relation_loss_core
from crcd_plugin.kernels.relation import anchor_free_logits, gram_relation_logits, naive_relation_logits

__all__ = [
    "BACKENDS",
    "anchor_free_logits",
    "gram_relation_logits",
    "naive_relation_logits",
    "relation_loss_core",
    "resolve_backend",
    "run_relation_loss_core",
]

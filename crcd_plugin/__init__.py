"""crcd-plugin: Complementary Relation Contrastive Distillation as a drop-in PyTorch loss."""

from crcd_plugin import functional
from crcd_plugin.distiller import CRCDDistiller, DistillSchedule
from crcd_plugin.gradients import (
    linear_cross_entropy_feature_grad,
    student_gradient_element,
    teacher_gradient_element,
)
from crcd_plugin.heads import EmbedHead
from crcd_plugin.hooks import FeatureCapture
from crcd_plugin.loss import CRCDLoss
from crcd_plugin.memory import FeatureQueue, MemoryBank
from crcd_plugin.sharded_memory import ShardedMemoryBank

__version__ = "0.1.0"

__all__ = [
    "CRCDDistiller",
    "CRCDLoss",
    "DistillSchedule",
    "EmbedHead",
    "FeatureCapture",
    "FeatureQueue",
    "MemoryBank",
    "ShardedMemoryBank",
    "functional",
    "linear_cross_entropy_feature_grad",
    "student_gradient_element",
    "teacher_gradient_element",
    "__version__",
]

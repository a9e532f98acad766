"""crcd-plugin: Complementary Relation Contrastive Distillation as a drop-in PyTorch loss."""

from crcd_plugin import functional
from crcd_plugin._version import __version__
from crcd_plugin.config import CRCDConfig, RelationConfig
from crcd_plugin.distiller import CRCDDistiller, CRCDTrainableModule, DistillSchedule
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
from crcd_plugin.teacher import LiveTeacher, Teacher, TensorTeacher
from crcd_plugin.teacher_cache import TeacherCache

__all__ = [
    # configuration
    "CRCDConfig",
    "RelationConfig",
    # the loop-level object and its schedule
    "CRCDDistiller",
    "CRCDTrainableModule",
    "DistillSchedule",
    # the teacher side: a model run live, a cache on disk, rows in tensors, or a kind of your own
    "Teacher",
    "LiveTeacher",
    "TeacherCache",
    "TensorTeacher",
    # the loss and its state
    "CRCDLoss",
    "EmbedHead",
    "FeatureQueue",
    "MemoryBank",
    "ShardedMemoryBank",
    # building blocks
    "FeatureCapture",
    "functional",
    "linear_cross_entropy_feature_grad",
    "student_gradient_element",
    "teacher_gradient_element",
    "__version__",
]

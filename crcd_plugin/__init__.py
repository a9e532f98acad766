"""crcd-plugin: Complementary Relation Contrastive Distillation as a drop-in PyTorch loss."""

from crcd_plugin import functional
from crcd_plugin.heads import EmbedHead
from crcd_plugin.loss import CRCDLoss
from crcd_plugin.memory import FeatureQueue, MemoryBank

__version__ = "0.1.0"

__all__ = ["CRCDLoss", "EmbedHead", "FeatureQueue", "MemoryBank", "functional", "__version__"]

"""crcd-plugin: Complementary Relation Contrastive Distillation as a drop-in PyTorch loss."""

__version__ = "0.1.0"

"""The demo's default settings, per method, and the ``--quick`` preset.

The per-method loss settings and the shared learning rate are the winners of the tuning run
(``python -m crcd_plugin.demo.tune``, see ``docs/demo.md``), chosen on a validation split carved
from the training data, never on the test split.
"""

from __future__ import annotations

from crcd_plugin.demo.data import DataConfig
from crcd_plugin.demo.train import MethodSettings, TeacherConfig, TrainConfig

DEFAULT_DATA = {
    "mnist1d": DataConfig(name="mnist1d", num_train=4000, num_test=1000, seed=42),
    "digits": DataConfig(name="digits", num_train=1297, num_test=500, seed=42),
}
DEFAULT_SEEDS = 5
QUICK_SEEDS = 3
QUICK_EPOCHS = 12

# Chosen by the tuning run of 2026-11-26 on this project's 2-vCPU box (430 s, teachers cached):
#   python -m crcd_plugin.demo.tune --out /tmp/tune --cache-dir /tmp/crcdcache_demo --no-progress -v
# (MNIST-1D, 3200 train / 800 validation carved from the 4000 training samples, seeds 100-102,
# 40 epochs, memory bank right from each row's first write). The teacher is the one whose KD
# students scored best. CRD and CRCD: each source of negatives (bank, queue, batch) tuned on its
# own, then the best; CRCD only among candidates whose crcd_grad epoch costs at most 2x the chosen
# CRD's (timed in the run). Values the search did not change are the dataclasses' defaults.
DEFAULT_TEACHER = TeacherConfig(arch="strided", epochs=30, batch_size=100, lr=0.01, weight_decay=0.0001)
DEFAULT_TRAIN = TrainConfig(hidden=(100, 100), epochs=40, batch_size=256, lr=0.04, weight_decay=0.0001)
DEFAULT_SETTINGS: dict[str, MethodSettings] = {
    "ce": MethodSettings(),
    "kd": MethodSettings(gamma=0.1, alpha=0.9, kd_temperature=8.0),
    "crd": MethodSettings(
        gamma=0.1, alpha=0.9, kd_temperature=8.0, beta=3.0, temperature=0.2, negatives="batch", symmetric=False
    ),
    "crcd": MethodSettings(
        gamma=0.1, alpha=0.9, kd_temperature=8.0, beta=1.0, embed_dim=32, num_anchors=2, negatives="batch",
        symmetric=False,
    ),
    "crcd_grad": MethodSettings(
        gamma=0.1, alpha=0.9, kd_temperature=8.0, beta=1.0, beta_grad=0.3, distill_until=0.8,
        embed_dim=32, num_anchors=2, negatives="batch", symmetric=False,
    ),
}

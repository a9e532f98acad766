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
DEFAULT_TEACHER = TeacherConfig()
DEFAULT_SEEDS = 5
QUICK_SEEDS = 3
QUICK_EPOCHS = 12

# Chosen by the tuning run of 2026-11-26 on this project's 2-core CPU box (806 s):
#   python -m crcd_plugin.demo.tune --out /tmp/tune-run --cache-dir /tmp/crcdcache --no-progress -v
# (MNIST-1D, 3200 train / 800 validation carved from the 4000 training samples, seeds 100 and 101,
# 40 epochs). Values the search did not change are MethodSettings' defaults: tau 0.1, d 64,
# A 8 anchors, InfoNCE, momentum 0.5; CRD's K is 256, CRCD's K is 16 (A*(K+1) = 136 scores/sample).
DEFAULT_TRAIN = TrainConfig(hidden=(100, 100), epochs=40, batch_size=256, lr=0.02, weight_decay=0.0001)
DEFAULT_SETTINGS: dict[str, MethodSettings] = {
    "ce": MethodSettings(),
    "kd": MethodSettings(alpha=2.0, kd_temperature=8.0, distill_until=0.8),
    "crd": MethodSettings(alpha=2.0, kd_temperature=8.0, beta=1.0, num_negatives=256),
    "crcd": MethodSettings(alpha=2.0, kd_temperature=8.0, beta=0.3, num_negatives=16, num_anchors=8),
    "crcd_grad": MethodSettings(
        alpha=2.0, kd_temperature=8.0, beta=0.3, beta_grad=1.0, distill_until=0.8, num_negatives=16, num_anchors=8
    ),
}

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
DEFAULT_SEEDS = 3
QUICK_EPOCHS = 8

# TUNED-BEGIN (rewritten by hand from the tuning run's output; see docs/demo.md)
DEFAULT_TRAIN = TrainConfig(hidden=(100, 100), epochs=40, batch_size=256, lr=1e-2, weight_decay=1e-4)
DEFAULT_SETTINGS: dict[str, MethodSettings] = {
    "ce": MethodSettings(),
    "kd": MethodSettings(alpha=1.0, kd_temperature=4.0),
    "crd": MethodSettings(alpha=1.0, kd_temperature=4.0, beta=0.5, temperature=0.1, num_negatives=256),
    "crcd": MethodSettings(alpha=1.0, kd_temperature=4.0, beta=0.5, temperature=0.1, num_negatives=32, num_anchors=8),
    "crcd_grad": MethodSettings(
        alpha=1.0, kd_temperature=4.0, beta=0.5, beta_grad=0.5, temperature=0.1, num_negatives=32, num_anchors=8
    ),
}
# TUNED-END

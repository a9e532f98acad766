"""The demo's default settings, per method, and the ``--quick`` preset.

Every method trains with the library's default ``CRCDConfig`` (KD alone, CRD, CRCD and CRCD +
gradient element are that config with terms turned off or on); the dataset, teacher and student
budget are the demo's own.
"""

from __future__ import annotations

from crcd_plugin.config import CRCDConfig
from crcd_plugin.demo.data import DataConfig
from crcd_plugin.demo.train import TeacherConfig, TrainConfig

DEFAULT_DATA = {
    "mnist1d": DataConfig(name="mnist1d", num_train=4000, num_test=1000, seed=42),
    "digits": DataConfig(name="digits", num_train=1297, num_test=500, seed=42),
}
DEFAULT_SEEDS = 5
QUICK_SEEDS = 3
QUICK_EPOCHS = 12

# The training budget of the demo (teacher recipe, student MLP, AdamW schedule) was chosen on a
# validation split carved from the 4000 training samples, never on the test split (docs/demo.md).
DEFAULT_TEACHER = TeacherConfig(arch="strided", epochs=30, batch_size=100, lr=0.01, weight_decay=0.0001)
DEFAULT_TRAIN = TrainConfig(hidden=(100, 100), epochs=40, batch_size=256, lr=0.04, weight_decay=0.0001)
# The distillation settings are the library's defaults (CRCDConfig()): the demo shows what a user
# gets by adding CRCD to a loop, and main job and library cannot drift apart.
DEMO_CONFIG = CRCDConfig()

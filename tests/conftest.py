import os
import sys

# Lets tests import the naive reference next to them (tests/naive.py).
sys.path.insert(0, os.path.dirname(__file__))

# Triton kernels run under Triton's NumPy interpreter (tests are CPU-only). Triton reads this when
# it is first imported, which importing torch can already do, so it is set before anything else.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def single_thread():
    """One intra-op thread for the test: on tiny models more threads only add contention (10-30x
    slower on a busy 2-core box). Files use it with ``pytestmark = pytest.mark.usefixtures(...)``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# 0.2.0's defaults, for tests whose assertions were written against them (reference numerics,
# bitwise comparisons without random anchor draws, both sides' memories written). Since 0.3 the
# library's defaults are the ones the defaults suite chose (docs/reliability.md); a test that pins
# behaviour of the old defaults names them explicitly through these.
V020_RELATION = dict(embed_dim=128, temperature=0.05, num_anchors=500, symmetric=True)
V020_BANK = dict(V020_RELATION, objective="nce", num_negatives=500)
V020_WEIGHTS = dict(task_weight=1.0, kd_weight=0.9, kd_temperature=4.0, kd_standardize=False, feature_weight=1.0,
                    gradient_weight=1.0,
                    gradient_normalization="none")
# The same as 0.2.0 keywords (CRCDLoss(**...) / crcd_options=...), for tests that use the deprecated spelling.
V020_LOSS_KEYWORDS = dict(embed_dim=128, temperature=0.05, num_anchors=500, symmetric=True)


def current_spelling(options: dict) -> dict:
    """Keyword arguments of ``CRCDDistiller`` (or a task) with 0.2.0's spelling rewritten in today's.

    The test factories take the short 0.2.0 forms their callers use (``crcd_options=``, weights as
    keywords, ``queue_size=``) and build the ``config=`` they stand for, exactly as the library's
    mapping does, so that only tests/test_deprecations.py exercises the deprecated path itself.
    """
    from crcd_plugin import CRCDConfig
    from crcd_plugin._compat import LEGACY_RELATION_NAMES, LEGACY_WEIGHTS

    options = dict(options)
    # 0.2.0 always trained the relation term; today it is off unless feature_weight > 0.
    config = options.pop("config", None) or CRCDConfig(feature_weight=0.3)
    weights = {LEGACY_WEIGHTS[key]: options.pop(key) for key in list(options)
               if key in LEGACY_WEIGHTS and options[key] is not None}
    relation = dict(options.pop("crcd_options", None) or {})
    if "num_samples" in relation:
        options.setdefault("num_samples", relation.pop("num_samples"))
    if relation.get("num_anchors", 0) is None:
        del relation["num_anchors"]  # 0.2.0: None meant the default
    if options.get("queue_size") is not None:
        relation["queue_size"] = options.pop("queue_size")
    options.pop("queue_size", None)
    changes = {LEGACY_RELATION_NAMES.get(key, key): value for key, value in relation.items()}
    schedule = options.pop("schedule", None)
    if schedule is not None:  # a DistillSchedule object: its kind and fractions, and the run length
        weights.update(schedule=schedule.kind, schedule_until=schedule.until, schedule_start=schedule.start)
        options.setdefault("total_steps", schedule.total_steps)
    options["config"] = config.replace(relation=config.relation.replace(**changes), **weights)
    return options

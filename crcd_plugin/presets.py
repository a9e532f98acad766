"""Named sets of CRCD settings: ``"default"`` (safe and affordable in any loop) and ``"reference"``.

``CRCDLoss`` and ``CRCDDistiller`` take ``preset=``; an argument passed explicitly always wins over
the preset. docs/reliability.md has the measurements behind each default that differs.
"""

from __future__ import annotations

from typing import Any, Dict, Literal, Optional

from crcd_plugin._checks import check_choice

Preset = Literal["default", "reference"]
PRESETS = ("default", "reference")

# The reference draws K = 500 negatives per sample; its scores grow with B * A * (K + 1), and no
# default here does more relation work per step than that.
REFERENCE_NUM_NEGATIVES = 500
DEFAULT_MAX_ANCHORS = 500

_LOSS_PRESETS: Dict[str, Dict[str, Any]] = {
    # At most 500 anchors: in-batch negatives have K + 1 = B candidates, so B * A * B scores stay
    # within the reference's B * B * 501 for any batch size (no effect at B <= 500).
    # The reference's bank starts from random rows that act as samples until momentum washes them
    # out; the default makes each row right from its first write (see CRCDLoss, memory_init).
    "default": {"num_anchors": DEFAULT_MAX_ANCHORS, "memory_init": "first_write"},
    "reference": {"num_anchors": None, "memory_init": "cold"},
}

_DISTILLER_PRESETS: Dict[str, Dict[str, Any]] = {
    "default": {"warmup_steps": 0},
    "reference": {"warmup_steps": 0},
}


def loss_preset(preset: str) -> Dict[str, Any]:
    """``CRCDLoss`` settings of ``preset`` (a copy)."""
    check_choice("preset", preset, PRESETS)
    return dict(_LOSS_PRESETS[preset])


def distiller_preset(preset: str) -> Dict[str, Any]:
    """``CRCDDistiller`` settings of ``preset`` (a copy)."""
    check_choice("preset", preset, PRESETS)
    return dict(_DISTILLER_PRESETS[preset])


def default_objective(preset: str, negatives: str) -> str:
    """The objective when ``objective`` is not given.

    NCE (the reference) models the negatives as draws from a noise distribution over the dataset
    (``Pn = 1/N``); with a memory bank that holds, and it is what the reference trains with. A queue
    or the batch has no such ``N``, and NCE's sum over ``K`` negatives, with ``Z`` fixed on the
    first batch, grows with ``K`` once the scores drift above ``log Z`` (docs/reliability.md: a
    rebound of the CE at ``K = 4096``). InfoNCE's gradient per row is ``softmax - onehot``:
    bounded whatever ``K``, and its value stays near ``log(K + 1)``.
    """
    if preset == "reference" or negatives == "bank":
        return "nce"
    return "infonce"


def default_negatives(preset: str, num_samples: Optional[int], queue_size: Optional[int]) -> str:
    """Where negatives come from when ``negatives`` is not given.

    A memory bank when the dataset size is known (the reference), a queue when a queue size is
    given, else the other samples of the batch (no state, no index, no cold start). The reference
    preset has no index-free mode of its own: without ``num_samples`` it still asks for a bank.
    """
    if num_samples is not None or preset == "reference" and queue_size is None:
        return "bank"
    return "queue" if queue_size is not None else "batch"

"""Warn once when training steps run but the CRCD embedding heads never change.

The usual cause is an optimizer built on ``student.parameters()``: the heads then get gradients
that no optimizer applies, and the relation losses train the student through fixed random
projections, with no error. The watch keeps a copy of the heads at the first training step and
compares once, ``WATCH_STEPS`` steps later (one host sync in the whole run).
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, List, Optional

import torch

# The distiller calls in from above: typed as Any so that nothing here imports it back.
CRCDDistiller = Any

# Training steps between the copy and the comparison: more than any gradient accumulation or
# GradScaler skips that leave the heads alone for a while in a loop that does train them.
WATCH_STEPS = 50


class HeadsNotTrainedWarning(UserWarning):
    """The CRCD embedding heads did not change over training steps: the optimizer misses them."""


class _Watch:
    __slots__ = ("steps", "snapshot", "done")

    def __init__(self) -> None:
        self.steps = 0
        self.snapshot: Optional[List[torch.Tensor]] = None
        self.done = False


_watches: "weakref.WeakKeyDictionary[CRCDDistiller, _Watch]" = weakref.WeakKeyDictionary()


def watch_heads(distiller: CRCDDistiller) -> None:
    """Count one training step of ``distiller`` (call it where the distillation terms are computed
    with grad enabled, in training mode); warns once if the heads are bitwise unchanged after
    ``WATCH_STEPS`` such steps."""
    watch = _watches.get(distiller)
    if watch is None:
        watch = _watches[distiller] = _Watch()
    if watch.done:
        return
    params = [param for _, param in distiller.crcd_named_parameters()]
    if not params:
        watch.done = True
        return
    watch.steps += 1
    if watch.snapshot is None:
        watch.snapshot = [param.detach().clone() for param in params]
        return
    if watch.steps <= WATCH_STEPS:
        return
    watch.done = True
    snapshot, watch.snapshot = watch.snapshot, None
    changed = len(snapshot) != len(params) or any(
        before.shape != param.shape or not torch.equal(before, param.detach())
        for before, param in zip(snapshot, params)
    )
    if changed:
        return
    warnings.warn(
        f"the CRCD embedding heads have not changed in {WATCH_STEPS} training steps although they require grad: "
        "the optimizer does not hold them. Build it on distiller.parameters() (the student and the CRCD heads), "
        "not on student.parameters(), e.g. torch.optim.SGD(distiller.parameters(), lr=0.05, momentum=0.9)",
        HeadsNotTrainedWarning,
        stacklevel=4,
    )

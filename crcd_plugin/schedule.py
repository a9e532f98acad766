"""The distillation weight ``w(t)``: the schedule over the run and the warm-up ramp.

:class:`DistillSchedule` multiplies the KD and CRCD terms (never the task CE); :func:`warmup_ramp`
scales them up over the first ``warmup_steps`` training steps. Both keep their progress in
buffers, so a resumed run continues exactly.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ._checks import check_choice, check_positive_int
from .config import SCHEDULE_KINDS, ScheduleKind

__all__ = ["DistillSchedule", "warmup_ramp"]


class DistillSchedule(nn.Module):
    """Distillation weight ``w(t)`` that multiplies the KD and CRCD terms (never the task CE).

    - ``"step"`` (reference): ``w = 1`` while ``t < until * total_steps``, then ``0``; the last
      4% of training fine-tunes on CE alone.
    - ``"linear"``: ``w = 1`` until ``start * total_steps``, then linear down to ``0`` at
      ``until * total_steps``.
    - ``"constant"``: ``w = 1``.

    ``t`` counts whatever unit ``total_steps`` counts (epochs or optimizer steps). The current
    ``t`` lives in the ``progress`` buffer, so it is saved in and resumed from a ``state_dict``.

    Args:
        total_steps: Length of training, in the unit of ``t``.
        kind: ``"step"``, ``"linear"`` or ``"constant"``.
        until: Fraction of training at which ``w`` reaches 0.
        start: For ``"linear"``, fraction of training at which the decay starts.

    Example:
        >>> schedule = DistillSchedule(total_steps=250, kind="step", until=0.96)
        >>> float(schedule(239)), float(schedule(240))
        (1.0, 0.0)
        >>> schedule.set_progress(100); float(schedule())
        1.0
    """

    progress: torch.Tensor

    def __init__(
        self, total_steps: int, kind: ScheduleKind = "step", until: float = 0.96, start: float = 0.0
    ) -> None:
        super().__init__()
        check_positive_int("total_steps", total_steps)
        check_choice("kind", kind, SCHEDULE_KINDS)
        if not 0.0 <= start < until <= 1.0:
            raise ValueError(f"expected 0 <= start < until <= 1, got start={start!r}, until={until!r}")
        self.total_steps = total_steps
        self.kind = kind
        self.until = float(until)
        self.start = float(start)
        self.register_buffer("progress", torch.zeros((), dtype=torch.long))
        # A host copy of ``progress``, so that ``distills()`` never reads the device buffer.
        self._progress_host = 0

    def set_progress(self, step: int) -> None:
        """Set the current ``t`` (e.g. the epoch or global step about to run)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        self.progress.fill_(step)
        self._progress_host = step

    def distills(self) -> bool:
        """Whether ``w > 0`` at the stored progress, without a host sync.

        ``False`` from ``until * total_steps`` on (never for ``"constant"``); then
        :class:`CRCDDistiller` skips the teacher and every distillation term. Reads the host copy
        that :meth:`set_progress` and ``load_state_dict`` keep, so set the progress through them.
        """
        return self.kind == "constant" or self._progress_host / self.total_steps < self.until

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._progress_host = int(self.progress)  # one sync when a checkpoint is loaded, not per step

    def forward(self, step: Optional[Union[int, torch.Tensor]] = None) -> torch.Tensor:
        """Weight at ``step`` (default: the stored progress), as a 0-dim float tensor (no host sync).

        Args:
            step: Optional ``t`` to evaluate instead of the stored progress.

        Returns:
            ``w(t)`` in ``[0, 1]``, on the buffer's device.
        """
        t = self.progress if step is None else torch.as_tensor(step, device=self.progress.device)
        fraction = t.float() / self.total_steps
        if self.kind == "constant":
            return torch.ones_like(fraction)
        if self.kind == "step":
            return (fraction < self.until).float()
        return ((self.until - fraction) / (self.until - self.start)).clamp(0.0, 1.0)

    def extra_repr(self) -> str:
        return f"total_steps={self.total_steps}, kind={self.kind!r}, until={self.until}, start={self.start}"


def warmup_ramp(
    weight: Union[float, torch.Tensor], progress: torch.Tensor, warmup_steps: int, advance: bool
) -> Union[float, torch.Tensor]:
    """``weight`` times the warm-up ramp ``min(1, (progress + 1) / warmup_steps)``; no ramp for 0 steps.

    Args:
        weight: ``w(t)`` of the schedule (or 1).
        progress: The 0-dim long buffer counting training steps so far; advanced in place (on
            its device, no host sync) when ``advance``.
        warmup_steps: Length of the ramp.
        advance: Count this step (training mode).
    """
    if warmup_steps <= 0:
        return weight
    ramp = ((progress + 1).float() / warmup_steps).clamp(max=1.0)
    if advance:
        progress.add_(1)
    return weight * ramp

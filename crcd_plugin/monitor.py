"""Warns once when a distillation term or the student's feature gradient explodes.

A bad setting (a learning rate too high for the KD term, an NCE constant fixed before the memory
held real rows) shows up as a loss term or a gradient that grows by orders of magnitude while every
value stays finite, so nothing raises and the run is lost silently. The monitor keeps its running
maxima on the device and reads them once every ``check_every`` steps: no host sync per step.
"""

from __future__ import annotations

import warnings
from typing import Dict

import torch

__all__ = ["ExplosionMonitor"]


class ExplosionMonitor:
    """Tracks loss terms and a gradient norm against their first values; warns once per name.

    A value "explodes" when it becomes non-finite, or when its maximum over the last
    ``check_every`` steps exceeds ``loss_factor`` times (``grad_factor`` for gradient norms) its
    value at the first observed step. Contrastive and KD terms start near their largest values
    (chance, an untrained student) and fall as training goes, so a term ten times above its start
    is a divergence, not noise.

    Args:
        check_every: Steps between two reads of the device maxima (one host sync each).
        loss_factor: Growth of a loss term over its first value that counts as an explosion.
        grad_factor: Growth of a gradient norm over its first value that counts as an explosion.

    Example:
        >>> monitor = ExplosionMonitor(check_every=2)
        >>> monitor.observe({"kd_loss": torch.tensor(1.0)})
        >>> monitor.observe({"kd_loss": torch.tensor(50.0)})  # doctest: +SKIP
        RuntimeWarning: CRCD: kd_loss grew from 1 to 50 ...
    """

    def __init__(self, check_every: int = 50, loss_factor: float = 10.0, grad_factor: float = 100.0) -> None:
        for name, value in (("loss_factor", loss_factor), ("grad_factor", grad_factor)):
            if not value > 1.0:
                raise ValueError(f"{name} must be > 1 (a growth factor), got {value!r}")
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be a positive int, got {check_every!r}")
        self.check_every = check_every
        self.loss_factor = loss_factor
        self.grad_factor = grad_factor
        self._first: Dict[str, torch.Tensor] = {}
        self._peak: Dict[str, torch.Tensor] = {}
        self._steps = 0
        self._warned: set = set()

    def observe(self, values: Dict[str, torch.Tensor]) -> None:
        """Record one step's values (0-dim tensors); every ``check_every`` steps, check them."""
        for name, value in values.items():
            self._record(name, value.detach().float())
        self._steps += 1
        if self._steps % self.check_every == 0:
            self.check()

    def observe_gradient(self, name: str, grad: torch.Tensor) -> None:
        """Record the norm of a gradient (a tensor hook calls this during backward)."""
        self._record(name, grad.detach().float().norm())

    def _record(self, name: str, value: torch.Tensor) -> None:
        if name not in self._first:
            self._first[name] = value.clone()
            self._peak[name] = value.clone()
        else:
            # NaN propagates through maximum, so a non-finite step is never lost.
            self._peak[name] = torch.maximum(self._peak[name], value)

    def check(self) -> None:
        """Compare the maxima with the first values (one host sync) and warn once per name."""
        names = [n for n in self._peak if n not in self._warned]
        if not names:
            return
        first = torch.stack([self._first[n] for n in names]).tolist()
        peak = torch.stack([self._peak[n] for n in names]).tolist()
        for name, start, top in zip(names, first, peak):
            if top == float("-inf"):
                continue  # not observed since the last check
            factor = self.grad_factor if name.endswith("grad_norm") else self.loss_factor
            finite = top == top and abs(top) != float("inf")
            if finite and not (start > 0 and top > factor * start):
                continue
            self._warned.add(name)
            message = (
                f"CRCD: {name} grew from {start:.3g} to {top:.3g} (more than {factor:g}x its first value) "
                "within the last steps: the run is probably diverging. Lower the learning rate or the "
                "distillation weights (CRCDConfig.kd_weight / feature_weight / gradient_weight); "
                "docs/reliability.md lists the settings measured to be safe."
                if finite
                else f"CRCD: {name} is not finite ({top}); the run has diverged."
            )
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        for name in names:
            self._peak[name] = self._peak[name].new_full((), float("-inf"))

"""CRCDDistiller: the one object a plain training loop needs, plus the distillation-weight schedule.

The distiller runs student and frozen teacher, captures the input of each classifier head
(the penultimate feature), and returns CE + KD + CRCD (feature element, optionally gradient
element) as a dict of named loss components.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import (
    Any,
    Callable,
    ContextManager,
    Dict,
    Iterable,
    Iterator,
    List,
    Literal,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_choice, check_positive_int
from .distributed import average_gradients, broadcast_state, world_size
from .functional import kd_loss
from .gradients import student_gradient_element, teacher_gradient_element
from .hooks import FeatureCapture, PoolMode, Selector, pool_feature, resolve_module, select_tensor, unwrap_model
from .loss import CRCDLoss
from .presets import PRESETS, Preset, default_negatives, distiller_preset

_logger = logging.getLogger(__name__)

__all__ = ["DistillSchedule", "CRCDDistiller"]

_MODEL_PREFIXES = ("student.", "teacher.")

ScheduleKind = Literal["step", "linear", "constant"]
# (model, model input) -> position of the token the model classifies, [B] or one int for all rows.
TokenSelector = Callable[[nn.Module, Any], Union[int, torch.Tensor]]
_SCHEDULE_KINDS: Tuple[str, ...] = ("step", "linear", "constant")


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
        check_choice("kind", kind, _SCHEDULE_KINDS)
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


def _check_weight(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return float(value)


class CRCDDistiller(nn.Module):
    """Student + frozen teacher + CRCD losses, for a plain training loop.

    The distilled feature is the *input* of each classifier head (``student_head`` /
    ``teacher_head``, dotted module paths), captured by hooks without editing the models. The
    total loss is::

        loss = gamma * CE + w(t) * (alpha * KD + beta * CRCD_feature + gradient_weight * CRCD_gradient)

    Negatives: with ``num_samples`` (dataset size) the CRCD losses use a per-sample memory bank
    (the reference; ``forward`` then needs the dataset ``index`` of each sample); with
    ``queue_size`` a FIFO queue of past embeddings; with neither, the other samples of the batch
    (no index, no state). ``crcd_options`` overrides either choice and is forwarded to every
    :class:`~crcd_plugin.loss.CRCDLoss`; the gradient element gets its own ``CRCDLoss`` (own heads
    and memory).

    ``preset="default"`` makes every default safe to add to a loop where CE alone trains, at no
    more relation work per step than the reference (see docs/reliability.md for the measurements);
    ``preset="reference"`` is the authors' recipe (NCE, all ``B`` anchors; a queue of 4096 with
    ``K = 500`` when there is no index). Arguments passed explicitly always win over the preset.

    A batch of one has no relations: its CRCD terms are 0 (logged once) and no state moves.

    The teacher is frozen (``requires_grad=False``), run under ``torch.no_grad()``, and kept in
    eval mode whatever ``train()`` is called with. Export the student with
    :meth:`student_state_dict`; ``distiller.state_dict()`` is for resuming (it holds the CRCD
    heads, memories and schedule progress, besides both models).

    Under ``torch.distributed`` (``torchrun``, ``accelerate``): :meth:`prepare_distributed` wraps
    only the student in DDP and gives every rank rank 0's CRCD state, :meth:`sync_gradients`
    averages the CRCD heads' gradients before each optimizer step, and :meth:`no_sync` serves
    gradient accumulation (docs/distributed.md).

    Dimensions come from ``nn.Linear`` heads (``in_features``), else from a dry run on
    ``example_input``, else from the first ``forward``; in the last case create the optimizer
    *after* that first call, since the CRCD heads have parameters too.

    Args:
        student: Student model, ``student(x)`` returns logits (or see ``output_select``).
        teacher: Trained teacher model.
        student_head: Dotted path of the student's classifier head module.
        teacher_head: Dotted path of the teacher's classifier head module.
        gamma: Weight of the task cross-entropy.
        alpha: Weight of Hinton KD (0 disables it). Reference: 0.9.
        beta: Weight of the CRCD feature element (0 disables it). Reference: 1.0.
        kd_temperature: KD temperature ``T``; the KL is scaled by ``T^2``.
        gradient_element: Also distil relations between the CE gradients w.r.t. the features.
        gradient_weight: Weight of the CRCD gradient element.
        label_smoothing: Label smoothing of the task CE (and of the CE whose gradient is taken).
        num_samples: Dataset size; selects the memory-bank negatives (needs ``index``).
        queue_size: Queue length when ``num_samples`` is not given; ``None`` uses in-batch
            negatives (the reference preset: a queue of 4096).
        crcd_options: Extra keyword arguments for ``CRCDLoss`` (``embed_dim``, ``temperature``,
            ``negatives``, ``objective``, ...), overriding the defaults above.
        schedule: Distillation weight ``w(t)``; ``None`` means ``w = 1`` throughout.
        feature_pool: How to reduce a captured head input that is not ``[B, D]`` (see
            :func:`~crcd_plugin.hooks.pool_feature`); ``None`` flattens it.
        output_select: How to get logits from the models' outputs when they are not tensors
            (int index, str key/attribute, or callable); ``None`` accepts a tensor or ``.logits``.
        feature_token: For heads applied to every token (head output ``[B, T, C]`` while the
            model's logits are ``[B, C]``, as in decoder-only ``*ForSequenceClassification``
            models): ``feature_token(model, input)`` gives the position (``[B]`` LongTensor, or one
            int for all rows) of the token the model classifies; the feature and head logits are
            taken at that position. ``model`` is the unwrapped model.
        example_input: Optional batch for a dry run (eval mode, no grad) that fixes dimensions.
        teacher_transform: Optional map from the student's input batch to the teacher's, applied
            (under no grad) before every teacher forward, e.g. re-normalisation for a teacher
            trained with another mean/std. An ``nn.Module`` is registered, so it moves with
            ``.to()``. ``None``: the teacher sees the student's input.
        warmup_steps: Ramp the distillation weight linearly from ``1/warmup_steps`` to 1 over the
            first training-mode forward calls (counted in the ``warmup_progress`` buffer, so it
            resumes with a ``state_dict``); 0 turns it off. ``None``: the preset's (0 for both).
        preset: ``"default"`` or ``"reference"`` (see above).

    Example:
        >>> student = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> teacher = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
        >>> distiller = CRCDDistiller(student, teacher, student_head="2", teacher_head="2")
        >>> out = distiller(torch.randn(8, 10), torch.randint(0, 3, (8,)))
        >>> sorted(out)
        ['crcd_feature_loss', 'crcd_gradient_loss', 'kd_loss', 'logits', 'loss', 'task_loss']
        >>> out["loss"].backward()
    """

    crcd_feature: Optional[CRCDLoss]
    crcd_gradient: Optional[CRCDLoss]
    warmup_progress: torch.Tensor

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        student_head: str = "fc",
        teacher_head: str = "fc",
        *,
        gamma: float = 1.0,
        alpha: float = 0.9,
        beta: float = 1.0,
        kd_temperature: float = 4.0,
        gradient_element: bool = False,
        gradient_weight: float = 1.0,
        label_smoothing: float = 0.0,
        num_samples: Optional[int] = None,
        queue_size: Optional[int] = None,
        crcd_options: Optional[Mapping[str, Any]] = None,
        schedule: Optional[DistillSchedule] = None,
        feature_pool: Optional[PoolMode] = None,
        output_select: Optional[Selector] = None,
        example_input: Optional[Any] = None,
        feature_token: Optional[TokenSelector] = None,
        teacher_transform: Optional[Callable[[Any], Any]] = None,
        warmup_steps: Optional[int] = None,
        preset: Preset = "default",
    ) -> None:
        super().__init__()
        check_choice("preset", preset, PRESETS)
        if warmup_steps is None:
            warmup_steps = distiller_preset(preset)["warmup_steps"]
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        for name, model in (("student", student), ("teacher", teacher)):
            if not isinstance(model, nn.Module):
                raise TypeError(f"{name} must be an nn.Module, got {type(model).__name__}")
        if unwrap_model(student) is unwrap_model(teacher):
            raise ValueError("student and teacher must be different modules")
        if isinstance(teacher, nn.parallel.DistributedDataParallel):
            raise ValueError(
                "teacher is wrapped in DistributedDataParallel; pass the frozen teacher itself "
                "(it never trains, so it needs no gradient sync; wrap only the student)"
            )
        self.gamma = _check_weight("gamma", gamma)
        self.alpha = _check_weight("alpha", alpha)
        self.beta = _check_weight("beta", beta)
        self.gradient_weight = _check_weight("gradient_weight", gradient_weight)
        if not isinstance(kd_temperature, (int, float)) or not kd_temperature > 0:
            raise ValueError(f"kd_temperature must be > 0, got {kd_temperature!r}")
        if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if num_samples is not None and (
            isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0
        ):
            raise ValueError(f"num_samples must be None or a positive int (the dataset size), got {num_samples!r}")
        if queue_size is not None:
            check_positive_int("queue_size", queue_size)
        if crcd_options is not None and not isinstance(crcd_options, Mapping):
            raise TypeError(
                f"crcd_options must be a dict of CRCDLoss keyword arguments, got {type(crcd_options).__name__}"
            )
        if schedule is not None and not isinstance(schedule, DistillSchedule):
            raise TypeError(f"schedule must be a DistillSchedule or None, got {type(schedule).__name__}")
        if feature_pool is not None:
            pool_feature(torch.zeros(1, 1), feature_pool)  # validates the name
        if teacher_transform is not None and not callable(teacher_transform):
            raise TypeError(
                f"teacher_transform must be None or a callable input -> input, got {type(teacher_transform).__name__}"
            )
        if feature_token is not None and not callable(feature_token):
            raise TypeError(f"feature_token must be a callable (model, input) -> positions, got {feature_token!r}")

        self.student = student
        self.teacher = teacher
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        # Resolve now so a wrong path fails at construction, not at the first step.
        student_head_module = resolve_module(student, student_head)
        teacher_head_module = resolve_module(teacher, teacher_head)
        self.student_head = student_head
        self.teacher_head = teacher_head
        self.kd_temperature = float(kd_temperature)
        self.gradient_element = bool(gradient_element)
        self.label_smoothing = float(label_smoothing)
        self.feature_pool = feature_pool
        self.output_select = output_select
        self.feature_token = feature_token
        self.schedule = schedule
        self.teacher_transform = teacher_transform
        self.preset = preset
        self.warmup_steps = warmup_steps
        # Training-mode forward calls so far, for the warm-up; a buffer so that it resumes exactly.
        self.register_buffer("warmup_progress", torch.zeros((), dtype=torch.long))
        self._warned_batch_of_one = False
        self.crcd_kwargs = self._crcd_kwargs(num_samples, queue_size, crcd_options, preset)
        self.crcd_feature = None
        self.crcd_gradient = None

        if example_input is not None:
            self.build(example_input)
        elif (
            type(student_head_module) is nn.Linear
            and type(teacher_head_module) is nn.Linear
            and feature_pool != "flatten"
        ):
            self._build_losses(student_head_module.in_features, teacher_head_module.in_features)

    @staticmethod
    def _crcd_kwargs(
        num_samples: Optional[int],
        queue_size: Optional[int],
        crcd_options: Optional[Mapping[str, Any]],
        preset: str,
    ) -> Dict[str, Any]:
        options = dict(crcd_options or {})
        options.setdefault("preset", preset)
        if num_samples is None and preset == "reference":
            queue_size = 4096 if queue_size is None else queue_size  # the reference's index-free stand-in
        queue_size = options.get("queue_size", queue_size)
        negatives = options.get("negatives") or default_negatives("default", num_samples, queue_size)
        options["negatives"] = negatives
        if negatives == "bank":
            options.setdefault("num_samples", num_samples)
            if options["num_samples"] is None:
                raise ValueError("negatives='bank' needs the dataset size: pass num_samples= to the distiller")
        elif negatives == "queue":
            options["queue_size"] = 4096 if queue_size is None else queue_size
        return options

    @property
    def built(self) -> bool:
        """Whether the CRCD losses (and so all trainable parameters) exist yet."""
        if not (self.beta or self.gradient_element):
            return True  # nothing to build: CE and KD only
        return self.crcd_feature is not None or self.crcd_gradient is not None

    def _build_losses(self, student_dim: int, teacher_dim: int, device: Optional[torch.device] = None) -> None:
        # Parameters created inside inference_mode would be unusable for training later.
        with torch.inference_mode(False):
            if self.beta > 0:
                self.crcd_feature = CRCDLoss(student_dim, teacher_dim, **self.crcd_kwargs).to(device)
            if self.gradient_element:
                self.crcd_gradient = CRCDLoss(student_dim, teacher_dim, **self.crcd_kwargs).to(device)
        for loss in (self.crcd_feature, self.crcd_gradient):
            if loss is not None:
                loss.train(self.training)
                # Built from each rank's own random state; DDP does not see them, so rank 0's wins.
                broadcast_state(loss)
        _logger.debug("built CRCD losses for student_dim=%d, teacher_dim=%d", student_dim, teacher_dim)

    def build(self, example_input: Any) -> "CRCDDistiller":
        """Fix dimensions with a dry run (eval mode, no grad, models' state untouched).

        Args:
            example_input: A batch the models accept (any batch size; a tensor, or a dict of
                tensors passed as keyword arguments).

        Returns:
            ``self``.
        """
        was_training = unwrap_model(self.student).training
        self.student.eval()
        try:
            with torch.no_grad():
                f_s, _, _ = self._run(self.student, self.student_head, example_input, "student")
                f_t, _, _ = self._run(self.teacher, self.teacher_head, self._teacher_input(example_input), "teacher")
        finally:
            self.student.train(was_training)
        self._build_losses(self._reduce(f_s).shape[1], self._reduce(f_t).shape[1], f_s.device)
        return self

    @torch.no_grad()
    def fill_memory(self, loader: Iterable[Any], device: Optional[torch.device] = None) -> "CRCDDistiller":
        """Warm-up pass: write every sample's embeddings into the CRCD memories before training.

        Runs student and teacher (eval mode, no grad) over ``loader`` and hands each batch to
        :meth:`CRCDLoss.fill_memory`, so the bank holds real rows from the first step (one extra
        pass over the data). The gradient element's memory gets detached gradients. Train/eval
        modes are restored afterwards; models, heads and the NCE constant are not changed.

        Args:
            loader: Iterable of ``(input, target, index)`` batches (``(input, target)`` for a
                queue), like the arguments of :meth:`forward`.
            device: Where to move each batch; default: the student's device.

        Returns:
            ``self``.

        Example:
            >>> distiller = distiller.fill_memory(train_loader)  # doctest: +SKIP
        """
        if device is None:
            device = next(iter(unwrap_model(self.student).parameters()), torch.zeros(())).device
        was_training = self.training
        self.eval()
        try:
            for batch in loader:
                if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
                    raise TypeError("fill_memory needs batches of (input, target, index) or (input, target)")
                tensors = [t.to(device, non_blocking=True) for t in batch]
                x, target, index = tensors if len(tensors) == 3 else (*tensors, None)
                self._check_batch(x, target, index)
                f_s, head_logits_s, _ = self._run(self.student, self.student_head, x, "student")
                f_t, head_logits_t, _ = self._run(self.teacher, self.teacher_head, x, "teacher")
                if not self.built:
                    self._build_losses(self._reduce(f_s).shape[1], self._reduce(f_t).shape[1], f_s.device)
                if self.crcd_feature is not None:
                    self.crcd_feature.fill_memory(self._reduce(f_s), self._reduce(f_t), index)
                if self.crcd_gradient is not None:
                    # Values only: the detached (teacher-style) gradient element serves both sides.
                    smoothing = self.label_smoothing
                    g_s = teacher_gradient_element(
                        resolve_module(self.student, self.student_head), f_s, target,
                        logits=head_logits_s, label_smoothing=smoothing,
                    )
                    g_t = teacher_gradient_element(
                        resolve_module(self.teacher, self.teacher_head), f_t, target,
                        logits=head_logits_t, label_smoothing=smoothing,
                    )
                    if g_s is None or g_t is None:  # a non-linear head: autograd cannot run
                        raise RuntimeError(
                            "fill_memory cannot compute the gradient element of a non-linear classifier head "
                            "inside torch.inference_mode(); call it outside inference mode"
                        )
                    self.crcd_gradient.fill_memory(self._reduce(g_s), self._reduce(g_t), index)
        finally:
            self.train(was_training)
        return self

    def train(self, mode: bool = True) -> "CRCDDistiller":
        """Set train/eval mode on everything except the teacher, which stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def student_state_dict(self) -> Dict[str, Any]:
        """The student's own ``state_dict`` (no wrapper prefixes, no teacher, no CRCD state): what to export."""
        return unwrap_model(self.student).state_dict()

    def crcd_state_dict(self) -> Dict[str, Any]:
        """State of the CRCD heads, memories and schedule (everything but the two models)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(_MODEL_PREFIXES)}

    def load_crcd_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load what :meth:`crcd_state_dict` returned; every CRCD key must match (the models are untouched).

        Args:
            state_dict: CRCD heads, memories and schedule state, as saved by :meth:`crcd_state_dict`.

        Raises:
            ValueError: If keys are missing or unexpected (e.g. a checkpoint made with other options).
        """
        model_keys = [k for k in state_dict if k.startswith(_MODEL_PREFIXES)]
        if model_keys:
            raise ValueError(f"a CRCD state dict holds no model weights, got keys {model_keys[:3]} ...")
        expected = set(self.crcd_state_dict())
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        if missing or unexpected:
            raise ValueError(
                f"CRCD state does not match this distiller's options: missing {missing}, unexpected {unexpected}"
            )
        # Checked above, so strict=False only skips the two models' keys.
        self.load_state_dict(dict(state_dict), strict=False)

    # ------------------------------------------------------------------ distributed
    def prepare_distributed(self, device_ids: Optional[Sequence[int]] = None, **ddp_kwargs: Any) -> "CRCDDistiller":
        """Wrap the student in ``DistributedDataParallel`` and give every rank rank 0's CRCD state.

        Call once after ``torch.distributed.init_process_group`` (``torchrun``) and after moving
        the distiller to its device, before creating the optimizer. The teacher is never wrapped
        (it is frozen). The CRCD heads, memories and NCE constants are broadcast from rank 0
        (a sharded memory bank keeps its own rows); their gradients are averaged by
        :meth:`sync_gradients`. A student that is already DDP-wrapped (e.g. by
        ``accelerator.prepare``) is kept as it is. No-op when not distributed.

        Args:
            device_ids: ``DistributedDataParallel``'s ``device_ids`` (``[local_rank]`` on GPUs,
                ``None`` on CPU).
            **ddp_kwargs: Passed to ``DistributedDataParallel`` (``find_unused_parameters``, ...).

        Returns:
            ``self``.

        Example:
            >>> distiller = CRCDDistiller(student, teacher, "fc", "fc").to(device)  # doctest: +SKIP
            >>> distiller.prepare_distributed(device_ids=[local_rank])              # doctest: +SKIP
        """
        if world_size() == 1:
            return self
        trainable = any(p.requires_grad for p in self.student.parameters())
        if trainable and not isinstance(self.student, nn.parallel.DistributedDataParallel):
            self.student = nn.parallel.DistributedDataParallel(
                self.student, device_ids=list(device_ids) if device_ids is not None else None, **ddp_kwargs
            )
        for loss in (self.crcd_feature, self.crcd_gradient):
            if loss is not None:
                broadcast_state(loss)
        return self

    def _unsynced_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters no DDP wrapper averages: the CRCD heads, and the student if unwrapped."""
        modules: List[Optional[nn.Module]] = [self.crcd_feature, self.crcd_gradient]
        if not isinstance(self.student, nn.parallel.DistributedDataParallel):
            modules.append(self.student)
        for module in modules:
            if module is not None:
                yield from (p for p in module.parameters() if p.requires_grad)

    def sync_gradients(self) -> None:
        """Average over ranks the gradients DDP does not: the CRCD heads' (and an unwrapped student's).

        Call after ``backward()`` and before ``optimizer.step()`` (with gradient accumulation, once
        before the step suffices; after every micro-batch gives the same result). One flat
        ``all_reduce`` per dtype; no-op when not distributed, so a loop can call it always.

        Example:
            >>> out = distiller(x, y, index)                                   # doctest: +SKIP
            >>> out["loss"].backward(); distiller.sync_gradients(); optimizer.step()  # doctest: +SKIP
        """
        average_gradients(self._unsynced_parameters())

    def no_sync(self) -> ContextManager[None]:
        """The student's ``DistributedDataParallel.no_sync()`` (a no-op context when not wrapped).

        For gradient accumulation: run the micro-batches but the last inside it, then call
        :meth:`sync_gradients` before the optimizer step. Memory and queue updates still gather
        every rank's rows on each micro-batch (they are forward-time collectives).
        """
        if isinstance(self.student, nn.parallel.DistributedDataParallel):
            return self.student.no_sync()
        return contextlib.nullcontext()

    def _logits(self, output: Any) -> torch.Tensor:
        if self.output_select is not None:
            return select_tensor(output, self.output_select)
        if isinstance(output, torch.Tensor):
            return output
        logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
        if not isinstance(logits, torch.Tensor):
            raise TypeError(
                f"model output is a {type(output).__name__} without a .logits tensor; "
                "pass output_select= (int index, str key/attribute or callable)"
            )
        return logits

    def _run(
        self, model: nn.Module, head: str, x: Any, role: str
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward ``model`` once; return (head input, head output, model logits)."""
        with FeatureCapture(model) as capture:
            capture.add(head, io="input", name="feature").add(head, io="output", name="head_logits")
            output = model(**x) if isinstance(x, Mapping) else model(x)
            captured = capture.pop()
        if len(captured) != 2:
            raise ValueError(f"the {role} head {head!r} did not run during the {role}'s forward")
        feature, head_logits, logits = captured["feature"], captured["head_logits"], self._logits(output)
        if self.feature_token is not None and head_logits.dim() == logits.dim() + 1:
            # The head saw every token ([B, T, D] -> [B, T, C]) and the model kept one per row.
            position = self.feature_token(unwrap_model(model), x)
            if isinstance(position, torch.Tensor):
                position = position.to(feature.device)
            rows = torch.arange(feature.shape[0], device=feature.device)
            feature, head_logits = feature[rows, position], head_logits[rows, position]
        return feature, head_logits, logits

    def _teacher_input(self, x: Any) -> Any:
        return x if self.teacher_transform is None else self.teacher_transform(x)

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, *] -> [B, D]`` for the CRCD loss."""
        if self.feature_pool is not None:
            x = pool_feature(x, self.feature_pool)
        return x.flatten(1) if x.dim() > 2 else x

    def set_progress(self, step: int) -> None:
        """Advance the distillation schedule to ``step`` (no-op without a schedule)."""
        if self.schedule is not None:
            self.schedule.set_progress(step)

    def _check_batch(self, x: torch.Tensor, target: torch.Tensor, index: Optional[torch.Tensor]) -> None:
        if not isinstance(target, torch.Tensor):
            raise TypeError(
                f"target must be a Tensor of class indices [B] or probabilities [B, C], got {type(target).__name__}"
            )
        if index is not None and not isinstance(index, torch.Tensor):
            raise TypeError(f"index must be None or a LongTensor of dataset indices [B], got {type(index).__name__}")
        if isinstance(x, Mapping):
            x = next((v for v in x.values() if isinstance(v, torch.Tensor)), None)
        batch = x.shape[0] if isinstance(x, torch.Tensor) else None
        if batch is not None and target.shape[0] != batch:
            raise ValueError(f"target has batch size {target.shape[0]} but input has {batch}")
        if index is None and self.crcd_kwargs.get("negatives") == "bank" and (self.beta or self.gradient_element):
            raise ValueError(
                "index (dataset indices of the batch, LongTensor [B]) is required with memory-bank negatives "
                "(num_samples was given); drop num_samples to use a queue instead"
            )

    def forward(
        self,
        input: Any,
        target: torch.Tensor,
        index: Optional[torch.Tensor] = None,
        *,
        student: Optional[nn.Module] = None,
    ) -> Dict[str, torch.Tensor]:
        """One distillation step's losses.

        Args:
            input: Model input batch ``[B, ...]``, or a dict of such tensors that both models take
                as keyword arguments (``input_ids``, ``attention_mask``, ``pixel_values``, ...).
            target: Class indices ``[B]`` (or probabilities ``[B, C]``).
            index: Dataset indices ``[B]`` of the samples; required for memory-bank negatives.
            student: A wrapper of ``self.student`` made after construction (DDP, accelerate,
                ``torch.compile``) to run the student's forward through, so that its gradient
                synchronisation applies; the default runs ``self.student``.

        Returns:
            ``loss`` (what to backpropagate), ``task_loss``, ``kd_loss``, ``crcd_feature_loss``,
            ``crcd_gradient_loss`` (all scalars; unused terms are zeros on the logits' device) and
            ``logits`` (student logits ``[B, C]``). Under ``torch.no_grad()`` the gradient element
            is skipped and ``crcd_gradient_loss`` is zero. Once the schedule's weight is 0 for
            good (:meth:`DistillSchedule.distills`), the teacher and all distillation terms are
            skipped: ``loss = gamma * task_loss`` and the other terms are zero.
        """
        self._check_batch(input, target, index)
        if student is None:
            student = self.student
        elif unwrap_model(student) is not unwrap_model(self.student):
            raise ValueError("student= must wrap the distiller's own student (e.g. its DDP wrapper)")
        f_s, head_logits_s, logits_s = self._run(student, self.student_head, input, "student")
        task_loss = F.cross_entropy(logits_s, target, label_smoothing=self.label_smoothing)
        terms = self.distill(f_s, head_logits_s, logits_s, input, target, index)
        loss = self.gamma * task_loss + terms["distill_loss"]
        return self._losses(
            loss, task_loss, terms["kd_loss"], terms["crcd_feature_loss"], terms["crcd_gradient_loss"], logits_s
        )

    def distill(
        self,
        student_feature: torch.Tensor,
        student_head_logits: torch.Tensor,
        student_logits: torch.Tensor,
        input: Any,
        target: torch.Tensor,
        index: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """The distillation terms of a student forward that has already run (for trainers that run it).

        Runs the teacher on ``input`` and returns KD and the CRCD terms against the student's
        captured tensors, weighted by ``w(t)``; :meth:`forward` is the student's forward, the task
        CE and this. Memories and the warm-up progress move as in :meth:`forward`.

        Args:
            student_feature: Input of the student's classifier head, ``[B, Ds]`` (or ``[B, *]``,
                reduced by ``feature_pool``); graph-connected, so that the CRCD terms train the student.
            student_head_logits: Output of the student's classifier head ``[B, C]`` (for the
                gradient element).
            student_logits: The student's logits ``[B, C]`` (for KD).
            input: The batch the student saw (the teacher sees ``teacher_transform(input)``).
            target: Class indices ``[B]`` (or probabilities ``[B, C]``).
            index: Dataset indices ``[B]``; required for memory-bank negatives.

        Returns:
            ``distill_loss`` (``w(t) * (alpha * KD + beta * CRCD_feature + gradient_weight *
            CRCD_gradient)``, to add to ``gamma * task_loss``), ``kd_loss``, ``crcd_feature_loss``
            and ``crcd_gradient_loss`` (scalars; terms that are off are zeros). Once the schedule's
            weight is 0 for good, the teacher is not run and all four are zero.
        """
        self._check_batch(input, target, index)
        zero = student_logits.new_zeros((), dtype=torch.float32)
        if self.built and self.schedule is not None and not self.schedule.distills():
            # w(t) = 0 from here on (the reference's last 4%): CE alone, as in the reference, but
            # without the teacher pass and CRCD terms it would multiply by zero. Memories stay as
            # they are: with w = 0 for the rest of training nothing reads them again.
            return self._terms(zero, zero, zero, zero)
        if self.teacher.training:
            self.teacher.eval()
        f_s, head_logits_s, logits_s = student_feature, student_head_logits, student_logits
        with torch.no_grad():
            f_t, head_logits_t, logits_t = self._run(
                self.teacher, self.teacher_head, self._teacher_input(input), "teacher"
            )
        if not self.built:
            _logger.warning(
                "CRCD heads were built on the first forward; create the optimizer after this call, "
                "or pass example_input= to CRCDDistiller"
            )
            self._build_losses(self._reduce(f_s).shape[1], self._reduce(f_t).shape[1], f_s.device)

        kd = kd_loss(logits_s, logits_t, self.kd_temperature) if self.alpha > 0 else zero
        relations = self._has_relations(logits_s.shape[0])
        # The gradient element runs first: bad values in the features also reach their gradients,
        # so it raises before either loss has written its memory, and a failed step moves no state.
        gradient_loss = zero
        if self.crcd_gradient is not None and relations:
            if head_logits_s.dim() != 2:
                raise ValueError(
                    f"the gradient element needs head logits shaped [B, C], got {tuple(head_logits_s.shape)}"
                )
            g_s = student_gradient_element(
                resolve_module(self.student, self.student_head), f_s, target,
                logits=head_logits_s, label_smoothing=self.label_smoothing,
            )
            if g_s is not None:
                g_t = teacher_gradient_element(
                    resolve_module(self.teacher, self.teacher_head), f_t, target,
                    logits=head_logits_t, label_smoothing=self.label_smoothing,
                )
                assert g_t is not None  # None only in inference mode, where g_s is None too
                gradient_loss = self.crcd_gradient(self._reduce(g_s), self._reduce(g_t), index)
        feature_loss = zero
        if self.crcd_feature is not None and relations:
            feature_loss = self.crcd_feature(self._reduce(f_s), self._reduce(f_t), index)

        weight = self._distill_weight()
        distill = self.alpha * kd + self.beta * feature_loss + self.gradient_weight * gradient_loss
        return self._terms(weight * distill, kd, feature_loss, gradient_loss)

    def _has_relations(self, batch: int) -> bool:
        """Relations need two samples; a batch of one (a ragged last batch) gets CE and KD only."""
        if batch >= 2:
            return True
        if not self._warned_batch_of_one:
            self._warned_batch_of_one = True
            _logger.warning("a batch of one sample has no relations: its CRCD terms are 0 and no memory moves")
        return False

    def _distill_weight(self) -> Union[float, torch.Tensor]:
        """``w(t)`` of the schedule times the warm-up ramp; advances the warm-up in training mode."""
        weight: Union[float, torch.Tensor] = self.schedule() if self.schedule is not None else 1.0
        if self.warmup_steps > 0:
            ramp = ((self.warmup_progress + 1).float() / self.warmup_steps).clamp(max=1.0)
            weight = weight * ramp
            if self.training:
                self.warmup_progress.add_(1)  # in place on the device: no host sync
        return weight

    @staticmethod
    def _terms(distill_loss, kd, feature_loss, gradient_loss) -> Dict[str, torch.Tensor]:
        return {
            "distill_loss": distill_loss,
            "kd_loss": kd,
            "crcd_feature_loss": feature_loss,
            "crcd_gradient_loss": gradient_loss,
        }

    @staticmethod
    def _losses(loss, task_loss, kd, feature_loss, gradient_loss, logits) -> Dict[str, torch.Tensor]:
        return {
            "loss": loss,
            "task_loss": task_loss,
            "kd_loss": kd,
            "crcd_feature_loss": feature_loss,
            "crcd_gradient_loss": gradient_loss,
            "logits": logits,
        }

    def extra_repr(self) -> str:
        return (
            f"student_head={self.student_head!r}, teacher_head={self.teacher_head!r}, gamma={self.gamma}, "
            f"alpha={self.alpha}, beta={self.beta}, gradient_element={self.gradient_element}, "
            f"gradient_weight={self.gradient_weight}, kd_temperature={self.kd_temperature}"
        )

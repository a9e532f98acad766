"""CRCDDistiller: the one object a plain training loop needs.

The distiller runs student and frozen teacher, captures the input of each classifier (the
penultimate feature) with hooks registered once, and returns CE + KD + CRCD (feature element,
optionally gradient element) as a dict of named loss components. Integrations (Hugging Face, timm,
Lightning) use only its contract: :attr:`CRCDDistiller.trainable_module`,
:meth:`~CRCDDistiller.prepare_distributed` / :meth:`~CRCDDistiller.release_distributed`,
:meth:`~CRCDDistiller.sync_gradients`, :meth:`~CRCDDistiller.crcd_state_dict` /
:meth:`~CRCDDistiller.load_crcd_state_dict`, :meth:`~CRCDDistiller.set_progress` and
:meth:`~CRCDDistiller.set_total_steps` (``crcd_plugin.contract``, docs/architecture.md). The
schedule is ``crcd_plugin.schedule``; ``DistillSchedule`` and ``CRCDTrainableModule`` are
re-exported here.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, Optional, Tuple, Union, cast

import torch
import torch.nn.functional as F
from torch import nn

from ._batches import check_batch, require_bank_index, to_device
from ._checks import check_choice, check_positive_int
from ._compat import LegacyClassifierNames, distiller_arguments
from ._head_watch import watch_heads
from .config import CRCDConfig
from .contract import _DDP, CRCDTrainableModule, DistillerContract
from .distributed import broadcast_state
from .functional import kd_loss
from .gradients import normalize_gradient_element, student_gradient_element, teacher_gradient_element
from .hooks import (
    FeatureCapture,
    PoolMode,
    Selector,
    TokenSelector,
    classifier_forward,
    reduce_feature,
    resolve_module,
    unwrap_model,
)
from .loss import CRCDLoss
from .monitor import ExplosionMonitor
from .schedule import DistillSchedule, warmup_ramp
from .teacher import Teacher, TeacherRows
from .teacher_cache import TeacherCache, as_teacher

_logger = logging.getLogger(__name__)

__all__ = ["DistillSchedule", "CRCDDistiller", "CRCDTrainableModule"]

_DEFAULT_CLASSIFIER = "fc"


class CRCDDistiller(DistillerContract, LegacyClassifierNames):
    """Student + frozen teacher + CRCD losses, for a plain training loop and for every integration.

    The distilled feature is the *input* of each classifier (``student_classifier`` /
    ``teacher_classifier``, dotted module paths), captured by hooks registered once, at
    construction, without editing the models. The total loss is (``config`` is a
    :class:`~crcd_plugin.config.CRCDConfig`)::

        loss = task_weight * CE + w(t) * (kd_weight * KD + feature_weight * CRCD_feature
                                          + gradient_weight * CRCD_gradient)

    Negatives (``config.relation``, :meth:`RelationConfig.resolved_negatives`): with
    ``num_samples`` (the dataset size) a per-sample memory bank (the reference; ``forward`` then
    needs the dataset ``index`` of each sample); with ``relation.queue_size`` a FIFO queue; with
    neither, the other samples of the batch (no index, no state). The gradient element has its own
    :class:`~crcd_plugin.loss.CRCDLoss` (own heads and memory), configured by
    ``config.gradient_relation`` (default: the same options).

    ``w(t)`` is ``config.schedule`` over ``total_steps`` (the run length, in the unit of
    :meth:`set_progress`: epochs or optimizer steps), times the warm-up ramp. A batch of one has no
    relations: its CRCD terms are 0 (logged once) and no state moves.

    The teacher side is a :class:`~crcd_plugin.teacher.Teacher` (:attr:`teacher_side`), asked for
    each step's rows: a frozen model run under no grad in eval mode after ``teacher_transform``
    (:class:`~crcd_plugin.LiveTeacher`), or rows read by ``index`` (then required) from a
    :class:`~crcd_plugin.TeacherCache` or :class:`~crcd_plugin.TensorTeacher` (docs/teacher-cache.md).
    Integrations use the contract (:class:`~crcd_plugin.contract.DistillerContract`). Export the
    student with :meth:`student_state_dict`; :meth:`crcd_state_dict` is the CRCD state to resume.

    Dimensions come from ``nn.Linear`` classifiers (``in_features``), else from a dry run on
    ``example_input``, else from the first ``forward``; in the last case create the optimizer
    *after* that first call, since the CRCD heads have parameters too.

    Args:
        student: Student model, ``student(x)`` returns logits (or see ``output_select``).
        teacher: Trained teacher model, a :class:`~crcd_plugin.TeacherCache` built from it, or a
            :class:`~crcd_plugin.teacher.Teacher` (e.g. a :class:`~crcd_plugin.TensorTeacher`).
        student_classifier: Dotted path of the student's classifier module.
        teacher_classifier: Dotted path of the teacher's classifier module; default ``"fc"``, or
            with a cache the cache's classifier (a different path is an error).
        config: Loss weights, schedule and relation options; ``None``: ``CRCDConfig()``.
        num_samples: Dataset size; selects memory-bank negatives (``forward`` needs ``index``).
        total_steps: Run length for ``config.schedule`` (``"step"``/``"linear"``); may also be set
            later with :meth:`set_total_steps`.
        schedule: A ready :class:`DistillSchedule` (stateful) instead of ``config.schedule``.
        feature_pool: How to reduce a captured classifier input that is not ``[B, D]`` (see
            :func:`~crcd_plugin.hooks.pool_feature`); ``None`` flattens it.
        output_select: How to get logits from the models' outputs when they are not tensors
            (int index, str key/attribute, or callable); ``None`` accepts a tensor or ``.logits``.
        feature_token: For classifiers applied to every token (output ``[B, T, C]`` while the
            model's logits are ``[B, C]``, as in decoder-only ``*ForSequenceClassification``
            models): ``feature_token(model, input)`` gives the position (``[B]`` LongTensor, or one
            int) of the token the model classifies. ``model`` is the unwrapped model.
        example_input: Optional batch for a dry run (eval mode, no grad) that fixes dimensions.
        teacher_transform: Optional map from the student's input batch to the teacher's, applied
            (under no grad) before every teacher forward (steps, dry run and :meth:`fill_memory`).
            An ``nn.Module`` is registered, so it moves with ``.to()``. Not with a cache (pass it
            to :meth:`TeacherCache.build`).
        **legacy: 0.2.0 keywords (``student_head``, ``gamma``, ``crcd_options``, ...), mapped onto
            ``config`` with a ``DeprecationWarning`` naming the new spelling (``crcd_plugin._compat``).

    Example:
        >>> from crcd_plugin import CRCDConfig
        >>> student = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> teacher = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
        >>> distiller = CRCDDistiller(student, teacher, "2", "2", CRCDConfig(gradient_element=True))
        >>> out = distiller(torch.randn(8, 10), torch.randint(0, 3, (8,)))
        >>> sorted(out)
        ['crcd_feature_loss', 'crcd_gradient_loss', 'kd_loss', 'logits', 'loss', 'task_loss']
        >>> out["loss"].backward()
    """

    teacher: nn.Module
    teacher_side: Teacher
    _student_head: nn.Module

    def __init__(
        self,
        student: nn.Module,
        teacher: Union[nn.Module, TeacherCache],
        student_classifier: str = "fc",
        teacher_classifier: Optional[str] = None,
        config: Optional[CRCDConfig] = None,
        *,
        num_samples: Optional[int] = None,
        total_steps: Optional[int] = None,
        schedule: Optional[DistillSchedule] = None,
        feature_pool: Optional[PoolMode] = None,
        output_select: Optional[Selector] = None,
        feature_token: Optional[TokenSelector] = None,
        example_input: Optional[Any] = None,
        teacher_transform: Optional[Callable[[Any], Any]] = None,
        **legacy: Any,
    ) -> None:
        super().__init__()
        student_classifier, teacher_classifier, config, options_num_samples = distiller_arguments(
            student_classifier, teacher_classifier, config, schedule, legacy)  # the 0.2.0 spellings
        num_samples = options_num_samples if num_samples is None else num_samples
        _check_arguments(student, teacher, num_samples, total_steps, schedule, feature_pool,
                              teacher_transform, feature_token)
        relation = config.relation
        if relation.resolved_negatives(num_samples) == "bank" and num_samples is None:
            raise ValueError("negatives='bank' needs the dataset size: pass num_samples= to the distiller")
        side = as_teacher(teacher, teacher_classifier, config, num_samples, feature_pool=feature_pool,
                          output_select=output_select, feature_token=feature_token, transform=teacher_transform)

        self.config = config
        self.num_samples = num_samples
        self.student = student
        # The side the distiller asks; its module (the model of a live teacher) is ``teacher``.
        self.__dict__["teacher_side"] = side
        self.teacher = side.module
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.student_classifier = student_classifier
        self.teacher_classifier = side.classifier_path
        # Resolved once: a wrong path fails here, and no step looks a module up again.
        self.__dict__["_student_head"] = resolve_module(student, student_classifier)  # a part of the student
        # Hooks registered once, for the distiller's life; armed only inside its own forwards.
        self._capture = (FeatureCapture(student, armed=False).add(student_classifier, io="input", name="feature")
                         .add(student_classifier, io="output", name="head_logits"))
        self.feature_pool = feature_pool
        self.output_select = output_select
        self.feature_token = feature_token
        self.teacher_transform = teacher_transform
        self.schedule = schedule
        if schedule is None and total_steps is not None:
            self.set_total_steps(total_steps)
        # Training-mode forward calls so far, for the warm-up; a buffer so that it resumes exactly.
        self.register_buffer("warmup_progress", torch.zeros((), dtype=torch.long))
        self._warned_batch_of_one = False
        # Warns once when a term or the student feature's gradient explodes (no per-step sync).
        self.monitor = ExplosionMonitor()
        self.crcd_feature = None
        self.crcd_gradient = None

        head = self._student_head
        student_dim = head.in_features if type(head) is nn.Linear and feature_pool != "flatten" else None
        if example_input is not None:
            self.build(example_input)
        elif student_dim is not None and side.feature_dim is not None:
            self._build_losses(student_dim, side.feature_dim)

    # ------------------------------------------------------------------ building
    @property
    def built(self) -> bool:
        """Whether the CRCD losses (and so all trainable parameters) exist yet."""
        if not (self.config.feature_weight or self.config.gradient_element):
            return True  # nothing to build: CE and KD only
        return self.crcd_feature is not None or self.crcd_gradient is not None

    def _build_losses(self, student_dim: int, teacher_dim: int, device: Optional[torch.device] = None) -> None:
        """The one place the distiller makes a :class:`CRCDLoss`; ``RelationConfig`` resolves every default."""
        config = self.config
        relations = {"crcd_feature": config.relation if config.feature_weight > 0 else None,
                     "crcd_gradient": config.gradient_relation_config() if config.gradient_element else None}
        # Parameters created inside inference_mode would be unusable for training later.
        with torch.inference_mode(False):
            for name, relation in relations.items():
                if relation is not None:
                    loss = CRCDLoss(student_dim, teacher_dim, relation, num_samples=self.num_samples).to(device)
                    loss.train(self.training)
                    # Built from each rank's own random state; DDP does not see them, so rank 0's wins.
                    broadcast_state(loss)
                    setattr(self, name, loss)
        self._refresh_trainables()
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
                f_s, _, _ = self._run_student(self.student, example_input)
                side = self.teacher_side
                # Rows read by index are [N, D] already (no index here); a live teacher runs.
                teacher_dim = (cast(int, side.feature_dim) if side.needs_index
                               else side.rows(example_input, None, gradient=False).reduced.shape[1])
        finally:
            self.student.train(was_training)
        self._build_losses(self._reduce(f_s).shape[1], teacher_dim, f_s.device)
        return self

    def _ensure_built(self, feature: torch.Tensor, teacher: TeacherRows) -> None:
        if not self.built:
            self._build_losses(feature.shape[1], teacher.reduced.shape[1], feature.device)

    # ------------------------------------------------------------------ features
    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "teacher_transform" and "teacher_side" in self.__dict__:
            self.teacher_side.set_transform(value)  # the teacher applies it

    def _run_student(self, model: nn.Module, x: Any) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward the student once; return (classifier input, classifier output, model logits)."""
        return classifier_forward(self._capture, model, x, role="student", path=self.student_classifier,
                                  output_select=self.output_select, feature_token=self.feature_token)

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, *] -> [B, D]`` for the CRCD loss, as the teacher side reduces its rows."""
        return reduce_feature(x, self.feature_pool)

    def _gradient_elements(
        self, f_s: torch.Tensor, head_s: torch.Tensor, teacher: TeacherRows, target: torch.Tensor, detached: bool,
    ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """Both sides' CE gradients w.r.t. the features, ``[B, D]`` each (``None`` in inference mode).

        ``detached`` computes the student's like the teacher's (values only, for :meth:`fill_memory`).
        """
        smoothing = self.config.label_smoothing
        student_element = teacher_gradient_element if detached else student_gradient_element
        g_s = student_element(self._student_head, f_s, target, logits=head_s, label_smoothing=smoothing)
        if g_s is None:
            return None
        g_t = self.teacher_side.gradient_element(teacher, target, smoothing)
        if g_t is None:
            return None
        # Rescaled before the embedding heads: a confident teacher's rows are otherwise all ~0.
        mode = self.config.gradient_normalization
        return normalize_gradient_element(self._reduce(g_s), mode), normalize_gradient_element(g_t, mode)

    @torch.no_grad()
    def fill_memory(
        self, loader: Optional[Iterable[Any]] = None, device: Optional[torch.device] = None, *, batch_size: int = 1024,
    ) -> "CRCDDistiller":
        """Warm-up pass: write every sample's embeddings into the CRCD memories before training.

        Runs student and teacher side as a step does (eval mode, no grad) over ``loader`` and hands
        each batch to :meth:`CRCDLoss.fill_memory`, so the bank holds real rows from the first
        step (the gradient element's memory gets detached gradients). Modes are restored; models,
        heads and the NCE constant are not changed. Without a ``loader``, a teacher with stored
        rows (a cache) writes every row, ``batch_size`` at a time, into the teacher-side memories
        (``memory_teacher``) without running the student; the CRCD losses must exist then. Under
        ``torch.distributed`` every rank calls it; each writes a share and the memories gather.

        Args:
            loader: Iterable of ``(input, target, index)`` batches (``(input, target)`` for a
                queue), like the arguments of :meth:`forward`; ``input`` may be a dict of tensors.
                ``None`` (a cache only): the teacher-side memories from the cache.
            device: Where to move each batch; default: the student's device.
            batch_size: Rows per write when filling from the cache alone.

        Returns:
            ``self``.

        Example:
            >>> distiller = distiller.fill_memory(train_loader)  # doctest: +SKIP
            >>> distiller = distiller.fill_memory()              # with a TeacherCache  # doctest: +SKIP
        """
        if device is None:
            device = next(iter(unwrap_model(self.student).parameters()), torch.zeros(())).device
        was_training = self.training
        self.eval()
        try:
            if loader is None:
                self._fill_teacher_memory(batch_size)
            for batch in loader if loader is not None else ():
                if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
                    raise TypeError("fill_memory needs batches of (input, target, index) or (input, target)")
                x, target, index = to_device(tuple(batch) if len(batch) == 3 else (*batch, None), device)
                self._check_batch(x, target, index)
                f_s, head_s, _ = self._run_student(self.student, x)
                teacher = self.teacher_side.rows(x, index, gradient=self.config.gradient_element)
                feature = self._reduce(f_s)
                self._ensure_built(feature, teacher)
                gradients = None
                if self.crcd_gradient is not None:  # first: a failure here leaves every memory as it was
                    gradients = self._gradient_elements(f_s, head_s, teacher, target, detached=True)
                    if gradients is None:  # a non-linear classifier: autograd cannot run
                        raise RuntimeError(
                            "fill_memory cannot compute the gradient element of a non-linear classifier "
                            "inside torch.inference_mode(); call it outside inference mode"
                        )
                if self.crcd_feature is not None:
                    self.crcd_feature.fill_memory(feature, teacher.reduced, index)
                if self.crcd_gradient is not None and gradients is not None:
                    self.crcd_gradient.fill_memory(*gradients, index)
        finally:
            self.train(was_training)
        return self

    def _fill_teacher_memory(self, batch_size: int) -> None:
        """The teacher-side memories from every stored row (see :meth:`fill_memory`)."""
        if not self.built:
            raise ValueError("fill_memory() from stored teacher rows needs the CRCD losses built: give the student an "
                             "nn.Linear classifier or pass example_input= to the distiller")
        losses = [loss for loss in (self.crcd_feature, self.crcd_gradient) if loss is not None]
        if not all(loss.memory_teacher.stores_rows for loss in losses):
            raise ValueError("fill_memory() from stored rows fills a memory bank or queue; in-batch negatives "
                             "keep none")
        side, gradient = self.teacher_side, self.crcd_gradient is not None
        for index, targets, teacher in side.all_rows(batch_size, gradient=gradient):
            targets = targets.to(self.warmup_progress.device)
            if self.crcd_gradient is not None:
                g_t = side.gradient_element(teacher, targets, self.config.label_smoothing)
                assert g_t is not None  # the linear closed form and stored elements need no autograd
                g_t = normalize_gradient_element(g_t, self.config.gradient_normalization)
                self.crcd_gradient.fill_memory(None, g_t, index.to(g_t.device))
            if self.crcd_feature is not None:
                self.crcd_feature.fill_memory(None, teacher.reduced, index.to(teacher.reduced.device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Before any child loads: a checkpoint of another cache's teacher is refused whole.
        self.teacher_side.claim_state(state_dict, prefix + "teacher.")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def train(self, mode: bool = True) -> "CRCDDistiller":
        """Set train/eval mode on everything except the teacher, which stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def remove_hooks(self) -> None:
        """Remove the feature hooks from both models (the distiller cannot run afterwards)."""
        self._capture.remove()
        self.teacher_side.remove_hooks()

    # ------------------------------------------------------------------ the step
    def _check_batch(self, x: Any, target: torch.Tensor, index: Optional[torch.Tensor]) -> None:
        config = self.config
        check_batch(x, target, index)  # types and batch sizes
        # The teacher's own checks (index range, stored targets), on the host, before the student runs.
        self.teacher_side.check_batch(index, target, gradient=config.gradient_element)
        bank = config.relation.resolved_negatives(self.num_samples) == "bank"
        require_bank_index(index, bank and bool(config.feature_weight or config.gradient_element))

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
            skipped: ``loss = task_weight * task_loss`` and the other terms are zero.
        """
        self._check_batch(input, target, index)
        if student is None:
            student = self.student
        elif unwrap_model(student) is not unwrap_model(self.student):
            raise ValueError("student= must wrap the distiller's own student (e.g. its DDP wrapper)")
        self._check_no_crcd_state_in(student)
        config = self.config
        if self.training and self.schedule is None and config.schedule != "constant":
            raise ValueError(
                f"config.schedule={config.schedule!r} needs the run length: pass total_steps= to the distiller "
                "or call set_total_steps() before training"
            )
        self._student_synced_by_ddp = isinstance(student, _DDP)
        f_s, head_logits_s, logits_s = self._run_student(student, input)
        task_loss = F.cross_entropy(logits_s, target, label_smoothing=config.label_smoothing)
        terms = self._distill_terms(f_s, head_logits_s, logits_s, input, target, index)
        loss = config.task_weight * task_loss + terms["distill_loss"]
        return _losses(loss, task_loss, terms["kd_loss"], terms["crcd_feature_loss"], terms["crcd_gradient_loss"],
                       logits_s)

    def distill(
        self,
        student_feature: torch.Tensor,
        student_head_logits: torch.Tensor,
        student_logits: torch.Tensor,
        input: Any,
        target: torch.Tensor,
        index: Optional[torch.Tensor] = None,
        *,
        student_synced: bool = False,
    ) -> Dict[str, torch.Tensor]:
        """The distillation terms of a student forward that has already run (for trainers that run it).

        Runs the teacher on ``input`` and returns KD and the CRCD terms against the student's
        captured tensors, weighted by ``w(t)``; :meth:`forward` is the student's forward, the task
        CE and this. Memories and the warm-up progress move as in :meth:`forward`.

        Args:
            student_feature: Input of the student's classifier ``[B, Ds]`` (or ``[B, *]``, reduced
                by ``feature_pool``); graph-connected, so that the CRCD terms train the student.
            student_head_logits: Output of the student's classifier ``[B, C]`` (gradient element).
            student_logits: The student's logits ``[B, C]`` (for KD).
            input: The batch the student saw (the teacher sees ``teacher_transform(input)``).
            target: Class indices ``[B]`` (or probabilities ``[B, C]``).
            index: Dataset indices ``[B]``; required for memory-bank negatives.
            student_synced: The trainer's own DDP averages the student's gradients, so
                :meth:`sync_gradients` leaves them alone (e.g. Lightning's strategy).

        Returns:
            ``distill_loss`` (``w(t) * (kd_weight * KD + feature_weight * CRCD_feature +
            gradient_weight * CRCD_gradient)``, to add to ``task_weight * task_loss``),
            ``kd_loss``, ``crcd_feature_loss`` and ``crcd_gradient_loss`` (scalars; terms that are
            off are zeros). Once the schedule's weight is 0 for good, the teacher is not run and
            all four are zero.
        """
        self._check_batch(input, target, index)
        self._student_synced_by_ddp = student_synced
        return self._distill_terms(student_feature, student_head_logits, student_logits, input, target, index)

    def _distill_terms(
        self,
        f_s: torch.Tensor,
        head_logits_s: torch.Tensor,
        logits_s: torch.Tensor,
        input: Any,
        target: torch.Tensor,
        index: Optional[torch.Tensor],
    ) -> Dict[str, torch.Tensor]:
        """:meth:`distill` on a batch already checked (``forward`` checks it before the student runs)."""
        config = self.config
        zero = logits_s.new_zeros((), dtype=torch.float32)
        if self.built and self.schedule is not None and not self.schedule.distills():
            # w(t) = 0 from here on (the reference's last 4%): CE alone, as in the reference, but
            # without the teacher pass and CRCD terms it would multiply by zero. Memories stay as
            # they are: with w = 0 for the rest of training nothing reads them again.
            return _terms(zero, zero, zero, zero)
        teacher = self.teacher_side.rows(input, index, gradient=self.config.gradient_element)
        feature = self._reduce(f_s)  # [B, D], as the teacher side reduces its rows
        if not self.built:
            _logger.warning(
                "CRCD heads were built on the first forward; create the optimizer after this call, "
                "or pass example_input= to CRCDDistiller"
            )
            self._ensure_built(feature, teacher)

        kd = zero
        if config.kd_weight > 0:
            kd = kd_loss(logits_s, teacher.logits, config.kd_temperature, config.kd_standardize)
        relations = self._has_relations(logits_s.shape[0])
        # The gradient element runs first: bad values in the features also reach their gradients,
        # so it raises before either loss has written its memory, and a failed step moves no state.
        gradient_loss = zero
        if self.crcd_gradient is not None and relations:
            if head_logits_s.dim() != 2:
                raise ValueError(
                    f"the gradient element needs classifier logits shaped [B, C], got {tuple(head_logits_s.shape)}"
                )
            gradients = self._gradient_elements(f_s, head_logits_s, teacher, target, detached=False)
            if gradients is not None:
                gradient_loss = self.crcd_gradient(*gradients, index)
        feature_loss = zero
        if self.crcd_feature is not None and relations:
            feature_loss = self.crcd_feature(feature, teacher.reduced, index)

        weight = self._distill_weight()
        distill = config.kd_weight * kd + config.feature_weight * feature_loss + config.gradient_weight * gradient_loss
        if self.training and torch.is_grad_enabled():
            self._observe(f_s, kd, feature_loss, gradient_loss)
            watch_heads(self)  # warns once if the optimizer misses the CRCD heads
        return _terms(weight * distill, kd, feature_loss, gradient_loss)

    def _observe(self, feature: torch.Tensor, kd, feature_loss, gradient_loss) -> None:
        """Hand the step's active terms, and the student feature's gradient norm, to the monitor."""
        active = {
            "kd_loss": (kd, self.config.kd_weight > 0),
            "crcd_feature_loss": (feature_loss, self.crcd_feature is not None),
            "crcd_gradient_loss": (gradient_loss, self.crcd_gradient is not None),
        }
        self.monitor.observe({name: value for name, (value, on) in active.items() if on})
        if feature.requires_grad:
            feature.register_hook(lambda grad: self.monitor.observe_gradient("student_feature_grad_norm", grad))

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
        return warmup_ramp(weight, self.warmup_progress, self.config.warmup_steps, advance=self.training)

    def extra_repr(self) -> str:
        return f"student_classifier={self.student_classifier!r}, teacher_classifier={self.teacher_classifier!r}"


def _check_arguments(student, teacher, num_samples, total_steps, schedule, feature_pool, teacher_transform,
                     feature_token) -> None:
    """``CRCDDistiller``'s arguments, checked before anything is built."""
    if not isinstance(student, nn.Module):
        raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
    if not isinstance(teacher, (nn.Module, TeacherCache)):
        raise TypeError(f"teacher must be an nn.Module, a TeacherCache or a Teacher, got {type(teacher).__name__}")
    if isinstance(teacher, nn.Module) and unwrap_model(student) is unwrap_model(teacher):
        raise ValueError("student and teacher must be different modules")
    if isinstance(teacher, _DDP):
        raise ValueError(
            "teacher is wrapped in DistributedDataParallel; pass the frozen teacher itself "
            "(it never trains, so it needs no gradient sync; wrap only the student)"
        )
    if num_samples is not None:
        check_positive_int("num_samples", num_samples)
    if total_steps is not None:
        check_positive_int("total_steps", total_steps)
    if schedule is not None and not isinstance(schedule, DistillSchedule):
        raise TypeError(f"schedule must be a DistillSchedule or None, got {type(schedule).__name__}")
    if feature_pool is not None:
        check_choice("feature_pool", feature_pool, ("avg", "max", "flatten", "mean_tokens", "cls"))
    if teacher_transform is not None and not callable(teacher_transform):
        raise TypeError(
            f"teacher_transform must be None or a callable input -> input, got {type(teacher_transform).__name__}"
        )
    if feature_token is not None and not callable(feature_token):
        raise TypeError(f"feature_token must be a callable (model, input) -> positions, got {feature_token!r}")


def _terms(distill_loss, kd, feature_loss, gradient_loss) -> Dict[str, torch.Tensor]:
    return {
        "distill_loss": distill_loss,
        "kd_loss": kd,
        "crcd_feature_loss": feature_loss,
        "crcd_gradient_loss": gradient_loss,
    }


def _losses(loss, task_loss, kd, feature_loss, gradient_loss, logits) -> Dict[str, torch.Tensor]:
    return {
        "loss": loss,
        "task_loss": task_loss,
        "kd_loss": kd,
        "crcd_feature_loss": feature_loss,
        "crcd_gradient_loss": gradient_loss,
        "logits": logits,
    }

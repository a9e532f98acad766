"""timm integration: CRCD as a ``timm.task.TrainingTask``, next to timm's own distillation tasks.

The task translates timm's conventions (model names, ``DistillationTeacher``, ``pretrained_cfg``
normalisation, ``get_classifier()``, task state, DDP and compile hooks) into one
:class:`~crcd_plugin.distiller.CRCDDistiller`; the relation losses, memories and gradient element
are the library's. Import it explicitly: ``import crcd_plugin`` never imports timm.
"""

from __future__ import annotations

import logging
import types
import warnings
from typing import Any, Callable, ContextManager, Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from crcd_plugin._compat import config_from_legacy, deprecated
from crcd_plugin.config import CRCDConfig
from crcd_plugin.distiller import CRCDDistiller, CRCDTrainableModule
from crcd_plugin.fsdp import check_fsdp_integration
from crcd_plugin.hooks import unwrap_model
from crcd_plugin.integrations import require
from crcd_plugin.integrations._timm_models import (
    TeacherSpec,
    TimmTrainableModule,
    classifier_path,
    dry_run_input,
    resolve_teacher,
    teacher_transform,
)

require("timm", "timm")

from timm.task import TrainingTask, resolve_classification_loss  # noqa: E402
from timm.utils import unwrap_model as timm_unwrap_model  # noqa: E402 - also unwraps ModelEma

_logger = logging.getLogger(__name__)

__all__ = ["CRCDDistillationTask", "CRCDTrainableModule"]



# timm's weight names, documented aliases of CRCDConfig's fields (same defaults: those of CRCDConfig).
WEIGHT_ALIASES = {"task_loss_weight": "task_weight", "kd_loss_weight": "kd_weight",
                  "crcd_loss_weight": "feature_weight", "gradient_loss_weight": "gradient_weight"}


class CRCDDistillationTask(TrainingTask):
    """Complementary Relation Contrastive Distillation as a timm training task.

    The counterpart of timm's ``FeatureDistillationTask``: same constructor shape (student,
    teacher as a timm name, ``nn.Module`` or ``DistillationTeacher``, ``criterion`` /
    ``criterion_kwargs``, ``device``, ``dtype``, ``verbose``), same ``forward(input, target)``
    returning a dict of named loss components, teacher kept frozen and out of DDP. The loss is::

        loss = task_loss_weight * criterion(logits, target)
               + w(t) * (kd_loss_weight * KD + crcd_loss_weight * CRCD_feature
                         + gradient_loss_weight * CRCD_gradient)

    The features are the inputs of ``get_classifier()`` (pre-logits, CNNs and ViTs alike). When the
    models' ``pretrained_cfg`` normalisations differ, the teacher sees the input re-normalised, as in
    timm's tasks. The rest is ``config`` (a :class:`crcd_plugin.CRCDConfig`, the same defaults as
    everywhere) and the distiller's integration contract (DDP, gradient sync, state).

    Args:
        student_model: The student: a timm classifier, or any ``nn.Module`` with ``student_classifier``.
        teacher_model: A timm model name, an ``nn.Module`` or a ``timm.task.DistillationTeacher``.
        criterion: The task loss; default timm's ``create_classification_loss(**criterion_kwargs)``.
        criterion_kwargs: Arguments of ``create_classification_loss`` when ``criterion`` is ``None``.
        teacher_pretrained: For a teacher name: timm's pretrained weights (downloads; default ``False``).
        teacher_pretrained_path: For a teacher name: a local checkpoint (no network).
        teacher_pretrained_cfg_overlay: For a teacher name: ``pretrained_cfg`` overrides.
        teacher_kwargs: For a teacher name: more ``timm.create_model`` arguments.
        config: Weights (``task_weight`` weighs ``criterion``), schedule and relation options.
        task_loss_weight: timm's name for ``config.task_weight`` (overrides it when given).
        kd_loss_weight: timm's name for ``config.kd_weight``.
        crcd_loss_weight: timm's name for ``config.feature_weight``.
        gradient_loss_weight: timm's name for ``config.gradient_weight``.
        num_samples: Dataset size: memory-bank negatives (``forward`` then needs ``index``).
        total_steps: Run length of ``config.schedule``, in the unit of :meth:`set_progress`.
        student_classifier: Dotted path of the student's classifier; default ``get_classifier()``'s.
        teacher_classifier: The same for the teacher.
        normalize_teacher_input: Re-normalise the teacher's input when normalisations differ.
        example_input: A batch for a dry run, needed only when a classifier is not an ``nn.Linear``.
        device: Device of the task's tensors; default the student's.
        dtype: Dtype of the task's tensors (and of a teacher created from a name).
        verbose: Log the configuration.
        **legacy: 0.2.0 keywords (``kd_temperature``, ``gradient_element``, ``queue_size``,
            ``crcd_options``, ``schedule``, ``student_head``, ``teacher_head``), with a ``DeprecationWarning``.

    Example:
        >>> import timm
        >>> from crcd_plugin import CRCDConfig, RelationConfig
        >>> student = timm.create_model("test_efficientnet", num_classes=10)
        >>> config = CRCDConfig(relation=RelationConfig(queue_size=64))
        >>> task = CRCDDistillationTask(student, "test_resnet", config=config, verbose=False)
        >>> out = task(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
        >>> sorted(out)
        ['crcd_feature_loss', 'crcd_gradient_loss', 'kd_loss', 'loss', 'output', 'task_loss']
        >>> optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.01)
        >>> out["loss"].backward(); optimizer.step()
    """

    def __init__(
        self,
        student_model: nn.Module,
        teacher_model: TeacherSpec,
        criterion: Optional[Union[nn.Module, Callable]] = None,
        criterion_kwargs: Optional[Dict[str, Any]] = None,
        teacher_pretrained: bool = False,
        teacher_pretrained_path: Optional[str] = None,
        teacher_pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
        teacher_kwargs: Optional[Dict[str, Any]] = None,
        config: Optional[CRCDConfig] = None,
        *,
        task_loss_weight: Optional[float] = None,
        kd_loss_weight: Optional[float] = None,
        crcd_loss_weight: Optional[float] = None,
        gradient_loss_weight: Optional[float] = None,
        num_samples: Optional[int] = None,
        total_steps: Optional[int] = None,
        student_classifier: Optional[str] = None,
        teacher_classifier: Optional[str] = None,
        normalize_teacher_input: bool = True,
        example_input: Optional[torch.Tensor] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        verbose: bool = True,
        **legacy: Any,
    ) -> None:
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        if device is None and isinstance(student_model, nn.Module):
            # Where the student already is (timm creates models on their device first), not the CPU.
            student_param = next(student_model.parameters(), None)
            self.device = student_param.device if student_param is not None else self.device
        if isinstance(student_model, str):
            raise TypeError(
                f"student_model must be an nn.Module, got the str {student_model!r}; "
                "create it first with timm.create_model(...)"
            )
        if not isinstance(student_model, nn.Module):
            raise TypeError(f"student_model must be an nn.Module, got {type(student_model).__name__}")
        for old, new in (("student_head", "student_classifier="), ("teacher_head", "teacher_classifier="),
                         ("schedule", "config=CRCDConfig(schedule=kind, ...) with total_steps=")):
            if old in legacy:
                deprecated(f"CRCDDistillationTask({old}=...)", new, stacklevel=3)
        student_classifier = legacy.pop("student_head", student_classifier)
        teacher_classifier = legacy.pop("teacher_head", teacher_classifier)
        schedule = legacy.pop("schedule", None)
        config, options_num_samples = config_from_legacy(config, legacy, owner="CRCDDistillationTask")
        aliases = dict(task_loss_weight=task_loss_weight, kd_loss_weight=kd_loss_weight,
                       crcd_loss_weight=crcd_loss_weight, gradient_loss_weight=gradient_loss_weight)
        config = config.replace(**{WEIGHT_ALIASES[k]: v for k, v in aliases.items() if v is not None})
        student_classifier = student_classifier or classifier_path(student_model, "student")
        teacher = resolve_teacher(teacher_model, student_model, pretrained=teacher_pretrained,
                                  pretrained_path=teacher_pretrained_path, model_kwargs=teacher_kwargs,
                                  pretrained_cfg_overlay=teacher_pretrained_cfg_overlay, device=self.device,
                                  dtype=dtype)
        teacher_classifier = teacher_classifier or classifier_path(teacher.model, "teacher")
        student_classes = getattr(unwrap_model(student_model), "num_classes", None)
        teacher_classes = getattr(unwrap_model(teacher.model), "num_classes", None)
        if student_classes is not None and teacher_classes is not None and student_classes != teacher_classes:
            raise ValueError(
                f"teacher_model has {teacher_classes} classes but student_model has {student_classes}; "
                "KD and the gradient element compare the same classes"
            )
        teacher.requires_grad_(False)
        self.teacher = teacher
        self.criterion = resolve_classification_loss(criterion, self.device, criterion_kwargs=criterion_kwargs)
        self.task_loss_weight = config.task_weight
        transform = teacher_transform(student_model, teacher, self.device, self.dtype) if normalize_teacher_input \
            else None
        with warnings.catch_warnings():  # the task's own legacy keywords warned above, under its name
            warnings.simplefilter("ignore", DeprecationWarning)
            self.distiller = CRCDDistiller(  # task_weight 0: the task criterion is timm's, added in forward
                student_model, teacher.model, student_classifier, teacher_classifier, config.replace(task_weight=0.0),
                num_samples=num_samples if num_samples is not None else options_num_samples, total_steps=total_steps,
                schedule=schedule, example_input=example_input, teacher_transform=transform,
            )
        self.config = config
        if not self.distiller.built:
            self.distiller.build(dry_run_input(student_model, self.device, self.dtype))
        self.trainable_module = TimmTrainableModule(self.distiller)
        for module in self.trainable_module.crcd_children().values():
            module.to(self.device)  # built on the CPU
        if self.verbose:
            _logger.info("CRCDDistillationTask: classifiers %r, %r; teacher input re-normalised: %s; %r",
                         student_classifier, teacher_classifier, transform is not None, config)

    @property
    def student(self) -> nn.Module:
        """The student model, without DDP or compile wrappers."""
        return unwrap_model(self.distiller.student)

    def train(self, mode: bool = True) -> "CRCDDistillationTask":
        """Set training mode while keeping the teacher in evaluation mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def set_progress(self, step: int) -> None:
        """Advance the distillation schedule to ``step`` (epoch or update, as ``schedule`` counts)."""
        self.distiller.set_progress(step)

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, index: Optional[torch.Tensor] = None
    ) -> Dict[str, torch.Tensor]:
        """One step's losses: ``loss``, ``output`` (student logits ``[B, C]``), ``task_loss``, ``kd_loss``,
        ``crcd_feature_loss``, ``crcd_gradient_loss``. ``input`` is ``[B, C, H, W]`` normalised for the
        student, ``target`` ``[B]`` or soft ``[B, C]`` (mixup), ``index`` ``[B]`` for a memory bank."""
        out = self.distiller(input, target, index)
        task_loss = self.criterion(out["logits"], target)
        parts = {name: out[name] for name in ("kd_loss", "crcd_feature_loss", "crcd_gradient_loss")}
        return {"loss": self.task_loss_weight * task_loss + out["loss"], "output": out["logits"],
                "task_loss": task_loss, **parts}

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs: Any) -> "CRCDDistillationTask":
        """Wrap the student alone in DDP; average the CRCD heads' gradients at the end of each backward.

        The distiller's contract: :meth:`CRCDDistiller.prepare_distributed`, then
        :meth:`CRCDDistiller.sync_gradients_in_backward` (timm's loop never calls a sync itself).
        No-op when not distributed; returns ``self``.
        """
        check_fsdp_integration("timm", self.distiller.student)
        self.teacher.requires_grad_(False)
        self.distiller.prepare_distributed(device_ids, **ddp_kwargs).sync_gradients_in_backward()
        return self

    def no_sync(self) -> ContextManager[None]:
        """The distiller's ``no_sync()`` for gradient accumulation (a no-op context when not distributed)."""
        return self.distiller.no_sync()

    def compile(  # type: ignore[override]  # timm's TrainingTask.compile, not nn.Module.compile
        self, backend: str = "inductor", mode: Optional[str] = None, **compile_kwargs: Any
    ) -> nn.Module:
        """Compile the backbones' ``forward_features`` (per instance) and switch the loss core to ``"compile"``.

        The classifiers stay eager: the gradient element differentiates through the student's, and
        compiled graphs cannot double-backward. Call it before :meth:`prepare_distributed`, as timm
        does. Returns the student (the eval model).
        """
        for role, model in (("student", self.student), ("teacher", unwrap_model(self.teacher.model))):
            forward_features = getattr(type(model), "forward_features", None)
            if not callable(forward_features):
                _logger.warning("%s has no forward_features(): it stays eager", role)
                continue
            compiled = torch.compile(forward_features, backend=backend, mode=mode, **compile_kwargs)
            # Per instance; a bound method of the compiled function, so that deepcopy (EMA) rebinds it.
            object.__setattr__(model, "forward_features", types.MethodType(compiled, model))
        self.distiller.set_backend("compile")
        return self.student

    def get_eval_model(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[nn.Module]:
        """The student (of the EMA copy with ``ema=True``): what validation and checkpoints see."""
        resolved = super().get_eval_model(module=module, ema=ema)
        inner = timm_unwrap_model(resolved) if resolved is not None else None
        return inner.student if isinstance(inner, CRCDTrainableModule) else resolved

    def get_clip_parameters(self, exclude_head: bool = False) -> List[nn.Parameter]:
        """Student parameters (without its last two with ``exclude_head``) and CRCD head parameters."""
        parameters = list(self.student.parameters())
        if exclude_head:
            parameters = parameters[:-2]
        parameters.extend(self.trainable_module.crcd_parameters())
        return parameters

    def _trainable(self, module: Optional[nn.Module], ema: bool) -> Optional[CRCDTrainableModule]:
        module = module if module is not None else self.get_trainable_module(ema=ema)
        if module is None:
            return None
        inner = timm_unwrap_model(module)
        if not isinstance(inner, CRCDTrainableModule):
            raise TypeError(f"expected the task's CRCDTrainableModule, got {type(inner).__name__}")
        return inner

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        """``{"crcd": trainable.crcd_state_dict()}``, saved by timm beside the student's ``state_dict``."""
        trainable = self._trainable(module, ema)
        if trainable is None:
            return {}
        state = trainable.crcd_state_dict()
        return {"crcd": state} if state else {}

    def load_task_state(self, state: Optional[Dict[str, Any]], strict: bool = True,
                        module: Optional[nn.Module] = None, ema: bool = False) -> None:
        """Load what :meth:`get_task_state` returned (checked whole before anything is written)."""
        if not state:
            return
        if not isinstance(state, Mapping) or "crcd" not in state:
            got = f"keys {list(state)[:5]!r}" if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"expected the task state {{'crcd': {{...}}}} of get_task_state(), got {got}")
        trainable = self._trainable(module, ema)
        if trainable is None:
            raise RuntimeError("Cannot load EMA task state before setup_ema()." if ema else "No trainable module.")
        trainable.load_crcd_state_dict(state["crcd"], strict=strict)

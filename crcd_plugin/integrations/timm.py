"""timm integration: CRCD as a ``timm.task.TrainingTask``, next to timm's own distillation tasks.

The task translates timm's conventions (model names, ``DistillationTeacher``, ``pretrained_cfg``
normalisation, ``get_classifier()``, task state, DDP and compile hooks) into one
:class:`~crcd_plugin.distiller.CRCDDistiller`; the relation losses, memories and gradient element
are the library's. Import it explicitly: ``import crcd_plugin`` never imports timm.
"""

from __future__ import annotations

import difflib
import logging
import types
import warnings
from typing import Any, Callable, ContextManager, Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from crcd_plugin.config import CRCDConfig, config_from_legacy, deprecated
from crcd_plugin.distiller import CRCDDistiller, CRCDTrainableModule
from crcd_plugin.hooks import unwrap_model
from crcd_plugin.integrations import require

require("timm", "timm")

from timm.data import resolve_model_data_config  # noqa: E402 - after the check that names the extra
from timm.models import create_model, group_parameters, is_model, list_models  # noqa: E402
from timm.task import DistillationTeacher, TrainingTask, resolve_classification_loss  # noqa: E402
from timm.utils import unwrap_model as timm_unwrap_model  # noqa: E402 - also unwraps ModelEma

_logger = logging.getLogger(__name__)

__all__ = ["CRCDDistillationTask", "CRCDTrainableModule"]

TeacherSpec = Union[str, nn.Module, DistillationTeacher]


def _classifier_path(model: nn.Module, role: str) -> str:
    """Dotted path of ``model.get_classifier()``, whose input is the pre-logits feature.

    For timm classifiers the classifier's input is exactly ``forward_head(forward_features(x),
    pre_logits=True)``, so a hook on it reads the feature during the ordinary forward, without a
    second head pass.
    """
    inner = unwrap_model(model)
    get_classifier = getattr(inner, "get_classifier", None)
    hint = f"pass {role}_head= (the dotted path of the module whose input is the pre-logits feature)"
    if not callable(get_classifier):
        raise ValueError(f"{role}_model ({type(inner).__name__}) has no get_classifier(); {hint}")
    classifier = get_classifier()
    if not isinstance(classifier, nn.Module) or isinstance(classifier, nn.Identity):
        raise ValueError(
            f"{role}_model ({type(inner).__name__}) has no single classifier module: get_classifier() returned "
            f"{type(classifier).__name__} (num_classes=0 or several heads); {hint}"
        )
    for name, module in inner.named_modules():
        if module is classifier:
            return name
    raise ValueError(f"{role}_model's get_classifier() is not a submodule of the model; {hint}")


def _check_model_name(name: str) -> None:
    if not is_model(name):
        close = difflib.get_close_matches(name, list_models(), n=5, cutoff=0.6)
        raise ValueError(
            f"teacher_model {name!r} is not a timm model name"
            + (f"; closest: {close}" if close else "; see timm.list_models()")
        )


def _resolve_teacher(
    teacher_model: TeacherSpec,
    student_model: nn.Module,
    *,
    pretrained: bool,
    pretrained_path: Optional[str],
    pretrained_cfg_overlay: Optional[Dict[str, Any]],
    model_kwargs: Optional[Dict[str, Any]],
    device: torch.device,
    dtype: Optional[torch.dtype],
) -> DistillationTeacher:
    """A ``DistillationTeacher`` for a timm name, an ``nn.Module`` or a ready ``DistillationTeacher``."""
    if isinstance(teacher_model, DistillationTeacher):
        return teacher_model
    if isinstance(teacher_model, str):
        _check_model_name(teacher_model)
        student = unwrap_model(student_model)
        overlay: Dict[str, Any] = {}
        if pretrained_path:
            overlay.update(file=pretrained_path, num_classes=getattr(student, "num_classes", None))
        overlay.update(pretrained_cfg_overlay or {})
        if not (pretrained or pretrained_path):
            # Unlike timm's own tasks, a name does not download weights unless asked: runs stay
            # offline by default, and a random teacher is worth a loud warning, not a hidden fetch.
            _logger.warning(
                "teacher %r is created with random weights; pass teacher_pretrained=True (downloads) or "
                "teacher_pretrained_path= (a local checkpoint) to distil from a trained teacher",
                teacher_model,
            )
        model = create_model(
            teacher_model,
            pretrained=bool(pretrained or pretrained_path),
            pretrained_cfg_overlay=overlay or None,
            num_classes=getattr(student, "num_classes", None),
            in_chans=getattr(student, "in_chans", None),
            device=device,
            dtype=dtype,
            **(model_kwargs or {}),
        )
        return DistillationTeacher(model, device=device, dtype=dtype)
    if isinstance(teacher_model, nn.Module):
        return DistillationTeacher(teacher_model, device=device, dtype=dtype)
    raise TypeError(
        "teacher_model must be a timm model name (str), an nn.Module or a timm.task.DistillationTeacher, "
        f"got {type(teacher_model).__name__}"
    )


def _buffer(module: nn.Module, name: str) -> torch.Tensor:
    value = getattr(module, name)
    assert isinstance(value, torch.Tensor)
    return value


class _Renormalize(nn.Module):
    """Maps input normalised with the student's mean/std to the teacher's normalisation.

    The same map as timm's ``DistillationTeacher.normalize_input``; whether it is needed at all is
    decided once at construction, not by an equality test on every step (a host sync on GPU).
    """

    student_mean: torch.Tensor
    student_std: torch.Tensor
    teacher_mean: torch.Tensor
    teacher_std: torch.Tensor

    def __init__(self, student_mean: torch.Tensor, student_std: torch.Tensor, teacher: DistillationTeacher) -> None:
        super().__init__()
        self.register_buffer("student_mean", student_mean, persistent=False)
        self.register_buffer("student_std", student_std, persistent=False)
        self.register_buffer("teacher_mean", _buffer(teacher, "mean_kd").clone(), persistent=False)
        self.register_buffer("teacher_std", _buffer(teacher, "std_kd").clone(), persistent=False)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return (input * self.student_std + self.student_mean - self.teacher_mean) / self.teacher_std


def _teacher_transform(
    student_model: nn.Module, teacher: DistillationTeacher, device: torch.device, dtype: torch.dtype
) -> Optional[_Renormalize]:
    """``_Renormalize`` when both ``pretrained_cfg`` normalisations are known and differ, else ``None``."""
    cfg = getattr(unwrap_model(student_model), "pretrained_cfg", None) or {}
    if "mean" not in cfg or "std" not in cfg:
        _logger.info("student has no pretrained_cfg mean/std: the teacher sees the student's input as is")
        return None
    mean = torch.tensor(cfg["mean"], device=device, dtype=dtype).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"], device=device, dtype=dtype).view(1, -1, 1, 1)
    teacher_mean, teacher_std = _buffer(teacher, "mean_kd").to(mean), _buffer(teacher, "std_kd").to(std)
    if mean.shape == teacher_mean.shape and torch.equal(mean, teacher_mean) and torch.equal(std, teacher_std):
        return None
    return _Renormalize(mean, std, teacher).to(device=device, dtype=dtype)


class _TimmTrainableModule(CRCDTrainableModule):
    """The distiller's trainable module with timm's optimizer-factory hooks (weight decay, layer groups)."""

    def no_weight_decay(self) -> set:
        """The student's no-weight-decay names (e.g. ViT position embeddings), for timm's optimizer factory."""
        no_weight_decay = getattr(unwrap_model(self.student), "no_weight_decay", None)
        if not callable(no_weight_decay):
            return set()
        return {"student." + name for name in no_weight_decay()}

    def group_matcher(self, coarse: bool = False) -> Union[Dict[str, Any], Callable[[str], int]]:
        """Layer groups for timm's layer-wise lr decay: the student's, CRCD heads in the last group."""
        student = unwrap_model(self.student)
        student_matcher = getattr(student, "group_matcher", None)
        if not callable(student_matcher):
            return {}
        layer_of = group_parameters(student, student_matcher(coarse=coarse), reverse=True)
        last = max(layer_of.values(), default=0)

        def matcher(name: str) -> int:
            if name.startswith("student."):
                return layer_of.get(name[len("student."):], last)
            return last

        return matcher


# timm's weight names, documented aliases of CRCDConfig's fields (same defaults: those of CRCDConfig).
WEIGHT_ALIASES = {
    "task_loss_weight": "task_weight",
    "kd_loss_weight": "kd_weight",
    "crcd_loss_weight": "feature_weight",
    "gradient_loss_weight": "gradient_weight",
}


class CRCDDistillationTask(TrainingTask):
    """Complementary Relation Contrastive Distillation as a timm training task.

    The counterpart of timm's ``FeatureDistillationTask``: same constructor shape (student,
    teacher as a timm name, ``nn.Module`` or ``DistillationTeacher``, ``criterion`` /
    ``criterion_kwargs``, ``device``, ``dtype``, ``verbose``), same ``forward(input, target)``
    returning a dict of named loss components, teacher kept frozen and out of DDP. The loss is::

        loss = task_loss_weight * criterion(logits, target)
               + w(t) * (kd_loss_weight * KD + crcd_loss_weight * CRCD_feature
                         + gradient_loss_weight * CRCD_gradient)

    The distilled features are the pre-logits features: the input of ``get_classifier()``, read
    by a hook during the ordinary forward (CNNs and ViTs alike); name another classifier with
    ``student_classifier`` / ``teacher_classifier``. When the two models' ``pretrained_cfg``
    normalisations differ, the teacher sees the input re-normalised for it, as in timm's tasks.
    Everything else is ``config`` (a :class:`crcd_plugin.CRCDConfig`, the same defaults as
    everywhere: in-batch negatives with InfoNCE, no gradient element) and the task's
    :class:`~crcd_plugin.distiller.CRCDDistiller`, whose integration contract does the DDP,
    gradient-sync and state work.

    Args:
        student_model: The student, a timm classifier (or any ``nn.Module`` with ``student_classifier``).
        teacher_model: A timm model name, an ``nn.Module`` or a ``timm.task.DistillationTeacher``.
        criterion: Task loss on the student logits; created by timm's
            ``create_classification_loss(**criterion_kwargs)`` when ``None``.
        criterion_kwargs: Arguments of ``create_classification_loss`` when ``criterion`` is ``None``.
        teacher_pretrained: For a teacher name: load timm's pretrained weights (downloads them).
            Default ``False``, unlike timm's tasks: no network unless asked (a warning says that
            the teacher is random).
        teacher_pretrained_path: For a teacher name: a local checkpoint to load (no network).
        teacher_pretrained_cfg_overlay: For a teacher name: ``pretrained_cfg`` overrides.
        teacher_kwargs: For a teacher name: more ``timm.create_model`` arguments (``img_size``, ...).
        config: Loss weights (``task_weight`` weighs ``criterion``), schedule and relation options.
        task_loss_weight: timm's name for ``config.task_weight`` (overrides it when given).
        kd_loss_weight: timm's name for ``config.kd_weight``.
        crcd_loss_weight: timm's name for ``config.feature_weight``.
        gradient_loss_weight: timm's name for ``config.gradient_weight``.
        num_samples: Dataset size: memory-bank negatives (``forward`` then needs ``index``).
        total_steps: Run length of ``config.schedule``, in the unit of :meth:`set_progress`.
        student_classifier: Dotted path of the student's classifier; default ``get_classifier()``'s.
        teacher_classifier: Same for the teacher (relative to the teacher model).
        normalize_teacher_input: Re-normalise the teacher's input when normalisations differ.
        example_input: A batch for a dry run that fixes the feature sizes, needed only when a
            classifier is not an ``nn.Linear`` (default: zeros of the student's data-config size).
        device: Device of the task's tensors, the CRCD heads and a teacher created from a name;
            default: the student's device.
        dtype: Dtype of the task's tensors (and of a teacher created from a name).
        verbose: Log the configuration.
        **legacy: 0.2.0 keywords (``kd_temperature``, ``gradient_element``, ``queue_size``,
            ``crcd_options``, ``schedule``, ``student_head``, ``teacher_head``), with a
            ``DeprecationWarning`` naming the new spelling.

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
        student_classifier = student_classifier or _classifier_path(student_model, "student")
        teacher = _resolve_teacher(
            teacher_model,
            student_model,
            pretrained=teacher_pretrained,
            pretrained_path=teacher_pretrained_path,
            pretrained_cfg_overlay=teacher_pretrained_cfg_overlay,
            model_kwargs=teacher_kwargs,
            device=self.device,
            dtype=dtype,
        )
        teacher_classifier = teacher_classifier or _classifier_path(teacher.model, "teacher")
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
        transform = (
            _teacher_transform(student_model, teacher, self.device, self.dtype) if normalize_teacher_input else None
        )
        with warnings.catch_warnings():  # the task's own legacy keywords warned above, under its name
            warnings.simplefilter("ignore", DeprecationWarning)
            self.distiller = CRCDDistiller(
                student_model,
                teacher.model,
                student_classifier,
                teacher_classifier,
                config.replace(task_weight=0.0),  # the task criterion is timm's, added in forward
                num_samples=num_samples if num_samples is not None else options_num_samples,
                total_steps=total_steps,
                schedule=schedule,
                example_input=example_input,
                teacher_transform=transform,
            )
        self.config = config
        if not self.distiller.built:
            self.distiller.build(self._dry_run_input(student_model))
        self.trainable_module = _TimmTrainableModule(self.distiller)
        for module in self.trainable_module.crcd_children().values():
            module.to(self.device)  # built on the CPU
        if self.verbose:
            _logger.info(
                "CRCDDistillationTask: student_classifier=%r, teacher_classifier=%r, teacher input re-normalised: "
                "%s, %r", student_classifier, teacher_classifier, transform is not None, config,
            )

    def _dry_run_input(self, student_model: nn.Module) -> torch.Tensor:
        try:
            input_size = resolve_model_data_config(unwrap_model(student_model))["input_size"]
        except Exception as error:  # noqa: BLE001 - any failure means: the user has to say
            raise ValueError(
                "a classifier is not an nn.Linear, so the feature sizes need a dry run: pass example_input="
            ) from error
        return torch.zeros(2, *input_size, device=self.device, dtype=self.dtype)

    @property
    def student(self) -> nn.Module:
        """The student model, without DDP or compile wrappers."""
        return unwrap_model(self.trainable_module.student)

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
        """One step's losses.

        Args:
            input: Images ``[B, C, H, W]``, normalised for the student.
            target: Class indices ``[B]`` or soft targets ``[B, num_classes]`` (mixup).
            index: Dataset indices ``[B]``; needed with memory-bank negatives (``num_samples``).

        Returns:
            ``loss`` (to backpropagate), ``output`` (student logits ``[B, num_classes]``),
            ``task_loss``, ``kd_loss``, ``crcd_feature_loss`` and ``crcd_gradient_loss`` (scalars;
            terms that are off are zeros).
        """
        out = self.distiller(input, target, index)
        task_loss = self.criterion(out["logits"], target)
        return {
            "loss": self.task_loss_weight * task_loss + out["loss"],
            "output": out["logits"],
            "task_loss": task_loss,
            "kd_loss": out["kd_loss"],
            "crcd_feature_loss": out["crcd_feature_loss"],
            "crcd_gradient_loss": out["crcd_gradient_loss"],
        }

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs: Any) -> "CRCDDistillationTask":
        """Wrap the student in DDP (the teacher and CRCD state stay out); sync the CRCD heads in backward.

        :meth:`CRCDDistiller.prepare_distributed` wraps the student alone and gives every rank
        rank 0's CRCD state; :meth:`CRCDDistiller.sync_gradients_in_backward` then averages the
        CRCD heads' gradients in one bucketed all-reduce at the end of each backward, so timm's
        loop, which knows nothing of :meth:`CRCDDistiller.sync_gradients`, needs no extra call.
        No-op when not distributed; calling it twice changes nothing.

        Args:
            device_ids: DDP ``device_ids`` (e.g. ``[local_rank]``; ``None`` on CPU).
            **ddp_kwargs: More ``DistributedDataParallel`` arguments.

        Returns:
            ``self``.
        """
        self.teacher.requires_grad_(False)
        self.distiller.prepare_distributed(device_ids, **ddp_kwargs).sync_gradients_in_backward()
        return self

    def no_sync(self) -> ContextManager[None]:
        """The DDP student's ``no_sync()`` for gradient accumulation (a no-op context otherwise)."""
        return self.distiller.no_sync()

    def compile(  # type: ignore[override]  # timm's TrainingTask.compile, not nn.Module.compile
        self, backend: str = "inductor", mode: Optional[str] = None, **compile_kwargs: Any
    ) -> nn.Module:
        """Compile the backbones (``forward_features``) and the CRCD loss core.

        ``forward_features`` of the student and teacher instances is replaced by its compiled
        version (classes, parameters and ``state_dict`` keys are unchanged); ``forward_head`` and
        the classifier stay eager: the gradient element differentiates through the student's
        classifier, and compiled graphs cannot double-backward. The loss core switches to
        ``CRCDLoss(backend="compile")`` (inductor, whatever ``backend`` says). Call it before
        :meth:`prepare_distributed`, as timm does. An EMA copy made before or after it runs the
        compiled backbone on its own weights.

        Args:
            backend: ``torch.compile`` backend of the backbones.
            mode: ``torch.compile`` mode of the backbones.
            **compile_kwargs: More ``torch.compile`` arguments.

        Returns:
            The student (the eval model), its backbone compiled.
        """
        for role, model in (("student", self.student), ("teacher", unwrap_model(self.teacher.model))):
            forward_features = getattr(type(model), "forward_features", None)
            if not callable(forward_features):
                _logger.warning("%s has no forward_features(): it stays eager", role)
                continue
            compiled = torch.compile(forward_features, backend=backend, mode=mode, **compile_kwargs)
            # An instance attribute shadows the method for this model only (its class is untouched).
            # A bound method of the compiled function, not a compiled bound method: deepcopy (the
            # EMA copy) rebinds it to the copy instead of running the original's weights.
            object.__setattr__(model, "forward_features", types.MethodType(compiled, model))
        for loss in (self.distiller.crcd_feature, self.distiller.crcd_gradient):
            if loss is not None:
                loss.backend = "compile"
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
        """``{"crcd": ...}``: CRCD heads, memories, NCE constants and schedule progress.

        Saved by timm next to the student's ``state_dict`` (``task_state`` in the checkpoint),
        never mixed into it.
        """
        trainable = self._trainable(module, ema)
        if trainable is None:
            return {}
        state = trainable.crcd_state_dict()
        return {"crcd": state} if state else {}

    def load_task_state(
        self,
        state: Optional[Dict[str, Any]],
        strict: bool = True,
        module: Optional[nn.Module] = None,
        ema: bool = False,
    ) -> None:
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

"""timm models for :class:`~crcd_plugin.integrations.timm.CRCDDistillationTask`: the teacher (a name, a module
or a ``DistillationTeacher``) and the re-normalisation of its input (decided once, never per step), the
classifier path, and the trainable module with timm's optimizer-factory hooks."""

from __future__ import annotations

import difflib
import logging
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch import nn

from crcd_plugin.distiller import CRCDTrainableModule
from crcd_plugin.hooks import unwrap_model
from crcd_plugin.integrations import require

require("timm", "timm")

from timm.data import resolve_model_data_config  # noqa: E402
from timm.models import create_model, group_parameters, is_model, list_models  # noqa: E402 - after the check that names the extra
from timm.task import DistillationTeacher  # noqa: E402

_logger = logging.getLogger("crcd_plugin.integrations.timm")

TeacherSpec = Union[str, nn.Module, DistillationTeacher]


def _check_model_name(name: str) -> None:
    if not is_model(name):
        close = difflib.get_close_matches(name, list_models(), n=5, cutoff=0.6)
        raise ValueError(
            f"teacher_model {name!r} is not a timm model name"
            + (f"; closest: {close}" if close else "; see timm.list_models()")
        )


def resolve_teacher(
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
    if getattr(teacher_model, "needs_index", False):
        # timm's loop gives the task no dataset index and augments every epoch (RandAugment,
        # mixup): one fixed stored view per sample is not what the student sees there.
        raise TypeError(
            f"CRCDDistillationTask does not take a {type(teacher_model).__name__}: timm's training loop passes no "
            "dataset index and augments every epoch, while stored rows (a cache) hold one fixed view per sample; "
            "use CRCDDistiller(student, cache, ...) in a loop that yields (input, target, index) without random "
            "augmentation"
        )
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


def teacher_transform(
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


def classifier_path(model: nn.Module, role: str) -> str:
    """Dotted path of ``model.get_classifier()``, whose input is the pre-logits feature.

    For timm classifiers the classifier's input is exactly ``forward_head(forward_features(x),
    pre_logits=True)``, so a hook on it reads the feature during the ordinary forward, without a
    second head pass.
    """
    inner = unwrap_model(model)
    get_classifier = getattr(inner, "get_classifier", None)
    hint = f"pass {role}_classifier= (0.2.0: {role}_head=), the dotted path of the module whose input is the feature"
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


class TimmTrainableModule(CRCDTrainableModule):
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


def dry_run_input(student: nn.Module, device: torch.device, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """Zeros of the student's data-config input size, for the dry run that fixes the feature sizes."""
    try:
        input_size = resolve_model_data_config(unwrap_model(student))["input_size"]
    except Exception as error:  # noqa: BLE001 - any failure means: the user has to say
        raise ValueError("a classifier is not an nn.Linear, so the feature sizes need a dry run: "
                         "pass example_input=") from error
    return torch.zeros(2, *input_size, device=device, dtype=dtype)

"""What :mod:`crcd_plugin.integrations.hf` needs from transformers models, and its deprecated 0.2.0 config.

:func:`default_head` and :func:`classified_token` find the feature of standard
``*ForSequenceClassification`` / ``*ForImageClassification`` models; :class:`CRCDConfig` is the
0.2.0 spelling of ``CRCDTrainer``'s options, mapped onto ``crcd_plugin.CRCDConfig``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Dict, Literal, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from crcd_plugin import _compat
from crcd_plugin import config as core
from crcd_plugin.distiller import DistillSchedule
from crcd_plugin.hooks import unwrap_model

EvalLoss = Literal["task", "total"]


@dataclasses.dataclass
class CRCDConfig:
    """Deprecated (0.2.0): pass ``crcd_config=crcd_plugin.CRCDConfig(...)`` and the Trainer options
    (``student_classifier``, ``teacher_classifier``, ``feature_pool``, ``num_samples``,
    ``index_column``, ``eval_loss``) to :class:`CRCDTrainer` itself. Still accepted, with a
    ``DeprecationWarning``; :meth:`split` maps it onto the new spelling. ``negatives=None`` is
    ``"batch"``, or ``"queue"`` with a ``queue_size``, as in 0.2.0.
    """

    alpha: Optional[float] = None
    beta: Optional[float] = None
    gamma: Optional[float] = None
    kd_temperature: Optional[float] = None
    gradient_element: bool = False
    gradient_weight: Optional[float] = None
    negatives: Optional[Literal["queue", "bank", "batch"]] = None
    queue_size: Optional[int] = None
    num_samples: Optional[int] = None
    index_column: str = "index"
    crcd_options: Optional[Dict[str, Any]] = None
    schedule: Union[None, str, DistillSchedule] = None
    schedule_until: float = 0.96
    schedule_start: float = 0.0
    student_head: Optional[str] = None
    teacher_head: Optional[str] = None
    feature_pool: Optional[str] = None
    eval_loss: EvalLoss = "task"

    def __post_init__(self) -> None:
        _compat.deprecated("crcd_plugin.integrations.hf.CRCDConfig", "CRCDTrainer(crcd_config=crcd_plugin.CRCDConfig("
                        "...), student_classifier=..., index_column=..., eval_loss=...)", stacklevel=3)
        if self.negatives is None:
            queue_size = (self.crcd_options or {}).get("queue_size", self.queue_size)
            self.negatives = "batch" if queue_size is None else "queue"
        core.check_choice("CRCDConfig.negatives", self.negatives, core.NEGATIVE_KINDS)
        if isinstance(self.schedule, str):
            core.check_choice("CRCDConfig.schedule", self.schedule, core.SCHEDULE_KINDS)
        elif self.schedule is not None and not isinstance(self.schedule, DistillSchedule):
            raise TypeError(f"CRCDConfig.schedule must be None, a kind name or a DistillSchedule, "
                            f"got {type(self.schedule).__name__}")
        self.split()  # every value is checked now, not at the first step

    def split(self) -> Tuple[core.CRCDConfig, Dict[str, Any]]:
        """The new spelling: a ``crcd_plugin.CRCDConfig`` and the :class:`CRCDTrainer` keyword arguments."""
        legacy = {name: getattr(self, name) for name in ("alpha", "beta", "gamma", "kd_temperature",
                                                         "gradient_weight", "queue_size", "crcd_options")}
        with warnings.catch_warnings():  # one warning, for the class, was enough
            warnings.simplefilter("ignore", DeprecationWarning)
            config, _ = _compat.config_from_legacy(None, dict(legacy, gradient_element=self.gradient_element),
                                                owner="CRCDConfig")
        changes: Dict[str, Any] = {"relation": config.relation.replace(negatives=self.negatives)}
        if isinstance(self.schedule, str):
            changes.update(schedule=self.schedule, schedule_until=self.schedule_until,
                           schedule_start=self.schedule_start)
        options = dict(student_classifier=self.student_head, teacher_classifier=self.teacher_head,
                       feature_pool=self.feature_pool, num_samples=self.num_samples, index_column=self.index_column,
                       eval_loss=self.eval_loss,
                       schedule=self.schedule if isinstance(self.schedule, DistillSchedule) else None)
        return config.replace(**changes), options


def default_head(model: nn.Module, option: str = "student_head") -> str:
    """Dotted path of the classifier head of a transformers classification model.

    - ``classifier`` when it is an ``nn.Linear``: BERT-like models (input: the pooled output),
      ViT-like models (input: the CLS token), DistilBERT, DeBERTa, Swin, ConvNeXt, ...
    - ``classifier.out_proj``: RoBERTa-like heads (dense + tanh + ``out_proj``); the feature is the
      input of ``out_proj``.
    - ``score``: decoder-only models (GPT-2, Llama, Mistral, Qwen, ...), whose head sees every
      token; the feature is the token the model classifies (:func:`classified_token`).

    Args:
        model: The (possibly wrapped) model.
        option: The 0.2.0 ``CRCDConfig`` field to name in the error (``student_head``/``teacher_head``).

    Returns:
        The path.

    Raises:
        ValueError: If none of these is found; the message names ``option``.

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> config = BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        ...                     intermediate_size=16)
        >>> default_head(BertForSequenceClassification(config))
        'classifier'
    """
    inner = unwrap_model(model)
    classifier = getattr(inner, "classifier", None)
    if isinstance(classifier, nn.Linear):
        return "classifier"
    if isinstance(getattr(classifier, "out_proj", None), nn.Linear):
        return "classifier.out_proj"
    if isinstance(getattr(inner, "score", None), nn.Linear):
        return "score"
    raise ValueError(
        f"cannot find the classifier head of {type(inner).__name__} (looked for an nn.Linear at 'classifier', "
        f"'classifier.out_proj' or 'score'): set CRCDTrainer({option.replace('head', 'classifier')}="
        f"'dotted.path.of.the.head') (0.2.0: CRCDConfig({option}=...))"
    )


def classified_token(model: nn.Module, inputs: Any) -> Union[int, torch.Tensor]:
    """Position of the token a decoder-only ``*ForSequenceClassification`` model classifies.

    The rule of the models' own ``forward``: the rightmost token that is not
    ``config.pad_token_id`` (so left and right padding both work), or the last token when the
    model has no pad token or gets ``inputs_embeds`` instead of ``input_ids``.

    Shape:
        ``input_ids [B, T]`` -> ``[B]`` (or the int ``-1`` for every row).

    Args:
        model: The unwrapped model (its ``config`` is read).
        inputs: The model's keyword inputs.

    Returns:
        The positions.

    Example:
        >>> from types import SimpleNamespace
        >>> model = SimpleNamespace(config=SimpleNamespace(pad_token_id=0))
        >>> classified_token(model, {"input_ids": torch.tensor([[5, 6, 0], [0, 7, 8]])})
        tensor([1, 2])
    """
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    pad_token_id = getattr(config, "pad_token_id", None)
    input_ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else None
    if pad_token_id is None or input_ids is None:
        return -1
    non_pad = (input_ids != pad_token_id).to(torch.int32)
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device, dtype=torch.int32)
    return (positions * non_pad).argmax(-1)


def check_teacher(model: Any, eval_loss: str, argument: str = "teacher_model") -> Optional[int]:
    """Check ``CRCDTrainer``'s ``teacher_model`` (or, with ``argument="model"``, its student); return ``num_labels``.

    The teacher may be an ``nn.Module`` or a :class:`~crcd_plugin.TeacherCache` (its ``num_classes``).
    A cache holds training-set rows only, so ``eval_loss="total"`` (which needs the teacher on
    evaluation samples) is refused with it.
    """
    if getattr(model, "needs_index", False):  # rows stored by training-set index (a TeacherCache, a Teacher)
        if eval_loss == "total":
            raise ValueError(f"eval_loss='total' runs the teacher on evaluation samples, which a "
                             f"{type(model).__name__} of the training set does not hold: use eval_loss='task'")
        return getattr(model, "num_classes", None)
    if argument == "teacher_model" and not isinstance(model, nn.Module):
        raise TypeError(
            f"teacher_model must be the trained teacher (an nn.Module, e.g. from from_pretrained) or a "
            f"crcd_plugin.TeacherCache built from it, got {type(model).__name__}"
        )
    return check_classifier(model, argument)


def check_classifier(model: nn.Module, argument: str) -> Optional[int]:
    """Reject models whose loss is not single-label cross-entropy; return ``num_labels`` if known."""
    config = getattr(unwrap_model(model), "config", None)
    problem_type = getattr(config, "problem_type", None)
    num_labels = getattr(config, "num_labels", None)
    if problem_type in ("regression", "multi_label_classification") or num_labels == 1:
        raise ValueError(
            f"{argument}: CRCDTrainer distils single-label classifiers (cross-entropy over classes), got "
            f"problem_type={problem_type!r}, num_labels={num_labels!r}"
        )
    return num_labels

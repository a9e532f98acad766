"""Hugging Face ``transformers.Trainer`` with CRCD: swap ``Trainer`` for :class:`CRCDTrainer`, add ``teacher_model=``.

The loss is :class:`~crcd_plugin.distiller.CRCDDistiller`'s. This file only translates the
Trainer's conventions (input dicts and label names, optimizer groups, checkpoints, logging, ranks)
and finds the feature of standard ``*ForSequenceClassification`` / ``*ForImageClassification``
models; the relation math, sampling and state live in the core.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Dict, List, Literal, Mapping, Optional, Tuple, Union, cast

import torch
from torch import nn

from crcd_plugin.distiller import CRCDDistiller, DistillSchedule, ScheduleKind
from crcd_plugin.distributed import average
from crcd_plugin.hooks import unwrap_model
from crcd_plugin.integrations import require
from crcd_plugin.presets import default_negatives

transformers = require("transformers", "hf")
from transformers import Trainer, TrainerCallback  # noqa: E402  (after require, which names the extra if missing)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # noqa: E402

__all__ = ["CRCDConfig", "CRCDTrainer", "CRCD_STATE_NAME", "classified_token", "default_head"]

_logger = logging.getLogger(__name__)

CRCD_STATE_NAME = "crcd_state.pt"
"""File, in every checkpoint folder, holding the CRCD heads, memories, NCE constants and schedule."""

LOSS_COMPONENTS: Tuple[str, ...] = ("task_loss", "kd_loss", "crcd_feature_loss", "crcd_gradient_loss")
_SCHEDULE_KINDS = ("step", "linear", "constant")


NegativeMode = Literal["queue", "bank", "batch"]


@dataclasses.dataclass
class CRCDConfig:
    """What :class:`CRCDTrainer` distils and how. Every field has a default; ``None`` means the default of
    :class:`~crcd_plugin.distiller.CRCDDistiller` (see ``docs/distiller.md``).

    Args:
        alpha: Weight of Hinton KD.
        beta: Weight of the CRCD feature element (0 turns it off).
        gamma: Weight of the student's task cross-entropy.
        kd_temperature: KD temperature.
        gradient_element: Also distil the relations of the CE gradients w.r.t. the features.
        gradient_weight: Weight of the gradient element.
        negatives: ``None`` (default): the library's default without a dataset index (which
            Trainer would drop): ``"batch"`` (the other samples of the batch, InfoNCE; stable in
            every setting of docs/reliability.md), or ``"queue"`` when ``queue_size`` is given.
            ``"bank"`` is the reference memory bank: the dataset must return ``index_column`` and
            ``TrainingArguments(remove_unused_columns=False)`` must be set.
        queue_size: Queue length for ``"queue"``.
        num_samples: Bank size for ``"bank"``; default ``len(train_dataset)``.
        index_column: Name of the dataset-index column for ``"bank"``.
        crcd_options: Further :class:`~crcd_plugin.loss.CRCDLoss` keyword arguments
            (``embed_dim``, ``temperature``, ``num_negatives``, ``objective``, ...).
        schedule: Distillation weight ``w(t)`` over optimizer steps: ``None`` (``w = 1``), a kind
            (``"step"``, ``"linear"``, ``"constant"``) spread over the Trainer's total optimizer
            steps, or a ready :class:`~crcd_plugin.distiller.DistillSchedule` whose ``total_steps``
            counts optimizer steps.
        schedule_until: For a kind: fraction of training at which ``w`` reaches 0 (reference 0.96).
        schedule_start: For ``"linear"``: fraction at which the decay starts.
        student_head: Dotted path of the student's classifier head; default found by
            :func:`default_head`.
        teacher_head: The same for the teacher.
        feature_pool: Reduction of a head input that is not ``[B, D]`` (see
            :func:`~crcd_plugin.hooks.pool_feature`).
        eval_loss: What ``evaluate()`` reports as ``eval_loss``: ``"task"`` (the student's own
            loss, as a plain Trainer reports it) or ``"total"`` (the distillation loss, no gradient
            element; not with ``"bank"``, whose rows belong to the training set).

    Example:
        >>> CRCDConfig(gradient_element=True, schedule="step").negatives
        'batch'
        >>> CRCDConfig(queue_size=1024).negatives
        'queue'
    """

    alpha: Optional[float] = None
    beta: Optional[float] = None
    gamma: Optional[float] = None
    kd_temperature: Optional[float] = None
    gradient_element: bool = False
    gradient_weight: Optional[float] = None
    negatives: Optional[NegativeMode] = None
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
    eval_loss: Literal["task", "total"] = "task"

    def __post_init__(self) -> None:
        if self.negatives is None:
            # The distiller's own rule without an index (the bank is only ever asked for by name here).
            queue_size = (self.crcd_options or {}).get("queue_size", self.queue_size)
            self.negatives = cast(NegativeMode, default_negatives("default", None, queue_size))
        if self.negatives not in ("queue", "bank", "batch"):
            raise ValueError(f"CRCDConfig.negatives must be 'queue', 'bank' or 'batch', got {self.negatives!r}")
        if self.eval_loss not in ("task", "total"):
            raise ValueError(f"CRCDConfig.eval_loss must be 'task' or 'total', got {self.eval_loss!r}")
        if self.eval_loss == "total" and self.negatives == "bank":
            raise ValueError(
                "CRCDConfig.eval_loss='total' reads the memory bank at each row's index, which belongs to the "
                "training set: use eval_loss='task' with negatives='bank'"
            )
        if isinstance(self.schedule, str):
            if self.schedule not in _SCHEDULE_KINDS:
                raise ValueError(
                    f"CRCDConfig.schedule must be None, one of {_SCHEDULE_KINDS} or a DistillSchedule, "
                    f"got {self.schedule!r}"
                )
            kind = cast(ScheduleKind, self.schedule)  # one of _SCHEDULE_KINDS, checked just above
            DistillSchedule(1, kind, self.schedule_until, self.schedule_start)  # validates the fractions
        elif self.schedule is not None and not isinstance(self.schedule, DistillSchedule):
            raise TypeError(
                "CRCDConfig.schedule must be None, a kind name or a DistillSchedule, "
                f"got {type(self.schedule).__name__}"
            )
        if not isinstance(self.index_column, str) or not self.index_column:
            raise ValueError(f"CRCDConfig.index_column must be a column name, got {self.index_column!r}")

    def distiller_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments for :class:`CRCDDistiller` (all but the models, heads and bank size)."""
        names = ("alpha", "beta", "gamma", "kd_temperature", "gradient_weight", "queue_size")
        kwargs: Dict[str, Any] = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        options = dict(self.crcd_options or {})
        options.setdefault("negatives", self.negatives)
        kwargs.update(
            gradient_element=self.gradient_element,
            crcd_options=options,
            feature_pool=self.feature_pool,
            schedule=self.schedule if isinstance(self.schedule, DistillSchedule) else None,
        )
        return kwargs


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
        option: The :class:`CRCDConfig` field to name in the error.

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
        f"'classifier.out_proj' or 'score'): set CRCDConfig({option}='dotted.path.of.the.head')"
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


def _check_classifier(model: nn.Module, argument: str) -> Optional[int]:
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


class _ClearCRCDGradients(TrainerCallback):
    """Trainer clears only the student's gradients after each optimizer step; this clears the heads'."""

    def __init__(self, parameters: List[nn.Parameter]) -> None:
        self.parameters = parameters

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for param in self.parameters:
            param.grad = None


class CRCDTrainer(Trainer):
    """``transformers.Trainer`` whose loss is CE + KD + CRCD against a frozen teacher.

    Takes every ``Trainer`` argument unchanged, plus ``teacher_model=`` and ``crcd_config=``.
    Besides the loss it:

    - keeps the teacher frozen, in eval mode, on the student's device, outside DDP and outside
      every checkpoint and ``save_model()`` output;
    - finds each model's feature (the input of its classifier head, :func:`default_head`);
    - adds the CRCD heads to the optimizer Trainer creates (with its weight-decay rules) and
      averages their gradients over ranks (they live outside the DDP-wrapped student);
    - saves the CRCD state (heads, memories/queue, NCE constants, schedule progress) as
      ``crcd_state.pt`` in every checkpoint and restores it on ``train(resume_from_checkpoint=...)``;
    - returns a per-micro-batch mean loss that Trainer divides by the accumulation steps exactly
      once (``loss_is_scaled_for_ga = False``; ``num_items_in_batch`` is not used);
    - logs ``task_loss``, ``kd_loss``, ``crcd_feature_loss`` and ``crcd_gradient_loss``, averaged
      over the logging interval and over ranks, next to ``loss``.

    ``model_init``, ``compute_loss_func`` and ``optimizers=`` (when CRCD has trainable heads) are
    not supported: the loss is the distiller's, and the heads must be in the optimizer.

    Args:
        model: The student, a transformers classification model (or any ``nn.Module`` whose
            forward takes the batch's keyword inputs and returns ``.logits``).
        args: ``TrainingArguments``; ``label_smoothing_factor`` applies to the task CE (and to the
            CE whose gradient the gradient element uses).
        *trainer_args: Further positional ``Trainer`` arguments.
        teacher_model: The trained teacher; same label set and inputs as the student.
        crcd_config: What to distil (:class:`CRCDConfig`); default: KD + CRCD feature, in-batch negatives.
        **trainer_kwargs: Further ``Trainer`` keyword arguments (datasets, collator, callbacks, ...).

    Example:
        >>> trainer = CRCDTrainer(model=student, teacher_model=teacher, args=args,  # doctest: +SKIP
        ...                       train_dataset=train, eval_dataset=val,
        ...                       crcd_config=CRCDConfig(gradient_element=True))
        >>> trainer.train()  # doctest: +SKIP
    """

    # Our loss is a per-micro-batch mean: Trainer divides it by the accumulation steps, once.
    loss_is_scaled_for_ga = False

    # Set in __init__ (after Trainer's own __init__, whose attributes mypy cannot see through).
    distiller: CRCDDistiller
    crcd_config: CRCDConfig
    _crcd_device: torch.device
    _component_sums: torch.Tensor
    _component_count: int

    def __init__(
        self,
        model: Optional[nn.Module] = None,
        args: Optional[Any] = None,
        *trainer_args: Any,
        teacher_model: Optional[nn.Module] = None,
        crcd_config: Optional[CRCDConfig] = None,
        **trainer_kwargs: Any,
    ) -> None:
        if not isinstance(teacher_model, nn.Module):
            raise TypeError(
                f"teacher_model must be the trained teacher (an nn.Module, e.g. from from_pretrained), "
                f"got {type(teacher_model).__name__}"
            )
        config = CRCDConfig() if crcd_config is None else crcd_config
        if not isinstance(config, CRCDConfig):
            raise TypeError(f"crcd_config must be a CRCDConfig or None, got {type(config).__name__}")
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        if self.model_init is not None:
            raise ValueError("CRCDTrainer needs model= (the student), not model_init=")
        if self.compute_loss_func is not None:
            raise ValueError("CRCDTrainer computes the loss itself: compute_loss_func= is not supported")
        if len(self.label_names) != 1:
            raise ValueError(f"CRCDTrainer needs exactly one label column, got label_names={self.label_names}")
        classes = (_check_classifier(self.model, "model"), _check_classifier(teacher_model, "teacher_model"))
        if None not in classes and classes[0] != classes[1]:
            raise ValueError(
                f"student and teacher must have the same classes, got num_labels {classes[0]} and {classes[1]}"
            )
        if config.negatives == "bank" and self.args.remove_unused_columns:
            raise ValueError(
                f"negatives='bank' needs the dataset's {config.index_column!r} column, which Trainer drops: set "
                "TrainingArguments(remove_unused_columns=False), or use negatives='queue'"
            )
        # The models must not compute a loss, and ours never reads num_items_in_batch: skip counting it.
        self.model_accepts_loss_kwargs = False
        self.crcd_config = config

        device = self.args.device if self.place_model_on_device else next(self.model.parameters()).device
        if getattr(teacher_model, "hf_device_map", None) is None:
            teacher_model.to(device)
        with torch.random.fork_rng(devices=[]):
            # The CRCD heads (outside DDP, which would broadcast them) start identical on every rank.
            torch.manual_seed(self.args.seed)
            self.distiller = CRCDDistiller(
                self.model,
                teacher_model,
                config.student_head or default_head(self.model, "student_head"),
                config.teacher_head or default_head(teacher_model, "teacher_head"),
                num_samples=self._bank_size() if config.negatives == "bank" else None,
                label_smoothing=self.args.label_smoothing_factor,
                feature_token=classified_token,
                **config.distiller_kwargs(),
            )
        if not self.distiller.built:
            raise ValueError(
                "the CRCD heads need their feature sizes before Trainer creates the optimizer: point "
                "CRCDConfig(student_head=..., teacher_head=...) at nn.Linear classifier heads"
            )
        self._crcd_device = device
        for module in self._crcd_modules():
            module.to(device)
        if self.optimizer is not None and self._crcd_named_parameters():
            raise ValueError(
                "optimizers=(...) cannot hold the CRCD heads, which CRCDTrainer creates: pass "
                "optimizer_cls_and_kwargs= instead, or override create_optimizer"
            )
        self.add_callback(_ClearCRCDGradients([param for _, param in self._crcd_named_parameters()]))
        self._component_sums = torch.zeros(len(LOSS_COMPONENTS), device=device)
        self._component_count = 0

    @property
    def teacher_model(self) -> nn.Module:
        """The frozen teacher."""
        return self.distiller.teacher

    def _bank_size(self) -> int:
        if self.crcd_config.num_samples is not None:
            return self.crcd_config.num_samples
        try:
            return len(self.train_dataset)  # type: ignore[arg-type]  # no len() raises TypeError, handled here
        except TypeError:
            raise ValueError(
                "negatives='bank' needs the dataset size: set CRCDConfig(num_samples=...) for a dataset without len()"
            ) from None

    def _crcd_modules(self) -> List[nn.Module]:
        return [module for name, module in self.distiller.named_children() if name not in ("student", "teacher")]

    def _crcd_named_parameters(self) -> List[Tuple[str, nn.Parameter]]:
        return self.distiller.crcd_named_parameters()

    # ---- loss -------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: Dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Optional[Union[torch.Tensor, int]] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, Any]]:
        """The distiller's loss in training; in evaluation the student's task loss (or see ``eval_loss``).

        ``num_items_in_batch`` is ignored: the loss is this micro-batch's mean, and Trainer divides
        it by the accumulation steps (``loss_is_scaled_for_ga = False``).
        """
        inputs = dict(inputs)
        index = inputs.pop(self.crcd_config.index_column, None) if self.crcd_config.negatives == "bank" else None
        if not model.training and self.crcd_config.eval_loss == "task":
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        label_name = self.label_names[0]
        labels = inputs.pop(label_name, None)
        if labels is None:
            raise ValueError(f"CRCDTrainer needs the labels of every batch, under {label_name!r}")
        self.distiller.train(model.training)
        if model.training:
            self.distiller.set_progress(self.state.global_step)
        with self.accelerator.autocast():  # the teacher under the student's mixed precision
            out = self.distiller(inputs, labels, index, student=model)
        if model.training:
            self._component_sums += torch.stack([out[name].detach().float() for name in LOSS_COMPONENTS])
            self._component_count += 1
        return (out["loss"], {"logits": out["logits"]}) if return_outputs else out["loss"]

    def training_step(
        self,
        model: nn.Module,
        inputs: Dict[str, Any],
        num_items_in_batch: Optional[Union[torch.Tensor, int]] = None,
    ) -> torch.Tensor:
        """Trainer's step, then the CRCD heads' gradients averaged over ranks when DDP syncs the student's."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            self.distiller.sync_gradients()  # the contract: the CRCD heads, in one bucketed all_reduce
        return loss

    def prediction_step(
        self,
        model: nn.Module,
        inputs: Dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: Optional[List[str]] = None,
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Trainer's step, without the dataset-index column, which the model does not take."""
        if self.crcd_config.negatives == "bank":
            inputs = {k: v for k, v in inputs.items() if k != self.crcd_config.index_column}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        """Add the loss components, averaged since the last log and over ranks, to training logs."""
        if "loss" in logs and self._component_count:
            means = average(self._component_sums) / self._component_count
            logs.update(zip(LOSS_COMPONENTS, means.tolist()))
            self._component_sums.zero_()
            self._component_count = 0
        super().log(logs, start_time)

    # ---- optimizer, schedule, checkpoints --------------------------------------------------

    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        """Trainer's optimizer, plus the CRCD heads in two groups under Trainer's weight-decay rules."""
        creating = self.optimizer is None
        optimizer = super().create_optimizer(model)
        named = self._crcd_named_parameters()
        if creating and named:
            decay = set(self.get_decay_parameter_names(self.distiller))
            for weight_decay, params in (
                (self.args.weight_decay, [p for n, p in named if n in decay]),
                (0.0, [p for n, p in named if n not in decay]),
            ):
                if params:
                    optimizer.add_param_group({"params": params, "weight_decay": weight_decay})
        return optimizer

    def create_scheduler(
        self, num_training_steps: int, optimizer: Optional[torch.optim.Optimizer] = None
    ) -> Any:
        """Trainer's LR scheduler; a schedule kind in ``CRCDConfig`` gets the same number of steps."""
        if isinstance(self.crcd_config.schedule, str):
            config = self.crcd_config
            kind = cast(ScheduleKind, config.schedule)  # a kind name, checked by CRCDConfig
            schedule = DistillSchedule(num_training_steps, kind, config.schedule_until, config.schedule_start)
            self.distiller.schedule = schedule.to(self._crcd_device)
        return super().create_scheduler(num_training_steps, optimizer)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        # Written first, so that checkpoint rotation and hub pushes see a complete folder.
        if self.args.should_save:
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            os.makedirs(folder, exist_ok=True)
            torch.save(self.distiller.crcd_state_dict(), os.path.join(folder, CRCD_STATE_NAME))
        super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        # With the optimizer rather than in _load_from_checkpoint: a schedule kind only exists once
        # create_scheduler knows the number of steps, and that runs between the two.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, CRCD_STATE_NAME)
        if not os.path.isfile(path):
            _logger.warning("no %s in %s: the CRCD heads and memories start afresh", CRCD_STATE_NAME, checkpoint)
            return
        self.distiller.load_crcd_state_dict(torch.load(path, map_location=self._crcd_device, weights_only=True))

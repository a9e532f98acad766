"""Hugging Face ``transformers.Trainer`` with CRCD: swap ``Trainer`` for :class:`CRCDTrainer`, add ``teacher_model=``.

The loss is :class:`~crcd_plugin.distiller.CRCDDistiller`'s, configured by a
:class:`crcd_plugin.CRCDConfig`. This file only translates the Trainer's conventions (input dicts
and label names, optimizer groups, checkpoints, logging) onto the distiller's integration contract,
and finds the feature of standard ``*ForSequenceClassification`` / ``*ForImageClassification`` models.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from crcd_plugin import config as core
from crcd_plugin.contract import LOSS_COMPONENTS
from crcd_plugin.distiller import CRCDDistiller
from crcd_plugin.distributed import average
from crcd_plugin.fsdp import check_fsdp_integration
from crcd_plugin.integrations import require
from crcd_plugin.integrations._hf_models import CRCDConfig, EvalLoss, check_teacher, classified_token, default_head
from crcd_plugin.teacher_cache import TeacherCache

transformers = require("transformers", "hf")
from transformers import Trainer, TrainerCallback  # noqa: E402  (after require, which names the extra if missing)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # noqa: E402

__all__ = ["CRCDConfig", "CRCDTrainer", "CRCD_STATE_NAME", "classified_token", "default_head"]

_logger = logging.getLogger(__name__)

CRCD_STATE_NAME = "crcd_state.pt"
"""File, in every checkpoint folder, holding the CRCD heads, memories, NCE constants and schedule."""



class _ClearCRCDGradients(TrainerCallback):
    """Trainer clears only the model's gradients after each optimizer step; this clears the CRCD heads'."""

    def __init__(self, distiller: CRCDDistiller) -> None:
        self.distiller = distiller

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for _, param in self.distiller.crcd_named_parameters():
            param.grad = None


class CRCDTrainer(Trainer):
    """``transformers.Trainer`` whose loss is CE + KD + CRCD against a frozen teacher.

    Takes every ``Trainer`` argument unchanged, plus ``teacher_model=``, ``crcd_config=`` and the
    Trainer-side options below. Besides the loss it keeps the teacher frozen, in eval mode, on the
    student's device and outside DDP and every checkpoint; finds each model's feature
    (:func:`default_head`); adds the CRCD heads to Trainer's optimizer (with its weight-decay rules)
    and averages their gradients over ranks (``distiller.sync_gradients()``); saves the CRCD state
    as ``crcd_state.pt`` in every checkpoint and restores it on resume; returns a per-micro-batch
    mean loss that Trainer divides by the accumulation steps once (``loss_is_scaled_for_ga =
    False``); and logs the loss components, averaged over the logging interval and over ranks.
    ``model_init``, ``compute_loss_func`` and ``optimizers=`` (with CRCD heads) are not supported.

    Args:
        model: The student, a transformers classification model (or any ``nn.Module`` whose
            forward takes the batch's keyword inputs and returns ``.logits``).
        args: ``TrainingArguments``; ``label_smoothing_factor`` becomes ``config.label_smoothing``.
        *trainer_args: Further positional ``Trainer`` arguments.
        teacher_model: The trained teacher; same label set and inputs as the student. Or a
            :class:`crcd_plugin.TeacherCache` of it: no teacher runs, and batches need ``index_column``.
        crcd_config: A :class:`crcd_plugin.CRCDConfig` (the 0.2.0 ``hf.CRCDConfig`` still works);
            default ``CRCDConfig()``: KD + CRCD feature, in-batch negatives. Its schedule kind is
            spread over Trainer's optimizer steps. ``relation.negatives="bank"`` needs the
            dataset's ``index_column`` and ``TrainingArguments(remove_unused_columns=False)``.
        student_classifier: Dotted path of the student's classifier; default :func:`default_head`.
        teacher_classifier: The same for the teacher.
        feature_pool: Reduction of a classifier input that is not ``[B, D]``.
        num_samples: Bank size with ``negatives="bank"``; default ``len(train_dataset)``.
        index_column: Name of the dataset-index column for ``negatives="bank"``.
        eval_loss: What ``evaluate()`` reports as ``eval_loss``: ``"task"`` (the student's own
            loss) or ``"total"`` (the distillation loss; not with a bank, whose rows belong to the
            training set).
        **trainer_kwargs: Further ``Trainer`` keyword arguments (datasets, collator, callbacks, ...).

    Example:
        >>> trainer = CRCDTrainer(model=student, teacher_model=teacher, args=args,  # doctest: +SKIP
        ...                       train_dataset=train, crcd_config=crcd_plugin.CRCDConfig(gradient_element=True))
    """

    loss_is_scaled_for_ga = False  # a per-micro-batch mean: Trainer divides it by the accumulation steps
    distiller: CRCDDistiller
    crcd_config: core.CRCDConfig
    _index_column: str
    _eval_loss: str
    _bank: bool
    _component_sums: torch.Tensor
    _component_count: int

    def __init__(
        self,
        model: Optional[nn.Module] = None,
        args: Optional[Any] = None,
        *trainer_args: Any,
        teacher_model: Union[nn.Module, TeacherCache, None] = None,
        crcd_config: Union[core.CRCDConfig, CRCDConfig, None] = None,
        student_classifier: Optional[str] = None,
        teacher_classifier: Optional[str] = None,
        feature_pool: Optional[str] = None,
        num_samples: Optional[int] = None,
        index_column: str = "index",
        eval_loss: EvalLoss = "task",
        **trainer_kwargs: Any,
    ) -> None:
        teacher_classes = check_teacher(teacher_model, eval_loss)
        options: Dict[str, Any] = dict(student_classifier=student_classifier, teacher_classifier=teacher_classifier,
                                       feature_pool=feature_pool, num_samples=num_samples, index_column=index_column,
                                       eval_loss=eval_loss, schedule=None)
        if isinstance(crcd_config, CRCDConfig):
            crcd_config, options = crcd_config.split()
        config = core.CRCDConfig() if crcd_config is None else crcd_config
        if not isinstance(config, core.CRCDConfig):
            raise TypeError(f"crcd_config must be a crcd_plugin.CRCDConfig or None, got {type(config).__name__}")
        core.check_choice("eval_loss", options["eval_loss"], ("task", "total"))
        # A cache's rows are read by the dataset index, like a bank's.
        self._bank = config.relation.negatives == "bank" or bool(getattr(teacher_model, "needs_index", False))
        if options["eval_loss"] == "total" and self._bank:
            raise ValueError("eval_loss='total' reads the memory bank at each row's index, which belongs to the "
                             "training set: use eval_loss='task' with negatives='bank'")
        if not isinstance(options["index_column"], str) or not options["index_column"]:
            raise ValueError(f"index_column must be a column name, got {options['index_column']!r}")
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        if self.model_init is not None:
            raise ValueError("CRCDTrainer needs model= (the student), not model_init=")
        if self.compute_loss_func is not None:
            raise ValueError("CRCDTrainer computes the loss itself: compute_loss_func= is not supported")
        if len(self.label_names) != 1:
            raise ValueError(f"CRCDTrainer needs exactly one label column, got label_names={self.label_names}")
        classes = (check_teacher(self.model, eval_loss, "model"), teacher_classes)
        if None not in classes and classes[0] != classes[1]:
            raise ValueError(
                f"student and teacher must have the same classes, got num_labels {classes[0]} and {classes[1]}"
            )
        if self._bank and self.args.remove_unused_columns:
            raise ValueError(
                f"negatives='bank' and a TeacherCache need the dataset's {options['index_column']!r} column, which "
                "Trainer drops: set TrainingArguments(remove_unused_columns=False), or use negatives='queue'"
            )
        self.model_accepts_loss_kwargs = False  # our loss never reads num_items_in_batch
        self.crcd_config = config = config.replace(label_smoothing=self.args.label_smoothing_factor)
        self._index_column, self._eval_loss = options["index_column"], options["eval_loss"]
        device = self.args.device if self.place_model_on_device else next(self.model.parameters()).device
        fsdp = "accelerate's FSDP plugin" if getattr(self, "is_fsdp_enabled", False) else None
        check_fsdp_integration("hf", self.model, sharding=fsdp)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # a 0.2.0 schedule object warned above
            torch.manual_seed(self.args.seed)  # the CRCD heads start identical on every rank
            self.distiller = CRCDDistiller(
                self.model,
                teacher_model,
                options["student_classifier"] or default_head(self.model, "student_head"),
                # A model's classifier by transformers' conventions; a cache or a Teacher names its own.
                options["teacher_classifier"] or (None if hasattr(teacher_model, "classifier_path")
                                                  else default_head(teacher_model, "teacher_head")),
                config,
                num_samples=(options["num_samples"] or self._dataset_size())
                if config.relation.negatives == "bank" else None,
                schedule=options["schedule"],
                feature_pool=options["feature_pool"],
                feature_token=classified_token,
            )
        if not self.distiller.built:
            raise ValueError(
                "the CRCD heads need their feature sizes before Trainer creates the optimizer: point "
                "student_classifier= and teacher_classifier= at nn.Linear classifier heads"
            )
        for module in self.distiller.trainable_module.crcd_children().values():
            module.to(device)
        if getattr(teacher_model, "hf_device_map", None) is None:  # a model spread by accelerate stays put
            self.distiller.teacher_side.to(device)  # the model, or the device stored rows are read onto
        self._teacher_model: Union[nn.Module, TeacherCache] = teacher_model
        if self.optimizer is not None and self.distiller.crcd_named_parameters():
            raise ValueError(
                "optimizers=(...) cannot hold the CRCD heads, which CRCDTrainer creates: pass "
                "optimizer_cls_and_kwargs= instead, or override create_optimizer"
            )
        self.add_callback(_ClearCRCDGradients(self.distiller))
        self._component_sums = torch.zeros(len(LOSS_COMPONENTS), device=device)
        self._component_count = 0

    @property
    def teacher_model(self) -> Union[nn.Module, TeacherCache]:
        """The frozen teacher (or the TeacherCache given in its place)."""
        return self._teacher_model

    def _dataset_size(self) -> int:
        try:
            return len(self.train_dataset)  # type: ignore[arg-type]  # no len() raises TypeError, handled here
        except TypeError:
            raise ValueError("negatives='bank' needs the dataset size: pass num_samples= for a dataset without "
                             "len()") from None

    def compute_loss(
        self,
        model: nn.Module,
        inputs: Dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Optional[Union[torch.Tensor, int]] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, Any]]:
        """The distiller's loss in training; in evaluation the student's task loss (or see ``eval_loss``)."""
        inputs = dict(inputs)
        index = inputs.pop(self._index_column, None) if self._bank else None
        if not model.training and self._eval_loss == "task":
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
        self, model: nn.Module, inputs: Dict[str, Any], num_items_in_batch: Optional[Union[torch.Tensor, int]] = None
    ) -> torch.Tensor:
        """Trainer's step, then the CRCD heads' gradients averaged over ranks when DDP syncs the student's."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            self.distiller.sync_gradients()
        return loss

    def prediction_step(
        self, model: nn.Module, inputs: Dict[str, Any], prediction_loss_only: bool,
        ignore_keys: Optional[List[str]] = None,
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Trainer's step, without the dataset-index column, which the model does not take."""
        if self._bank:
            inputs = {k: v for k, v in inputs.items() if k != self._index_column}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        """Add the loss components, averaged since the last log and over ranks, to training logs."""
        if "loss" in logs and self._component_count:
            means = average(self._component_sums) / self._component_count
            logs.update(zip(LOSS_COMPONENTS, means.tolist()))
            self._component_sums.zero_()
            self._component_count = 0
        super().log(logs, start_time)

    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        """Trainer's optimizer, plus the CRCD heads in two groups under Trainer's weight-decay rules."""
        creating = self.optimizer is None
        optimizer = super().create_optimizer(model)
        named = self.distiller.crcd_named_parameters()
        if creating and named:
            decay = set(self.get_decay_parameter_names(self.distiller))
            for weight_decay, params in (
                (self.args.weight_decay, [p for n, p in named if n in decay]),
                (0.0, [p for n, p in named if n not in decay]),
            ):
                if params:
                    optimizer.add_param_group({"params": params, "weight_decay": weight_decay})
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Optional[torch.optim.Optimizer] = None) -> Any:
        """Trainer's LR scheduler; the CRCD schedule kind gets the same number of optimizer steps."""
        if self.distiller.schedule is None:
            self.distiller.set_total_steps(num_training_steps)
        return super().create_scheduler(num_training_steps, optimizer)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        # Written first, so that checkpoint rotation and hub pushes see a complete folder.
        if self.args.should_save:
            step_folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder = os.path.join(self._get_output_dir(trial=trial), step_folder)
            os.makedirs(folder, exist_ok=True)
            torch.save(self.distiller.crcd_state_dict(), os.path.join(folder, CRCD_STATE_NAME))
        super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        # With the optimizer: a schedule kind exists only once create_scheduler knows the steps.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, CRCD_STATE_NAME)
        if not os.path.isfile(path):
            _logger.warning("no %s in %s: the CRCD heads and memories start afresh", CRCD_STATE_NAME, checkpoint)
            return
        device = self._component_sums.device
        self.distiller.load_crcd_state_dict(torch.load(path, map_location=device, weights_only=True))

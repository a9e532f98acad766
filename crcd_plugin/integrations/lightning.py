"""PyTorch Lightning with CRCD: add ``CRCDCallback(teacher, ...)`` to ``L.Trainer(callbacks=[...])``.

The loss is :class:`~crcd_plugin.distiller.CRCDDistiller`'s. This file only translates Lightning's
conventions (the module's own ``training_step``, its optimizer, callback state, ranks); the relation
math, sampling and state live in the core. Every call into the distiller is marked ``# distiller:``.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from crcd_plugin._compat import LegacyClassifierNames, renamed_classifier_keywords
from crcd_plugin.config import CRCDConfig
from crcd_plugin.contract import LOSS_COMPONENTS
from crcd_plugin.distiller import CRCDDistiller
from crcd_plugin.fsdp import check_fsdp_integration
from crcd_plugin.hooks import PoolMode
from crcd_plugin.integrations import require
from crcd_plugin.teacher_cache import TeacherCache

require("lightning", "lightning")
import lightning.pytorch as pl  # noqa: E402  (after require, which names the extra if missing)
from lightning.pytorch.callbacks import Callback  # noqa: E402

__all__ = ["BatchFn", "CRCDCallback", "LOSS_COMPONENTS", "default_batch_fn"]

_logger = logging.getLogger(__name__)

# batch -> (input the teacher takes, target [B] or [B, C], dataset index [B] or None)
BatchFn = Callable[[Any], Tuple[Any, torch.Tensor, Optional[torch.Tensor]]]


def default_batch_fn(batch: Any) -> Tuple[Any, torch.Tensor, Optional[torch.Tensor]]:
    """Split a training batch into ``(input, target, index)``.

    ``(input, target)`` or ``(input, target, index)`` tuples/lists; or a dict with ``"labels"``
    (and optionally ``"index"``), whose other entries are the input, passed to the teacher as
    keyword arguments (the Hugging Face convention).

    Example:
        >>> x, y = torch.randn(4, 3), torch.arange(4)
        >>> default_batch_fn((x, y))[2] is None
        True
        >>> sorted(default_batch_fn({"input_ids": x, "labels": y, "index": y})[0])
        ['input_ids']
    """
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        return batch[0], batch[1], batch[2] if len(batch) == 3 else None
    if isinstance(batch, Mapping) and "labels" in batch:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "index")}
        return inputs, batch["labels"], batch.get("index")
    raise TypeError(
        "CRCDCallback reads (input, target[, index]) tuples or dicts with 'labels' (and 'index'); "
        f"got a {type(batch).__name__}: pass batch_fn=lambda batch: (input, target, index)"
    )


class CRCDCallback(LegacyClassifierNames, Callback):
    """Adds KD and CRCD to the loss an unchanged ``LightningModule.training_step`` returns.

    For the duration of ``fit`` the module's ``training_step`` is wrapped: it runs as written while
    a hook reads the input and output of the student's classifier (``student_classifier``, a dotted
    path on the LightningModule), then the teacher runs on the batch's input and
    ``task_weight * loss + w(t) * (KD + CRCD terms)`` is returned in place of ``loss``, so that
    Lightning's precision, accumulation, DDP and clipping treat the whole loss as the module's own.

    The CRCD heads join the module's optimizer as one more parameter group (the hyperparameters of
    its first group). They, the memories and the teacher live in the callback, outside the
    LightningModule: DDP never wraps or broadcasts them, and checkpoints hold the student alone plus
    the CRCD state in this callback's ``state_dict`` (restored by ``fit(ckpt_path=...)``).

    Args:
        teacher: The trained teacher (frozen, eval mode, moved to the module's device), or a
            :class:`crcd_plugin.TeacherCache` built from it: no teacher runs, and every batch must
            carry its dataset index (see :func:`default_batch_fn`).
        student_classifier: Dotted path of the student's classifier on the LightningModule (e.g.
            ``"model.fc"``); its output must be the student's logits. (Until 0.3: ``student_head``,
            deprecated; removed in 0.5.)
        teacher_classifier: Dotted path of the teacher's classifier; default ``"fc"``, or the
            cache's own. (Until 0.3: ``teacher_head``.)
        config: Loss weights, schedule (over optimizer steps) and relation options; ``None``:
            ``CRCDConfig()``.
        num_samples: Dataset size, for memory-bank negatives (batches must then carry the index).
        batch_fn: ``batch -> (input, target, index)`` for batches :func:`default_batch_fn` cannot read.
        feature_pool: Reduction of a head input that is not ``[B, D]`` (``"avg"``, ``"cls"``, ...).
        teacher_transform: Map from the student's input to the teacher's (e.g. re-normalisation).
        example_input: A batch input for a dry run when a head is not an ``nn.Linear``.
        log_prefix: Prefix of the logged component names.

    Example:
        >>> callback = CRCDCallback(teacher, student_classifier="model.fc", teacher_classifier="fc")  # doctest: +SKIP
        >>> L.Trainer(max_epochs=3, callbacks=[callback]).fit(module, train_loader)       # doctest: +SKIP
    """

    def __init__(
        self,
        teacher: Union[nn.Module, TeacherCache],
        *,
        student_classifier: Optional[str] = None,
        teacher_classifier: Optional[str] = None,
        config: Optional[CRCDConfig] = None,
        num_samples: Optional[int] = None,
        batch_fn: Optional[BatchFn] = None,
        feature_pool: Optional[PoolMode] = None,
        teacher_transform: Optional[Callable[[Any], Any]] = None,
        example_input: Optional[Any] = None,
        log_prefix: str = "",
        **renamed: Any,
    ) -> None:
        student_classifier, teacher_classifier = renamed_classifier_keywords(
            "CRCDCallback", student_classifier, teacher_classifier, renamed
        )
        if not isinstance(student_classifier, str) or not student_classifier:
            raise TypeError(
                "CRCDCallback needs student_classifier=, the dotted path of the student's classifier on the "
                f"LightningModule (e.g. 'model.fc'), got {student_classifier!r}"
            )
        if not isinstance(teacher, (nn.Module, TeacherCache)):
            raise TypeError(f"teacher must be an nn.Module or a TeacherCache, got {type(teacher).__name__}")
        if config is not None and not isinstance(config, CRCDConfig):
            raise TypeError(f"config must be a crcd_plugin.config.CRCDConfig or None, got {type(config).__name__}")
        if batch_fn is not None and not callable(batch_fn):
            raise TypeError(f"batch_fn must be a callable batch -> (input, target, index), got {batch_fn!r}")
        if isinstance(teacher, nn.Module):
            teacher.requires_grad_(False).eval()
        self.teacher = teacher
        self.student_classifier = student_classifier
        # Resolved here: the state key (which names it) stays the same for a default live teacher.
        # A cache or a Teacher names its own classifier; a model's default is "fc".
        self.teacher_classifier = teacher_classifier or getattr(teacher, "classifier_path", "fc")
        self.config = config if config is not None else CRCDConfig()
        self.num_samples = num_samples
        self.batch_fn: BatchFn = batch_fn or default_batch_fn
        self.feature_pool = feature_pool
        self.teacher_transform = teacher_transform
        self.example_input = example_input
        self.log_prefix = log_prefix
        self.distiller: Optional[CRCDDistiller] = None  # built at on_fit_start, on the module's device
        self._pending_state: Optional[Dict[str, Any]] = None
        self._wrapped: Optional[pl.LightningModule] = None

    @property
    def state_key(self) -> str:
        # The 0.3 key names, so that checkpoints written before the rename still restore.
        return self._generate_state_key(student_head=self.student_classifier, teacher_head=self.teacher_classifier)

    # ------------------------------------------------------------------ fit lifecycle
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # After configure_optimizers and the DDP wrap, before the optimizer state is restored
        # (so a resumed optimizer finds the heads' group where it was saved).
        if not pl_module.automatic_optimization:
            raise ValueError(
                "CRCDCallback adds to the loss training_step returns (automatic optimization); with "
                "manual optimization call CRCDDistiller yourself (docs/lightning.md, Fabric)"
            )
        sharding = type(trainer.strategy).__name__
        check_fsdp_integration("lightning", pl_module,
                               sharding=sharding if sharding in ("FSDPStrategy", "ModelParallelStrategy") else None)
        if self.distiller is not None and self._pending_state is None:
            self._pending_state = self.distiller.crcd_state_dict()  # a second fit continues the state
        if isinstance(self.teacher, nn.Module):
            self.teacher.to(pl_module.device)  # a cache's reader moves with the distiller below
        # The schedule's length in optimizer steps (only read when there is a schedule).
        relation = self.config.relation
        if relation.resolved_negatives(self.num_samples) == "bank" and self.num_samples is None:
            raise ValueError("memory-bank negatives need the dataset size: pass num_samples= to CRCDCallback")
        total_steps = None if self.config.schedule == "constant" else int(trainer.estimated_stepping_batches)
        self.distiller = CRCDDistiller(  # distiller: built with the LightningModule as the student
            pl_module, self.teacher, self.student_classifier, self.teacher_classifier, self.config,
            num_samples=self.num_samples, total_steps=total_steps, feature_pool=self.feature_pool,
            teacher_transform=self.teacher_transform, example_input=self.example_input,
        ).to(pl_module.device)
        if self._pending_state is not None:
            self.distiller.load_crcd_state_dict(self._pending_state)  # distiller: CRCD state
            self._pending_state = None
        self._add_heads_to_optimizer(trainer)
        self._wrap_training_step(pl_module)

    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        # The schedule counts optimizer steps, so accumulation does not stretch it.
        self._distiller().set_progress(trainer.global_step)  # distiller: schedule progress

    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: torch.optim.Optimizer
    ) -> None:
        # DDP averages the module's gradients only; the heads live outside it (once per step,
        # after accumulation, before clipping). distill(student_synced=True) told the distiller that
        # Lightning's strategy syncs the module, so only the heads are averaged here.
        self._distiller().sync_gradients()  # distiller: gradient sync (a no-op in one process)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._unwrap_training_step()

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._unwrap_training_step()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """``{"crcd": ...}``: the CRCD heads, memories, NCE constants and schedule (no model weights)."""
        if self.distiller is None:
            return {} if self._pending_state is None else {"crcd": self._pending_state}
        return {"crcd": self.distiller.crcd_state_dict()}  # distiller: CRCD state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Keep the CRCD state for ``on_fit_start`` (Lightning loads callbacks before the distiller exists)."""
        state = state_dict.get("crcd")
        if state is None:
            _logger.warning("the checkpoint holds no CRCD state: the CRCD heads and memories start fresh")
        elif self.distiller is not None:
            self.distiller.load_crcd_state_dict(state)  # distiller: CRCD state
        else:
            self._pending_state = dict(state)

    # ------------------------------------------------------------------ translation
    def _distiller(self) -> CRCDDistiller:
        assert self.distiller is not None, "CRCDCallback builds its distiller at on_fit_start"
        return self.distiller

    def _add_heads_to_optimizer(self, trainer: "pl.Trainer") -> None:
        parameters = [param for _, param in self._distiller().crcd_named_parameters()]  # distiller: the heads
        if not parameters:
            return
        if not trainer.optimizers:
            raise ValueError("CRCDCallback trains the CRCD heads in the module's optimizer; there is none")
        optimizer = trainer.optimizers[0]
        groups = len(optimizer.param_groups)
        group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        optimizer.add_param_group({**group, "params": parameters})
        # LR schedulers keep per-group lists (base_lrs, lr_lambdas, min_lrs, ...) sized at creation:
        # the new group follows group 0's entry.
        for config in trainer.lr_scheduler_configs:
            if getattr(config.scheduler, "optimizer", None) is optimizer:
                for value in vars(config.scheduler).values():
                    if isinstance(value, list) and len(value) == groups:
                        value.append(value[0])

    def _wrap_training_step(self, pl_module: "pl.LightningModule") -> None:
        self._unwrap_training_step()
        step = pl_module.training_step

        @functools.wraps(step)
        def training_step(batch: Any, *args: Any, **kwargs: Any) -> Any:
            with self._distiller().capture_student() as store:  # distiller: its own student hooks
                output = step(batch, *args, **kwargs)
                captured = dict(store)
            if output is None:  # the module skips this batch
                return None
            return self._add_distillation(pl_module, batch, output, captured)

        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._wrapped = pl_module

    def _unwrap_training_step(self) -> None:
        if self._wrapped is not None:
            self._wrapped.__dict__.pop("training_step", None)  # back to the class's method
            self._wrapped = None

    def _add_distillation(
        self, pl_module: "pl.LightningModule", batch: Any, output: Any, captured: Dict[str, torch.Tensor]
    ) -> Any:
        task_loss = output.get("loss") if isinstance(output, Mapping) else output
        if not isinstance(task_loss, torch.Tensor):
            raise TypeError(
                "CRCDCallback needs training_step to return the task loss (a tensor, or a dict with 'loss'), "
                f"got {type(output).__name__}"
            )
        if len(captured) != 2:
            raise ValueError(
                f"the student classifier {self.student_classifier!r} did not run during training_step: "
                "student_classifier is a dotted path on the LightningModule (e.g. 'model.fc')"
            )
        input, target, index = self.batch_fn(batch)
        terms = self._distiller().distill(  # distiller: teacher, KD, CRCD, w(t) on the captured student
            captured["feature"], captured["head_logits"], captured["head_logits"], input, target, index,
            student_synced=True,  # the strategy's DDP, which the distiller cannot see, syncs the module
        )
        loss = self.config.task_weight * task_loss + terms["distill_loss"]
        components = {"task_loss": task_loss, **{k: terms[k] for k in LOSS_COMPONENTS[1:]}}
        for name, value in components.items():
            pl_module.log(self.log_prefix + name, value.detach().float(), batch_size=target.shape[0])
        return {**output, "loss": loss} if isinstance(output, Mapping) else loss


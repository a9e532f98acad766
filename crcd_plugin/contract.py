"""The integration contract of :class:`~crcd_plugin.CRCDDistiller`: what trainers use, and nothing else.

:class:`CRCDTrainableModule` (student + CRCD state, for the optimizer and an EMA), the shape-checked
CRCD state dicts, and :class:`DistillerContract`, the distiller's base: distributed plumbing
(wrapping the student only, gradient sync for what DDP does not average), state and progress
(docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, ContextManager, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ._checks import check_positive_int
from .config import CRCDConfig
from .distributed import average_gradients, broadcast_state, world_size
from .fsdp import clear_dtensor_caches, is_fully_sharded, is_sharded_parameter, reshard, student_gradient_sync
from .hooks import unwrap_model
from .loss import CRCDLoss
from .schedule import DistillSchedule

# The loss components a step reports beside `loss`, as every integration logs them.
LOSS_COMPONENTS: Tuple[str, ...] = ("task_loss", "kd_loss", "crcd_feature_loss", "crcd_gradient_loss")

__all__ = ["CRCDTrainableModule", "DistillerContract"]

_MODEL_PREFIXES = ("student.", "teacher.")
# The CRCD children of the distiller (and of its trainable module): what crcd_state_dict() holds.
_CRCD_CHILDREN = ("crcd_feature", "crcd_gradient", "schedule")
_DDP = nn.parallel.DistributedDataParallel


class CRCDTrainableModule(nn.Module):
    """What trains: the student plus the CRCD state (embedding heads, memories, NCE constants, schedule).

    Give it to the optimizer or an EMA (``CRCDDistiller.trainable_module``); it shares its
    submodules with the distiller, which runs the step, and follows it when the CRCD losses are
    built later or the student is wrapped. Calling it returns the student's output. Its CRCD
    parameters and buffers are listed in ``_ddp_params_and_buffers_to_ignore``: should DDP wrap
    this module, it still never broadcasts the memories (they are kept identical by the loss's own
    gathers) nor averages the heads, whose gradients :meth:`CRCDDistiller.sync_gradients` averages.

    Args:
        distiller: The distiller whose student and CRCD state it holds.
    """

    _ddp_params_and_buffers_to_ignore: List[str]

    def __init__(self, distiller: "DistillerContract") -> None:
        super().__init__()
        self.refresh(distiller)
        distiller._trainables.append(weakref.ref(self))

    def refresh(self, distiller: "DistillerContract") -> None:
        """Point at the distiller's current student and CRCD modules."""
        self.student = distiller.student
        for name in _CRCD_CHILDREN:
            setattr(self, name, getattr(distiller, name))
        self._ddp_params_and_buffers_to_ignore = [
            f"{name}.{key}"
            for name in _CRCD_CHILDREN
            if getattr(self, name) is not None
            for key, _ in (*getattr(self, name).named_parameters(), *getattr(self, name).named_buffers())
        ]

    def forward(self, input: Any) -> Any:
        return self.student(**input) if isinstance(input, Mapping) else self.student(input)

    def crcd_children(self) -> Dict[str, nn.Module]:
        """The CRCD submodules by name (everything but the student)."""
        return {name: module for name, module in self.named_children() if name != "student"}

    def crcd_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the CRCD embedding heads."""
        for module in self.crcd_children().values():
            yield from module.parameters()

    def crcd_state_dict(self) -> Dict[str, torch.Tensor]:
        """CRCD heads, memories, NCE constants and schedule progress (the student excluded)."""
        return _crcd_state(self)

    def load_crcd_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Load what :meth:`crcd_state_dict` returned; see :meth:`CRCDDistiller.load_crcd_state_dict`."""
        _load_crcd_state(self, self.crcd_state_dict(), state, strict)


def _crcd_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value
        for name in _CRCD_CHILDREN
        if getattr(module, name, None) is not None
        for key, value in getattr(module, name).state_dict().items()
    }


def _load_crcd_state(module: nn.Module, current: Mapping[str, torch.Tensor], state: Any, strict: bool) -> None:
    """Check ``state`` whole against ``current`` (keys and shapes), then load it into ``module``."""
    if not isinstance(state, Mapping):
        raise TypeError(f"a CRCD state must be a dict of tensors, got {type(state).__name__}")
    # Keys older checkpoints hold that this state has no place for (a one-sided loss's student-side memory).
    unread = tuple(prefix for name in _CRCD_CHILDREN if isinstance(getattr(module, name, None), CRCDLoss)
                   for prefix in getattr(module, name).unread_state_prefixes(f"{name}."))
    state = {k: v for k, v in state.items() if not k.startswith(unread)} if unread else state
    model_keys = [k for k in state if k.startswith(_MODEL_PREFIXES)]
    if model_keys:
        raise ValueError(f"a CRCD state dict holds no model weights, got keys {model_keys[:3]} ...")
    missing, unexpected = sorted(set(current) - set(state)), sorted(set(state) - set(current))
    if strict and (missing or unexpected):
        raise ValueError(
            "CRCD state does not match these options (same gradient_element, feature_weight > 0, schedule, "
            f"negatives?): missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key in sorted(set(current) & set(state)):
        value = state[key]
        if not isinstance(value, torch.Tensor) or value.shape != current[key].shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"CRCD state {key!r} has shape {got}, this task expects {tuple(current[key].shape)} "
                "(a checkpoint made with another embed_dim, num_samples or queue_size?)"
            )
    # Checked above: strict=False only skips the model keys and what the caller let pass.
    module.load_state_dict({k: v for k, v in state.items() if k in current}, strict=False)


class DistillerContract(nn.Module):
    """The contract half of :class:`~crcd_plugin.CRCDDistiller` (which subclasses it).

    It reads the distiller's ``student``, ``config``, ``crcd_feature``, ``crcd_gradient``,
    ``schedule`` and ``warmup_progress``; the distiller sets them.
    """

    student: nn.Module
    config: CRCDConfig
    crcd_feature: Optional[CRCDLoss]
    crcd_gradient: Optional[CRCDLoss]
    schedule: Optional[DistillSchedule]
    warmup_progress: torch.Tensor

    @property
    def teacher_cache(self) -> Optional[Any]:
        """The :class:`~crcd_plugin.TeacherCache` read in the teacher's place, else ``None``."""
        return getattr(self.__dict__.get("teacher_side"), "cache", None)

    @contextlib.contextmanager
    def capture_student(self) -> Iterator[Dict[str, torch.Tensor]]:
        """Arm the distiller's own student hooks (registered once) for a forward a trainer runs itself.

        Inside the block the yielded store gets ``"feature"`` (the classifier's input) and
        ``"head_logits"`` (its output) of the student's forward; hand them to
        :meth:`~crcd_plugin.CRCDDistiller.distill`. The store is emptied on leaving the block.

        Example:
            >>> with distiller.capture_student() as captured:  # doctest: +SKIP
            ...     loss = module.training_step(batch)
            ...     feature, logits = captured["feature"], captured["head_logits"]
        """
        with self.__dict__["_capture"].recording() as captured:
            yield captured

    def __init__(self) -> None:
        super().__init__()
        self._student_synced_by_ddp = False
        self._auto_sync: Optional[List[Any]] = None
        self._skip_sync = False
        self._trainables: List["weakref.ReferenceType[CRCDTrainableModule]"] = []

    # ------------------------------------------------------------------ integration contract
    @property
    def trainable_module(self) -> CRCDTrainableModule:
        """What trains (student + CRCD state), for the optimizer and an EMA; made once, kept current."""
        for ref in self._trainables:
            module = ref()
            if type(module) is CRCDTrainableModule:
                return module
        module = CRCDTrainableModule(self)
        # Held outside nn.Module's registry: it is a view of the distiller, not a part of its state.
        self.__dict__["_own_trainable"] = module
        return module

    def _refresh_trainables(self) -> None:
        self._trainables = [ref for ref in self._trainables if ref() is not None]
        for ref in self._trainables:
            module = ref()
            if module is not None:
                module.refresh(self)

    def crcd_named_parameters(self) -> List[Tuple[str, nn.Parameter]]:
        """Trainable CRCD parameters (the embedding heads) with their names in :meth:`crcd_state_dict`."""
        return [
            (f"{name}.{key}", param)
            for name in _CRCD_CHILDREN
            if getattr(self, name) is not None
            for key, param in getattr(self, name).named_parameters()
            if param.requires_grad
        ]

    def student_state_dict(self) -> Dict[str, Any]:
        """The student's own ``state_dict`` (no wrapper prefixes, no teacher, no CRCD state): what to export."""
        return unwrap_model(self.student).state_dict()

    def crcd_state_dict(self) -> Dict[str, Any]:
        """State of the CRCD heads, memories and schedule (everything but the two models)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(_MODEL_PREFIXES)}

    def load_crcd_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Load what :meth:`crcd_state_dict` returned (the models are untouched); checked whole first.

        Args:
            state_dict: CRCD heads, memories and schedule state, as saved by :meth:`crcd_state_dict`
                (0.2.0 checkpoints load too).
            strict: Whether missing or unexpected keys are errors; shapes must always match.

        Raises:
            TypeError: If ``state_dict`` is not a mapping.
            ValueError: On model keys, on missing or unexpected keys (``strict``), or on a shape
                mismatch; the message names the key, the shape expected and the shape given.
                Nothing is loaded then.
        """
        _load_crcd_state(self, self.crcd_state_dict(), state_dict, strict)

    def set_progress(self, step: int) -> None:
        """Advance the distillation schedule to ``step`` (no-op without a schedule)."""
        if self.schedule is not None:
            self.schedule.set_progress(step)

    def set_total_steps(self, total_steps: int) -> None:
        """Set the run length of ``config.schedule`` (in the unit of :meth:`set_progress`).

        Creates the :class:`DistillSchedule` (no-op for ``"constant"``); a schedule that already
        exists keeps its progress. Integrations call it once they know the number of steps.
        """
        check_positive_int("total_steps", total_steps)
        config = self.config
        if config.schedule == "constant":
            return
        progress = self.schedule.progress if self.schedule is not None else None
        device = self.warmup_progress.device if hasattr(self, "warmup_progress") else None
        schedule = DistillSchedule(total_steps, config.schedule, config.schedule_until, config.schedule_start)
        if progress is not None:
            schedule.set_progress(int(progress))
        self.schedule = schedule.to(device)
        if hasattr(self, "_trainables"):
            self._refresh_trainables()

    def set_backend(self, backend: str) -> None:
        """Switch the relation kernel (``RelationConfig.backend``) of every CRCD loss, built or not.

        For example ``"compile"`` once the models are compiled (what the timm task's ``compile()``
        does). The config follows (``config.relation``, and ``config.gradient_relation`` where set),
        so a loss built later and a checkpoint's config agree; values and state are unchanged.
        """
        relation = self.config.relation.replace(backend=backend)  # checks the name
        gradient = self.config.gradient_relation
        self.config = self.config.replace(
            relation=relation, gradient_relation=None if gradient is None else gradient.replace(backend=backend)
        )
        for loss in (self.crcd_feature, self.crcd_gradient):
            if loss is not None:
                loss.backend = backend

    def prepare_distributed(self, device_ids: Optional[Sequence[int]] = None, **ddp_kwargs: Any) -> "DistillerContract":
        """Wrap the student in ``DistributedDataParallel`` and give every rank rank 0's CRCD state.

        Call once after ``torch.distributed.init_process_group`` and after moving the distiller to
        its device, before creating the optimizer. The teacher is never wrapped (it is frozen);
        the CRCD heads and memories stay outside DDP, so DDP never broadcasts them (their memories
        are kept identical by the loss's own gathers, a sharded bank keeps its own rows); their
        gradients are averaged by :meth:`sync_gradients`. A student that is already DDP-wrapped
        (e.g. by ``accelerator.prepare``) is kept as it is. No-op when not distributed.

        Args:
            device_ids: ``DistributedDataParallel``'s ``device_ids`` (``[local_rank]`` on GPUs,
                ``None`` on CPU).
            **ddp_kwargs: Passed to ``DistributedDataParallel`` (``find_unused_parameters``, ...).

        Returns:
            ``self``.
        """
        if world_size() == 1:
            return self
        trainable = any(p.requires_grad for p in self.student.parameters())
        # An FSDP2 student (fully_shard) reduces its own gradients: it is never wrapped in DDP.
        if trainable and not isinstance(self.student, _DDP) and not is_fully_sharded(self.student):
            self.student = _DDP(
                self.student, device_ids=list(device_ids) if device_ids is not None else None, **ddp_kwargs
            )
        self._check_no_crcd_state_in(self.student)
        reshard(self.student)  # an optimizer made next must see FSDP2's sharded parameters
        for loss in (self.crcd_feature, self.crcd_gradient):
            if loss is not None:
                broadcast_state(loss)
        self._refresh_trainables()
        return self

    def release_distributed(self) -> "DistillerContract":
        """Unwrap the student from ``DistributedDataParallel``: call it before ``destroy_process_group()``.

        The DDP wrapper's reducer holds the process group. While the distiller keeps the wrapper,
        ``destroy_process_group()`` cannot free the group, and gloo's worker threads outlive it; a
        worker that drops a finished collective's tensors while the interpreter shuts down aborts
        the process. Unwrapped, the group is freed inside ``destroy_process_group()``, which waits
        for those threads. The student keeps its weights; :attr:`trainable_module` follows. A
        wrapper someone else also holds (``accelerator.prepare``) is only dropped by the distiller.
        Under FSDP2 it also empties DTensor's caches, which hold the device mesh and so the group;
        the sharded models hold it too, until they are collected (docs/distributed.md, "FSDP2").

        Returns:
            ``self``.

        Example:
            >>> distiller.release_distributed()  # doctest: +SKIP
            >>> torch.distributed.destroy_process_group()  # doctest: +SKIP
        """
        if isinstance(self.student, _DDP):
            self.student = self.student.module
            self._student_synced_by_ddp = False
            self._refresh_trainables()
        clear_dtensor_caches()  # FSDP2: DTensor's caches hold the device mesh, and so the group
        return self

    def _check_no_crcd_state_in(self, wrapper: nn.Module) -> None:
        """Enforce the rule: no CRCD module inside a DDP wrapper (its buffer broadcast would overwrite memories)."""
        if isinstance(wrapper, _DDP):
            inner = set(map(id, wrapper.module.modules()))
            if any(id(loss) in inner for loss in (self.crcd_feature, self.crcd_gradient) if loss is not None):
                raise ValueError("the CRCD losses must stay outside DistributedDataParallel; wrap the student only")

    def _unsynced_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters no DDP wrapper averages: the CRCD heads, and the student if it ran unwrapped."""
        yield from (param for _, param in self.crcd_named_parameters())
        if not (self._student_synced_by_ddp or isinstance(self.student, _DDP)):
            # FSDP2's parameters (DTensors) are reduce-scattered by FSDP2 itself.
            yield from (p for p in unwrap_model(self.student).parameters()
                        if p.requires_grad and not is_sharded_parameter(p))

    def sync_gradients(self) -> None:
        """Average over ranks the gradients DDP does not: the CRCD heads' (and an unwrapped student's).

        Call after ``backward()`` and before ``optimizer.step()`` (with gradient accumulation, once
        before the step suffices). One flat ``all_reduce`` per dtype (the bucketing of
        :func:`crcd_plugin.distributed.average_gradients`); no-op when not distributed, so a loop
        can call it always. Every rank must call it the same number of times.
        """
        average_gradients(self._unsynced_parameters())

    def sync_gradients_in_backward(self) -> "DistillerContract":
        """Call :meth:`sync_gradients` at the end of every backward that reaches the CRCD heads.

        For loops that cannot call it themselves (timm's): one callback queued on the autograd
        engine by the first head gradient of a backward, so it runs once, after every gradient
        is accumulated, as DDP's own reduction does. Skipped inside :meth:`no_sync`. No-op when
        not distributed; calling it again changes nothing.

        Returns:
            ``self``.
        """
        if world_size() == 1 or self._auto_sync is not None:
            return self
        queued = [False]
        # The hooks live on the distiller's own parameters: a strong reference back would make a
        # cycle that keeps the distiller (and its DDP wrapper, and so the process group) alive
        # until the garbage collector runs, possibly only at interpreter exit.
        owner = weakref.ref(self)

        def after_backward() -> None:
            queued[0] = False
            distiller = owner()
            if distiller is not None:
                distiller.sync_gradients()

        def on_gradient(_: torch.Tensor) -> None:
            distiller = owner()
            if distiller is not None and not queued[0] and not distiller._skip_sync:
                queued[0] = True
                torch.autograd.Variable._execution_engine.queue_callback(after_backward)

        self._auto_sync = [param.register_post_accumulate_grad_hook(on_gradient)
                           for _, param in self.crcd_named_parameters()]
        return self

    @contextlib.contextmanager
    def _no_sync(self) -> Iterator[None]:
        skip, self._skip_sync = self._skip_sync, True
        try:
            student = self.student
            with student.no_sync() if isinstance(student, _DDP) else student_gradient_sync(student, False):
                yield
        finally:
            self._skip_sync = skip

    def no_sync(self) -> ContextManager[None]:
        """The student's ``DistributedDataParallel.no_sync()`` (and no in-backward CRCD sync) for accumulation.

        Run the micro-batches but the last inside it, then call :meth:`sync_gradients` before the
        optimizer step. Memory and queue updates still gather every rank's rows on each micro-batch
        (they are forward-time collectives).
        """
        return self._no_sync()

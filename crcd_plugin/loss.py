"""``CRCDLoss``: embedding heads, one source of negatives per side, and the relation objective."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn
from typing_extensions import Unpack

from crcd_plugin._checks import check_positive_int
from crcd_plugin._compat import LegacyLossKeywords, legacy_attribute, legacy_relation_config
from crcd_plugin.config import RelationConfig
from crcd_plugin.distributed import average
from crcd_plugin.heads import EmbedHead
from crcd_plugin.negatives import NegativeSource, SourceSpec, Step, build_sources
from crcd_plugin.relation_loss import relation_loss, resolve_backend


class CRCDLoss(nn.Module):
    """Complementary relation contrastive loss between a student and a teacher feature.

    Each student embedding ``v_i`` is described by its relations ``normalize(v_i - a_j + eps)`` to
    anchors ``a_j`` from the teacher's side; the loss makes it agree with the teacher's relation of
    the same sample (the positive) and disagree with the teacher's relations of other samples (the
    negatives). The teacher side is the mirror image (``symmetric``). With ``anchored=False`` the
    relations are dropped and the loss is CRD. Every option is a field of
    :class:`~crcd_plugin.config.RelationConfig`, where the defaults are decided.

    Where each side's anchors and candidates come from is a source of negatives
    (:mod:`crcd_plugin.negatives`): ``"bank"`` (one memory row per training sample; needs
    ``num_samples`` and ``index``), ``"queue"`` (the last ``queue_size`` embeddings) or
    ``"batch"`` (the other samples), or a :class:`~crcd_plugin.negatives.NegativeSource` of your
    own. ``memory_teacher`` is the student side's source (the teacher's rows), ``memory_student``
    the teacher side's; a one-sided loss (``symmetric=False``, the default) reads no student rows
    and has no ``memory_student`` (``None``), in memory or in its ``state_dict``. Sources are
    written, and NCE's constant ``Z`` is fixed, in training mode only; under ``torch.distributed``
    every rank applies every rank's rows and the mean ``Z``.

    The teacher feature is a constant; gradients reach the student feature and both embedding
    heads (the teacher head through the teacher-side loss, or with ``train_teacher_embedding``
    through the current teacher embeddings). Heads and loss run in fp32, also under autocast.
    Input checks: shapes, dtypes and devices always; values (finite embeddings, index range) raise
    a ``ValueError`` on CPU and are device-side asserts on accelerators, so ``forward`` never waits
    for the device (``on_nonfinite="skip"`` and ``check_index=False`` turn them off).

    Args:
        student_dim: Student feature size ``Ds``.
        teacher_dim: Teacher feature size ``Dt``.
        config: The loss's options (``None``: ``RelationConfig()``).
        negatives: A source name (overrides ``config.negatives``), a ready source (the teacher
            side gets a copy) or a ``(student side, teacher side)`` pair of sources.
        num_samples: Training-set size ``N``, for a memory bank.
        **legacy_keywords: 0.2.0's keywords (``embed_dim``, ``head``, ``preset``, ...): deprecated,
            mapped onto ``config`` with a ``DeprecationWarning``.

    Shape:
        student_feat ``[B, Ds]``, teacher_feat ``[B, Dt]``, index ``[B]`` -> scalar (the sum of
        the two sides, each averaged over its ``B * A`` relation rows).

    Example:
        >>> crcd = CRCDLoss(64, 256, RelationConfig(num_negatives=50), num_samples=1000)
        >>> loss = crcd(torch.randn(8, 64), torch.randn(8, 256), index=torch.arange(8))
        >>> loss.shape, sorted(crcd.forward_parts(torch.randn(8, 64), torch.randn(8, 256), torch.arange(8)))
        (torch.Size([]), ['loss', 'student_loss', 'teacher_loss'])
    """

    memory_student: Optional[NegativeSource]
    memory_teacher: NegativeSource
    log_z: torch.Tensor
    z_ready: torch.Tensor

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        config: Optional[RelationConfig] = None,
        *,
        negatives: SourceSpec = None,
        num_samples: Optional[int] = None,
        **legacy_keywords: Unpack[LegacyLossKeywords],
    ) -> None:
        super().__init__()
        config = legacy_relation_config(config, legacy_keywords)
        for name, value in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
            check_positive_int(name, value)
        if num_samples is not None:
            check_positive_int("num_samples", num_samples)
        self.config, self.student_dim, self.teacher_dim = config, student_dim, teacher_dim
        self.embed_student = EmbedHead(student_dim, config.embed_dim, config.embed_head, config.embed_hidden_dim)
        self.embed_teacher = EmbedHead(teacher_dim, config.embed_dim, config.embed_head, config.embed_hidden_dim)
        # The student side is scored against the teacher's rows, and the teacher side the other way.
        teacher_rows, student_rows = build_sources(negatives, config, num_samples, both_sides=config.symmetric)
        self.memory_teacher = teacher_rows
        self.add_module("memory_student", student_rows if config.symmetric else None)
        self.negatives, self.objective = self.memory_teacher.kind, config.resolved_objective(self.memory_teacher.kind)
        self.register_buffer("log_z", torch.zeros(2))  # NCE's log Z: [student side, teacher side]
        self.register_buffer("z_ready", torch.zeros(2, dtype=torch.bool))

    def __getattr__(self, name: str) -> Any:
        try:  # 0.2.0's option attributes (crcd.num_anchors, crcd.memory_init, ...)
            return legacy_attribute(self.__dict__["config"], self._modules["memory_teacher"], name)
        except (AttributeError, KeyError):
            return super().__getattr__(name)

    @property
    def backend(self) -> str:
        """The relation kernel (``config.backend``); settable, e.g. to ``"compile"`` after construction."""
        return self.config.backend

    @backend.setter
    def backend(self, value: str) -> None:
        self.config = self.config.replace(backend=value)

    def forward(
        self,
        student_feat: torch.Tensor,
        teacher_feat: torch.Tensor,
        index: Optional[torch.Tensor] = None,
        **legacy: bool,
    ) -> torch.Tensor:
        """The loss (a scalar); in training mode, writes the sources and fixes NCE's constant.

        ``student_feat [B, Ds]`` (gradients flow into it), ``teacher_feat [B, Dt]`` (detached here),
        ``index [B]`` integer dataset indices (required by a memory bank).
        """
        if legacy.pop("return_parts", False):
            warnings.warn("CRCDLoss(..., return_parts=True) is deprecated; call forward_parts", DeprecationWarning, 2)
            return self.forward_parts(student_feat, teacher_feat, index)  # type: ignore[return-value]
        if legacy:
            raise TypeError(f"CRCDLoss.forward got unexpected keyword arguments {sorted(legacy)}")
        return self.forward_parts(student_feat, teacher_feat, index)["loss"]

    def forward_parts(
        self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, index: Optional[torch.Tensor] = None
    ) -> Dict[str, torch.Tensor]:
        """Like ``forward``, the loss with its parts: ``{"loss", "student_loss", "teacher_loss"}``
        (``teacher_loss`` is zero when ``symmetric=False``)."""
        config = self.config
        index = self._check_inputs(student_feat, teacher_feat, index)
        student_emb = self._embed(self.embed_student, student_feat)  # [B, d]
        teacher_emb = self._embed(self.embed_teacher, teacher_feat.detach())  # [B, d]
        finite = torch.isfinite(student_emb).all(-1) & torch.isfinite(teacher_emb).all(-1)  # [B]
        self._check_values(finite, index)
        device = self.log_z.device
        mask = config.anchored and config.self_anchor == "mask"
        step = self.memory_teacher.prepare(Step(index, self._anchor_positions(student_emb.shape[0]), mask))
        backend = resolve_backend(config.backend, device)
        options = dict(temperature=config.temperature, eps=config.eps, objective=self.objective)
        sides = [(student_emb, teacher_emb, self.memory_teacher)]
        if self.memory_student is not None:  # symmetric
            sides.append((teacher_emb, student_emb, self.memory_student))
        losses, new_log_z = [], []
        for side, (query, other, source) in enumerate(sides):
            current = side == 0 and config.train_teacher_embedding
            side_step = dataclasses.replace(step, current_rows=current)
            record = source.candidates(other if current else other.detach(), side_step)
            with torch.autocast(device_type=device.type, enabled=False):
                loss, log_z = relation_loss(
                    backend, query, record.anchors if config.anchored else None, record.candidates, record.positives,
                    self.log_z[side], self.z_ready[side], record.mask, record.positive_mask,
                    noise_size=source.noise_size, chunk_size=config.chunk_size, **options,  # type: ignore[arg-type]
                )
            losses.append(loss)
            new_log_z.append(log_z)
        if self.training:
            self._write(student_emb.detach(), teacher_emb.detach(), index, finite, first_write=False)
            if self.objective == "nce":
                self.log_z[: len(sides)].copy_(average(torch.stack(new_log_z).detach()))
                self.z_ready[: len(sides)] |= torch.isfinite(self.log_z[: len(sides)])
        teacher_loss = losses[1] if config.symmetric else torch.zeros_like(losses[0])
        return {"loss": losses[0] + teacher_loss, "student_loss": losses[0], "teacher_loss": teacher_loss}

    @torch.no_grad()
    def fill_memory(
        self, student_feat: Optional[torch.Tensor], teacher_feat: torch.Tensor, index: Optional[torch.Tensor] = None
    ) -> None:
        """Write one batch's embeddings into the memories, as first writes, without a loss.

        A warm-up pass before training (``CRCDDistiller.fill_memory``) gives every bank row a real
        embedding, so negatives come from the whole set from the first step: bank rows are
        overwritten and marked written, a queue enqueues. Either mode; never touches ``Z``; under
        DDP writes the rows of all ranks. ``ValueError`` for an in-batch source and bad inputs.

        Args:
            student_feat: ``[B, Ds]`` student features; ``None`` writes the teacher's rows alone
                (``memory_teacher``, e.g. from a teacher cache before any student ran).
            teacher_feat: ``[B, Dt]`` teacher features.
            index: ``[B]`` dataset indices; required by a memory bank.

        Example:
            >>> crcd = CRCDLoss(64, 256, RelationConfig(num_negatives=50), num_samples=1000)
            >>> crcd.fill_memory(torch.randn(8, 64), torch.randn(8, 256), index=torch.arange(8))
            >>> crcd.memory_teacher.seen[:10].tolist()
            [True, True, True, True, True, True, True, True, False, False]
        """
        if not self.memory_teacher.stores_rows:
            raise ValueError(f'negatives="{self.negatives}" keeps no memory to fill; use "bank" or "queue"')
        index = self._check_inputs(student_feat, teacher_feat, index, relations=False)
        teacher_emb, student_emb = self._embed(self.embed_teacher, teacher_feat), None
        finite = torch.isfinite(teacher_emb).all(-1)
        if student_feat is not None:
            student_emb = self._embed(self.embed_student, student_feat)
            finite &= torch.isfinite(student_emb).all(-1)
        self._check_values(finite, index)
        self._write(student_emb, teacher_emb, index, finite, first_write=True, student=student_emb is not None)

    def _embed(self, head: nn.Module, feat: torch.Tensor) -> torch.Tensor:
        # In the module's dtype (fp32 unless converted), outside autocast: fp16/bf16 features are upcast.
        with torch.autocast(device_type=self.log_z.device.type, enabled=False):
            return head(feat.to(self.log_z.dtype))

    def _anchor_positions(self, batch: int) -> torch.Tensor:
        num_anchors, device = self.config.num_anchors, self.log_z.device
        if num_anchors is None or num_anchors >= batch:
            return torch.arange(batch, device=device)
        return torch.randperm(batch, device=device)[:num_anchors]

    @torch.no_grad()
    def _write(self, student_emb, teacher_emb, index, finite, first_write: bool, student: Optional[bool] = None):
        self.memory_teacher.write_rows(teacher_emb, index, finite, first_write)
        # One-sided (symmetric=False) there is no student-side memory: nothing would read it.
        if self.memory_student is not None and (student is None or student):
            self.memory_student.write_rows(student_emb, index, finite, first_write)

    def unread_state_prefixes(self, prefix: str = "") -> Tuple[str, ...]:
        """Keys of older checkpoints this loss has no place for and ignores on load: the student-side
        memory a one-sided loss saved before 0.4 (nothing ever read it)."""
        return () if self.memory_student is not None else (f"{prefix}memory_student.",)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for key in [k for k in state_dict if k.startswith(self.unread_state_prefixes(prefix))]:
            del state_dict[key]  # a 0.3 one-sided checkpoint: its student-side memory was never read
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_inputs(
        self, student_feat: Any, teacher_feat: Any, index: Optional[torch.Tensor], relations: bool = True
    ) -> Optional[torch.Tensor]:
        """Shape, dtype and device checks, which need no device sync (``relations=False``, for
        ``fill_memory``: a batch of one, or no student batch, is fine). Returns ``index`` as int64
        where the source needs it."""
        device, source = self.log_z.device, self.memory_teacher
        features = [("student_feat", student_feat, self.student_dim), ("teacher_feat", teacher_feat, self.teacher_dim)]
        teacher_alone = student_feat is None and not relations
        for name, value, dim in features[1:] if teacher_alone else features:
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
            if not value.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
            if value.ndim != 2 or value.shape[1] != dim:
                raise ValueError(f"{name} must have shape [B, {dim}], got {list(value.shape)}")
            if value.device != device:
                raise ValueError(f"{name} is on {value.device} but the loss is on {device}; move one with .to()")
        batch = teacher_feat.shape[0] if teacher_alone else student_feat.shape[0]
        if teacher_feat.shape[0] != batch:
            raise ValueError(
                f"student_feat and teacher_feat must have the same batch size, got {batch} and {teacher_feat.shape[0]}"
            )
        if relations and batch < max(source.min_batch, 2 if self.config.anchored else 1):
            raise ValueError(f"relations need at least two samples per batch, got a batch of {batch}")
        source.check_batch(batch)
        if not source.needs_index:
            return None
        if index is None:
            raise ValueError(f'negatives="{self.negatives}" needs index (the dataset indices of the batch)')
        if not isinstance(index, torch.Tensor):
            raise TypeError(f"index must be a torch.Tensor, got {type(index).__name__}")
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise TypeError(f"index must be an integer tensor, got dtype {index.dtype}")
        if index.shape != (batch,):
            raise ValueError(f"index must have shape [{batch}], got {list(index.shape)}")
        if index.device != device:
            raise ValueError(f"index is on {index.device} but the loss is on {device}")
        return index.long()

    def _check_values(self, finite: torch.Tensor, index: Optional[torch.Tensor]) -> None:
        """Finite embeddings and indices in range: a ``ValueError`` on CPU (no sync to pay), a
        device-side assert elsewhere (no host sync; a failure aborts the device context)."""
        bound = self.memory_teacher.index_bound
        nonfinite = self.config.on_nonfinite == "raise"
        in_range = None
        if index is not None and bound is not None and self.config.check_index:
            in_range = (index >= 0) & (index < bound)
        range_text = f"index must be in [0, num_samples={bound})"
        if finite.device.type != "cpu":
            if nonfinite:
                torch._assert_async(finite.all(), "non-finite values in student_feat or teacher_feat")
            if in_range is not None:
                torch._assert_async(in_range.all(), range_text)
            return
        if nonfinite and not bool(finite.all()):
            rows = torch.nonzero(~finite).flatten().tolist()
            raise ValueError(
                f"non-finite values in student_feat or teacher_feat (or their embeddings) at batch rows {rows[:10]}; "
                'pass on_nonfinite="skip" to leave such rows out of the memory instead of raising'
            )
        if index is not None and in_range is not None and not bool(in_range.all()):
            raise ValueError(f"{range_text}, got values from {int(index.min())} to {int(index.max())}")

    def extra_repr(self) -> str:
        config = self.config
        return (
            f"student_dim={self.student_dim}, teacher_dim={self.teacher_dim}, embed_dim={config.embed_dim}, "
            f"negatives={self.negatives!r}, objective={self.objective!r}, temperature={config.temperature}, "
            f"anchored={config.anchored}, self_anchor={config.self_anchor!r}, "
            f"train_teacher_embedding={config.train_teacher_embedding}"
            + (", share_negatives=True" if config.share_negatives else "")
        )

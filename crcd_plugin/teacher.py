"""The teacher side of a distillation step as a type: what the distiller asks of the frozen teacher.

A :class:`Teacher` checks a batch before the student runs, gives the batch's rows (feature,
classifier output, logits), the teacher's gradient element, and where it holds a row for every
sample, all of them to warm the memories. :class:`LiveTeacher` runs a model;
:class:`~crcd_plugin.teacher_cache.CachedTeacher` reads a :class:`~crcd_plugin.TeacherCache`;
:class:`TensorTeacher` holds the rows in tensors. A new kind is one class.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, NamedTuple, Optional, Tuple

import torch
from torch import nn

from ._checks import check_positive_int
from .distributed import rank, world_size
from .gradients import teacher_gradient_element
from .hooks import (
    POOL_MODES,
    FeatureCapture,
    PoolMode,
    Selector,
    TokenSelector,
    classifier_forward,
    reduce_feature,
    resolve_module,
)

__all__ = ["Teacher", "TeacherRows", "LiveTeacher", "TensorTeacher", "reduce_feature"]


class TeacherRows(NamedTuple):
    """One batch of the teacher side, float32 on the teacher's device."""

    feature: torch.Tensor  # the classifier's input as captured, [B, *] ([B, D] from stored rows)
    head_logits: torch.Tensor  # the classifier's output
    logits: torch.Tensor  # the model's logits [B, C], for KD
    reduced: torch.Tensor  # the feature as the CRCD loss takes it, [B, D]
    gradient: Optional[torch.Tensor]  # a stored per-sample gradient element dCE_b/df_b [B, D] (non-linear head)


class Teacher(nn.Module):
    """Base of the teacher kinds: the frozen teacher side of a step, always in eval mode.

    Attributes:
        needs_index: Rows are read by dataset index, so every step must give ``index``.
        feature_dim: ``D`` of :attr:`TeacherRows.reduced` where it is known without a forward.
        classifier: The classifier module of the closed-form (or autograd) gradient element;
            ``None`` where the gradient element is stored.
        classifier_path: Dotted path of the classifier in the teacher model, where there is one.
        num_rows: Rows held, for :meth:`all_rows` (``None``: a live teacher holds none).
    """

    needs_index: bool = False
    feature_dim: Optional[int] = None
    classifier_path: Optional[str] = None
    num_rows: Optional[int] = None
    classifier: Optional[nn.Module]

    @property
    def module(self) -> nn.Module:
        """What a distiller registers as its ``teacher`` (its ``state_dict`` keys ``teacher.*``)."""
        return self

    def expect(self, *, classifier: Optional[str], transform: Any, label_smoothing: float,
               num_samples: Optional[int], gradient: bool = False) -> None:
        """Check what a distiller is told about this teacher; a ``ValueError`` names the argument."""
        if transform is not None:
            raise ValueError(f"teacher_transform applies to a live teacher, not to a {type(self).__name__}")
        if classifier is not None and classifier != self.classifier_path:
            raise ValueError(f"teacher_classifier={classifier!r} but this {type(self).__name__} has "
                             f"{self.classifier_path!r}: leave teacher_classifier out")

    def set_transform(self, transform: Optional[Callable[[Any], Any]]) -> None:
        """Map the student's input batch to the teacher's from now on (a live teacher's only)."""
        if transform is not None:
            raise ValueError(f"teacher_transform applies to a live teacher, not to a {type(self).__name__}")

    def check_batch(self, index: Optional[torch.Tensor], target: torch.Tensor, gradient: bool) -> None:
        """Check a step's ``index`` and ``target`` before the student runs (once per step, on the host)."""

    def rows(self, input: Any, index: Optional[torch.Tensor], *, gradient: bool) -> TeacherRows:
        """The teacher side of a batch checked by :meth:`check_batch` (``gradient``: a stored element is read)."""
        raise NotImplementedError

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """A teacher-side tensor as the CRCD loss takes it, ``[B, D]`` (stored rows are already)."""
        return x

    def gradient_element(
        self, rows: TeacherRows, target: torch.Tensor, label_smoothing: float
    ) -> Optional[torch.Tensor]:
        """``dCE/df_t`` of the batch-mean CE, ``[B, D]`` as the CRCD loss takes it (``None`` in inference mode).

        A stored per-sample element is divided by the batch size; otherwise it is computed from
        :attr:`classifier` (the closed form for an ``nn.Linear``).
        """
        if rows.gradient is not None:
            return rows.gradient / rows.gradient.shape[0]
        classifier = self.classifier
        assert classifier is not None, "a teacher without a classifier stores its gradient element"
        g_t = teacher_gradient_element(classifier, rows.feature, target, logits=rows.head_logits,
                                       label_smoothing=label_smoothing)
        return None if g_t is None else self.reduce(g_t)

    def targets(self, index: torch.Tensor) -> torch.Tensor:
        """The class indices the rows of ``index`` were made with, int64 ``[B]``."""
        raise ValueError(f"a {type(self).__name__} holds no targets")

    def all_rows(self, batch_size: int, *, gradient: bool) -> Iterator[Tuple[torch.Tensor, torch.Tensor, TeacherRows]]:
        """``(index, targets, rows)`` over every row held, ``batch_size`` at a time, this rank's share.

        Under ``torch.distributed`` every rank gets the same number of chunks (each write into a
        memory is a collective); a rank whose share of the last chunk is empty gets that chunk's
        last row again (the same value: harmless).
        """
        total = self.num_rows
        if total is None:
            raise ValueError("fill_memory() without a loader reads a TeacherCache (or a TensorTeacher's rows); "
                             f"this distiller's {type(self).__name__} holds no rows: pass loader=")
        check_positive_int("batch_size", batch_size)
        world, me = world_size(), rank()
        step = batch_size * world
        for start in range(0, total, step):
            end = min(start + step, total)
            share = max(1, -(-(end - start) // world))
            lo, hi = min(start + me * share, end - 1), min(start + (me + 1) * share, end)
            index = torch.arange(lo, max(hi, lo + 1))
            yield index, self.targets(index), self.rows(None, index, gradient=gradient)

    def claim_state(self, state_dict: Dict[str, Any], prefix: str) -> None:
        """Take this teacher's keys out of a ``state_dict`` about to be loaded (refusing what is not its own)."""

    def remove_hooks(self) -> None:
        """Remove hooks on the teacher model (the teacher cannot run afterwards)."""

    def train(self, mode: bool = True) -> "Teacher":
        """The teacher stays in eval mode, whatever ``mode``."""
        return super().train(False)


class LiveTeacher(Teacher):
    """A trained model run on each batch: under no grad, in eval mode, through ``transform``.

    The input of ``classifier`` is captured by hooks registered once, here. :meth:`rows` is the
    one live teacher path: the distiller's steps, its dry run, ``fill_memory`` and
    :meth:`TeacherCache.build <crcd_plugin.TeacherCache.build>` all run it.

    Args:
        model: The trained teacher (frozen by the distiller that holds it).
        classifier: Dotted path of its classifier module.
        feature_pool: Reduction of a classifier input that is not ``[B, D]``.
        output_select: How to get logits from the model's output (see ``CRCDDistiller``).
        feature_token: Token selector of decoder-only classifiers (see ``CRCDDistiller``).
        transform: Map from the student's input batch to the teacher's.
    """

    def __init__(
        self,
        model: nn.Module,
        classifier: str = "fc",
        *,
        feature_pool: Optional[PoolMode] = None,
        output_select: Optional[Selector] = None,
        feature_token: Optional[TokenSelector] = None,
        transform: Optional[Callable[[Any], Any]] = None,
    ) -> None:
        super().__init__()
        if feature_pool is not None and feature_pool not in POOL_MODES:
            raise ValueError(f"feature_pool must be None or one of {POOL_MODES}, got {feature_pool!r}")
        self.model = model
        self.classifier_path = self._path = classifier
        self.classifier = resolve_module(model, classifier)  # a wrong path fails here, not in a step
        self.feature_pool, self.output_select, self.feature_token = feature_pool, output_select, feature_token
        self.set_transform(transform)
        if type(self.classifier) is nn.Linear and feature_pool != "flatten":
            self.feature_dim = self.classifier.in_features
        self._capture = (FeatureCapture(model, armed=False).add(classifier, io="input", name="feature")
                         .add(classifier, io="output", name="head_logits"))

    @property
    def module(self) -> nn.Module:
        return self.model

    def set_transform(self, transform: Optional[Callable[[Any], Any]]) -> None:
        if transform is not None and not callable(transform):
            raise TypeError("teacher_transform must be None or a callable input -> input, "
                            f"got {type(transform).__name__}")
        self.transform = transform

    @torch.no_grad()
    def rows(self, input: Any, index: Optional[torch.Tensor] = None, *, gradient: bool = False) -> TeacherRows:
        if self.model.training:
            self.model.eval()
        if self.transform is not None:
            input = self.transform(input)
        feature, head_logits, logits = classifier_forward(
            self._capture, self.model, input, role="teacher", path=self._path,
            output_select=self.output_select, feature_token=self.feature_token)
        return TeacherRows(feature, head_logits, logits, self.reduce(feature), None)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_feature(x, self.feature_pool)

    def remove_hooks(self) -> None:
        self._capture.remove()


class _RowsByIndex(Teacher):
    """A teacher whose rows are read by dataset index; its classifier is frozen, moves with ``.to()``,
    and is not part of the ``state_dict`` (it comes with the rows, not with a checkpoint)."""

    needs_index = True
    classifier: Optional[nn.Module]

    def _set_classifier(self, classifier: Optional[nn.Module]) -> None:
        if classifier is not None:
            classifier.requires_grad_(False).eval()
        self.__dict__["classifier"] = classifier  # outside the registry: never saved or loaded

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.classifier is not None:
            self.classifier._apply(fn, recurse)
        return self


class TensorTeacher(_RowsByIndex):
    """Teacher rows held in tensors, read by dataset index: a teacher precomputed in memory.

    ``features[i]`` is sample ``i``'s feature (the classifier's input, ``[N, D]``); the classifier
    gives its output (and, for KD, the logits unless ``logits`` are given). In eval mode a teacher
    is deterministic, so on un-augmented batches this equals running it. The rows are not part of
    the ``state_dict``.

    Args:
        features: ``[N, D]`` per-sample features.
        classifier: The teacher's classifier (``nn.Linear``: the closed-form gradient element).
        logits: Optional ``[N, C]`` model logits, where they are not the classifier's output.
        targets: Optional ``[N]`` class indices, to check each batch against and to warm the
            memories from the rows alone (``fill_memory()`` without a loader).

    Example:
        >>> head = nn.Linear(8, 3)
        >>> teacher = TensorTeacher(torch.randn(100, 8), head)
        >>> teacher.rows(None, torch.tensor([4, 7]), gradient=False).logits.shape
        torch.Size([2, 3])
    """

    features: torch.Tensor
    logits: Optional[torch.Tensor]
    _targets: Optional[torch.Tensor]
    num_rows: int

    def __init__(
        self,
        features: torch.Tensor,
        classifier: nn.Module,
        *,
        logits: Optional[torch.Tensor] = None,
        targets: Optional[torch.Tensor] = None,
    ) -> None:
        super().__init__()
        if not isinstance(features, torch.Tensor) or features.dim() != 2 or not features.is_floating_point():
            raise ValueError(f"features must be a float tensor [N, D], got {getattr(features, 'shape', features)!r}")
        if not isinstance(classifier, nn.Module):
            raise TypeError(f"classifier must be an nn.Module, got {type(classifier).__name__}")
        count = features.shape[0]
        for name, value in (("logits", logits), ("targets", targets)):
            if value is not None and (not isinstance(value, torch.Tensor) or value.shape[0] != count):
                raise ValueError(f"{name} must be a tensor with one row per feature row ({count}), "
                                 f"got {getattr(value, 'shape', value)!r}")
        self.register_buffer("features", features.detach(), persistent=False)
        self.register_buffer("logits", None if logits is None else logits.detach(), persistent=False)
        self.register_buffer("_targets", None if targets is None else targets.detach().long(), persistent=False)
        self._set_classifier(classifier)
        self.num_rows, self.feature_dim = count, int(features.shape[1])

    def check_batch(self, index: Optional[torch.Tensor], target: torch.Tensor, gradient: bool) -> None:
        if index is None:
            raise ValueError("index (the dataset indices of the batch, LongTensor [B]) is required when the "
                             "distiller reads a TensorTeacher, whatever the source of negatives")
        if index.is_floating_point() or index.dtype == torch.bool or index.dim() != 1:
            raise TypeError(f"index must be an integer tensor of dataset indices [B], got {index.dtype} "
                            f"{tuple(index.shape)}")
        if index.device.type == "cpu" and index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_rows):
            raise ValueError(f"index must hold dataset indices in [0, {self.num_rows}), got values from "
                             f"{int(index.min())} to {int(index.max())}")
        if self._targets is not None and not target.is_floating_point() and target.device.type == "cpu":
            differ = torch.nonzero(self._targets[index].cpu() != target.long()).flatten()
            if differ.numel():
                raise ValueError(f"target differs from the TensorTeacher's targets at batch rows "
                                 f"{differ[:10].tolist()}")

    @torch.no_grad()
    def rows(self, input: Any, index: Optional[torch.Tensor], *, gradient: bool = False) -> TeacherRows:
        assert index is not None, "a TensorTeacher's batch is checked before its rows are read"
        feature = self.features[index.to(self.features.device)].float()
        assert self.classifier is not None
        head_logits = self.classifier(feature)
        logits = head_logits if self.logits is None else self.logits[index.to(self.logits.device)].float()
        return TeacherRows(feature, head_logits, logits, feature, None)

    def targets(self, index: torch.Tensor) -> torch.Tensor:
        if self._targets is None:
            raise ValueError("fill_memory() from a TensorTeacher's rows needs its targets: TensorTeacher(targets=...)")
        return self._targets[index.to(self._targets.device)]

"""The gradient element of CRCD: ``g = dCE(head(f), y) / df`` for student and teacher features.

The student gradient keeps a graph through the classifier head only; the teacher gradient never
builds a graph through the teacher. A linear head with cross-entropy uses the exact closed form
``(softmax(z) - q) @ W / B``, which needs no double backward at all.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import TypeGuard

__all__ = [
    "cross_entropy_targets",
    "linear_cross_entropy_feature_grad",
    "normalize_gradient_element",
    "student_gradient_element",
    "teacher_gradient_element",
]


def cross_entropy_targets(
    target: torch.Tensor, num_classes: int, label_smoothing: float = 0.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Target distribution ``q`` that ``F.cross_entropy`` compares against.

    ``q = (1 - ls) * onehot(y) + ls / C`` for class indices, ``q = (1 - ls) * p + ls / C`` for
    class probabilities, exactly as ``F.cross_entropy(..., label_smoothing=ls)`` defines it.

    Shape:
        - target: ``[B]`` class indices (int64) or ``[B, C]`` probabilities.
        - output: ``[B, C]``.

    Args:
        target: Class indices or class probabilities.
        num_classes: ``C``.
        label_smoothing: ``ls`` in ``[0, 1]``.
        dtype: Floating dtype of the result.

    Returns:
        The target distribution.
    """
    if target.is_floating_point():
        if target.shape[-1] != num_classes:
            raise ValueError(f"probability targets must have {num_classes} classes, got shape {tuple(target.shape)}")
        q = target.to(dtype)
    else:
        q = F.one_hot(target.long(), num_classes).to(dtype)
    if label_smoothing:
        q = q * (1.0 - label_smoothing) + label_smoothing / num_classes
    return q


def linear_cross_entropy_feature_grad(
    logits: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Exact ``d mean_b CE(z_b, y_b) / d f`` for a linear head ``z = f @ W.T + b``.

    The result is ordinary torch ops on ``logits`` and ``weight``, so it stays differentiable
    with respect to the feature and the head parameters (what ``create_graph=True`` would give)
    without a double backward. Computed in float32.

    Shape:
        - logits: ``[B, C]`` (the head's output for the feature).
        - weight: ``[C, D]`` (``nn.Linear.weight``).
        - target: ``[B]`` class indices or ``[B, C]`` probabilities.
        - output: ``[B, D]``.

    Args:
        logits: Head output ``z``.
        weight: Head weight ``W``.
        target: Labels.
        label_smoothing: As in ``F.cross_entropy``.
        reduction: ``"mean"`` (the batch-mean CE) or ``"sum"`` (each row's own ``dCE_b / df_b``).

    Returns:
        ``(softmax(z) - q) @ W / B`` (``"sum"``: without ``/ B``), float32.

    Example:
        >>> head = nn.Linear(5, 3)
        >>> f, y = torch.randn(4, 5), torch.tensor([0, 2, 1, 0])
        >>> g = linear_cross_entropy_feature_grad(head(f), head.weight, y)
        >>> g.shape
        torch.Size([4, 5])
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, C], got shape {tuple(logits.shape)}")
    if weight.dim() != 2 or weight.shape[0] != logits.shape[1]:
        raise ValueError(f"weight must be [C={logits.shape[1]}, D], got shape {tuple(weight.shape)}")
    _check_reduction(reduction)
    batch, num_classes = logits.shape
    q = cross_entropy_targets(target, num_classes, label_smoothing)
    residual = torch.softmax(logits.float(), dim=-1) - q  # [B, C]
    gradient = residual @ weight.float()  # [B, D]
    return gradient / batch if reduction == "mean" else gradient


def _is_dtensor(value: object) -> bool:
    """Whether ``value`` is a ``DTensor`` (an FSDP2 shard), without importing it when unavailable."""
    return any(cls.__name__ == "DTensor" for cls in type(value).__mro__)


def _is_fsdp_unit(module: object) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` itself."""
    return any(cls.__name__ == "FSDPModule" for cls in type(module).__mro__)


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _is_linear_head(head: object) -> TypeGuard[nn.Linear]:
    return type(head) is nn.Linear


def _check_inputs(head: object, feature: torch.Tensor, target: torch.Tensor) -> None:
    if not callable(head):
        raise TypeError(f"head must be an nn.Module or callable, got {type(head).__name__}")
    if not isinstance(feature, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(
            f"feature and target must be Tensors, got {type(feature).__name__} and {type(target).__name__}"
        )
    if target.shape[0] != feature.shape[0]:
        raise ValueError(f"target has batch size {target.shape[0]} but feature has {feature.shape[0]}")


def student_gradient_element(
    head: Callable[[torch.Tensor], torch.Tensor],
    feature: torch.Tensor,
    target: torch.Tensor,
    *,
    logits: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
) -> Optional[torch.Tensor]:
    """Student gradient element ``g_s = dCE(head(f_s), y) / df_s``, differentiable.

    For an ``nn.Linear`` head the closed form is used (no double backward). Any other head goes
    through ``torch.autograd.grad(..., create_graph=True)`` over the head only; do not pass a
    ``torch.compile``'d head here, compiled graphs cannot double-backward.

    Shape:
        - feature: ``[B, D]`` (any ``[B, *]`` for non-linear heads).
        - target: ``[B]`` class indices or ``[B, C]`` probabilities.
        - output: same shape as ``feature``.

    Args:
        head: The student classifier head.
        feature: Its input ``f_s``, still attached to the student graph.
        target: Labels.
        logits: ``head(feature)`` if already computed (e.g. captured), saving a head forward.
            Must be the head output for exactly this ``feature`` tensor.
        label_smoothing: As in ``F.cross_entropy``; the CE is the batch mean.

    Returns:
        ``g_s`` (float32 on the linear path), connected to the feature and head parameters;
        ``None`` when gradient mode is off (``torch.no_grad()``, ``torch.inference_mode()``),
        meaning "skip the gradient element for this call".

    Example:
        >>> head = nn.Linear(5, 3)
        >>> f = torch.randn(4, 5, requires_grad=True)
        >>> g = student_gradient_element(head, f, torch.tensor([0, 1, 2, 0]))
        >>> g.requires_grad
        True
        >>> with torch.no_grad():
        ...     student_gradient_element(head, f, torch.tensor([0, 1, 2, 0])) is None
        True
    """
    _check_inputs(head, feature, target)
    if not torch.is_grad_enabled():
        return None
    # FSDP2 reduces a unit's gradients when the gradient of its input is ready: the gradient element
    # reaches the classifier's weight by another path, so a classifier that is its own unit (or whose
    # weight is still sharded here) would lose part of its gradient.
    if _is_fsdp_unit(head) or _is_dtensor(getattr(head, "weight", None)):
        raise ValueError(
            "the gradient element needs the student classifier gathered after the forward and inside its parent's "
            "FSDP2 unit: do not fully_shard the classifier itself, and shard the student's root with the default "
            "reshard_after_forward (docs/distributed.md, 'FSDP2')"
        )
    if _is_linear_head(head) and feature.dim() == 2:
        z = head(feature) if logits is None else logits
        return linear_cross_entropy_feature_grad(z, head.weight, target, label_smoothing)
    if not feature.requires_grad:
        # A frozen backbone: the gradient element then only trains the head.
        feature = feature.detach().requires_grad_(True)
        logits = None
    z = head(feature) if logits is None else logits
    loss = F.cross_entropy(z, target, label_smoothing=label_smoothing)
    (grad,) = torch.autograd.grad(loss, feature, create_graph=True)
    return grad


def teacher_gradient_element(
    head: Callable[[torch.Tensor], torch.Tensor],
    feature: torch.Tensor,
    target: torch.Tensor,
    *,
    logits: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> Optional[torch.Tensor]:
    """Teacher gradient element ``g_t = dCE(head(f_t), y) / df_t``, detached.

    No graph through the teacher is ever built: the linear closed form needs none, and any other
    head is re-run on the *detached* feature under ``torch.enable_grad()`` with a first-order
    ``torch.autograd.grad`` (the reference double-backprops through the whole teacher instead).
    Head parameters receive no ``.grad``.

    Shape:
        - feature: ``[B, D]`` (any ``[B, *]`` for non-linear heads).
        - target: ``[B]`` class indices or ``[B, C]`` probabilities.
        - output: same shape as ``feature``.

    Args:
        head: The teacher classifier head (frozen, in eval mode).
        feature: Its input ``f_t`` (typically produced under ``torch.no_grad()``).
        target: Labels.
        logits: ``head(feature)`` if already computed; used only on the linear path.
        label_smoothing: As in ``F.cross_entropy``; the CE is the batch mean.
        reduction: ``"mean"`` (the batch-mean CE, the step's) or ``"sum"``: each row's own
            ``dCE_b / df_b``, independent of the batch (what a teacher cache stores).

    Returns:
        ``g_t`` without autograd history (float32 on the linear path). ``None`` only for a
        non-linear head inside ``torch.inference_mode()``, where autograd cannot run.

    Example:
        >>> head = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3))
        >>> with torch.no_grad():
        ...     g = teacher_gradient_element(head, torch.randn(4, 5), torch.tensor([0, 1, 2, 0]))
        >>> g.shape, g.requires_grad
        (torch.Size([4, 5]), False)
    """
    _check_inputs(head, feature, target)
    _check_reduction(reduction)
    feature = feature.detach()
    if _is_linear_head(head) and feature.dim() == 2:
        with torch.no_grad():
            z = head(feature) if logits is None else logits.detach()
            # A teacher sharded with FSDP2 (shard_teacher) keeps its classifier sharded: gather it.
            weight = head.weight.full_tensor() if _is_dtensor(head.weight) else head.weight  # type: ignore[attr-defined]
            return linear_cross_entropy_feature_grad(z, weight, target, label_smoothing, reduction)
    if torch.is_inference_mode_enabled():
        return None
    if feature.is_inference():
        feature = feature.clone()
    with torch.enable_grad():
        feature.requires_grad_(True)
        loss = F.cross_entropy(head(feature), target, label_smoothing=label_smoothing, reduction=reduction)
        (grad,) = torch.autograd.grad(loss, feature)
    return grad.detach()


def normalize_gradient_element(gradient: torch.Tensor, mode: str) -> torch.Tensor:
    """Rescale the gradient element ``[B, D]`` before its embedding head.

    A confident teacher's ``dCE/df`` has norms of 1e-5 to 1e-4: through a linear embedding head
    with a bias every row lands on the bias, and the relations carry nothing (the relation loss
    stays at chance). ``"batch"`` divides the batch by its RMS row norm, keeping the rows' relative
    sizes; ``"sample"`` makes each row unit-norm; ``"none"`` is the reference.

    Shape:
        gradient ``[B, D]`` -> ``[B, D]``.

    Example:
        >>> g = normalize_gradient_element(1e-5 * torch.ones(4, 3), "batch")
        >>> round(float(g.pow(2).sum(-1).mean()), 4)
        1.0
    """
    if mode == "batch":
        return gradient / gradient.pow(2).sum(-1).mean().sqrt().clamp_min(1e-30)
    if mode == "sample":
        return F.normalize(gradient, dim=-1, eps=1e-30)
    if mode != "none":
        raise ValueError(f"mode must be one of ('none', 'sample', 'batch'), got {mode!r}")
    return gradient

"""Specification of the CRCD gradient element (crcd_plugin.gradients)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crcd_plugin.gradients import (
    linear_cross_entropy_feature_grad,
    student_gradient_element,
    teacher_gradient_element,
)

B, D, C = 6, 5, 4


def _autograd_feature_grad(head: nn.Module, feature: torch.Tensor, target: torch.Tensor, ls: float) -> torch.Tensor:
    f = feature.detach().double().requires_grad_(True)
    loss = F.cross_entropy(head.double()(f), target, label_smoothing=ls)
    head.float()
    return torch.autograd.grad(loss, f)[0].float()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_linear_closed_form_equals_autograd(bias, label_smoothing):
    torch.manual_seed(0)
    head, f, y = nn.Linear(D, C, bias=bias), torch.randn(B, D), torch.randint(0, C, (B,))
    closed = linear_cross_entropy_feature_grad(head(f), head.weight, y, label_smoothing)
    assert torch.allclose(closed, _autograd_feature_grad(head, f, y, label_smoothing), atol=1e-6)


def test_linear_closed_form_equals_autograd_for_probability_targets():
    torch.manual_seed(0)
    head, f = nn.Linear(D, C), torch.randn(B, D)
    probs = torch.softmax(torch.randn(B, C), dim=-1)
    closed = linear_cross_entropy_feature_grad(head(f), head.weight, probs, 0.2)
    assert torch.allclose(closed, _autograd_feature_grad(head, f, probs.double(), 0.2), atol=1e-6)


def test_student_closed_form_second_derivatives_match_double_backward():
    torch.manual_seed(0)
    head = nn.Linear(D, C)
    f = torch.randn(B, D, requires_grad=True)
    y = torch.randint(0, C, (B,))
    probe = torch.randn(B, D)

    g_closed = student_gradient_element(head, f, y, label_smoothing=0.1)
    closed = torch.autograd.grad((g_closed * probe).sum(), [f, head.weight, head.bias])

    z = head(f)
    g_auto = torch.autograd.grad(F.cross_entropy(z, y, label_smoothing=0.1), f, create_graph=True)[0]
    auto = torch.autograd.grad((g_auto * probe).sum(), [f, head.weight, head.bias])
    for a, b in zip(closed, auto):
        assert torch.allclose(a, b, atol=1e-6)


def test_student_gradient_for_a_non_linear_head_is_differentiable_through_the_head():
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C))
    f = torch.randn(B, D, requires_grad=True)
    y = torch.randint(0, C, (B,))
    g = student_gradient_element(head, f, y)
    assert torch.allclose(g, _autograd_feature_grad(head, f, y, 0.0), atol=1e-5)
    g.pow(2).sum().backward()
    assert f.grad is not None and f.grad.abs().sum() > 0
    assert head[0].weight.grad is not None and head[0].weight.grad.abs().sum() > 0


def test_student_gradient_uses_captured_logits_without_rerunning_the_head():
    calls = []
    head = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C))
    f = torch.randn(B, D, requires_grad=True)
    logits = head(f)
    head.register_forward_hook(lambda *args: calls.append(1))
    student_gradient_element(head, f, torch.randint(0, C, (B,)), logits=logits)
    assert calls == []


def test_student_gradient_is_none_under_no_grad_and_inference_mode():
    head, f, y = nn.Linear(D, C), torch.randn(B, D, requires_grad=True), torch.randint(0, C, (B,))
    with torch.no_grad():
        assert student_gradient_element(head, f, y) is None
    with torch.inference_mode():
        assert student_gradient_element(head, torch.randn(B, D), y) is None


@pytest.mark.parametrize("linear", [True, False])
def test_teacher_gradient_is_detached_and_leaves_no_grads_on_the_teacher(linear):
    torch.manual_seed(0)
    head = nn.Linear(D, C) if linear else nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C))
    backbone = nn.Linear(3, D)
    x, y = torch.randn(B, 3), torch.randint(0, C, (B,))
    feature = backbone(x)  # attached to a teacher graph: the helper must not use it
    g = teacher_gradient_element(head, feature, y, label_smoothing=0.1)
    assert not g.requires_grad and g.grad_fn is None
    assert torch.allclose(g, _autograd_feature_grad(head, feature, y, 0.1), atol=1e-5)
    assert all(p.grad is None for p in [*head.parameters(), *backbone.parameters()])


def test_teacher_gradient_works_under_no_grad():
    head = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C))
    with torch.no_grad():
        f = torch.randn(B, D)
        g = teacher_gradient_element(head, f, torch.randint(0, C, (B,)))
    assert g.shape == (B, D) and g.abs().sum() > 0


def test_mismatched_batch_and_bad_types_raise_clear_errors():
    head = nn.Linear(D, C)
    with pytest.raises(ValueError, match="batch size"):
        student_gradient_element(head, torch.randn(B, D, requires_grad=True), torch.zeros(B + 1, dtype=torch.long))
    with pytest.raises(TypeError, match="Tensor"):
        teacher_gradient_element(head, [[0.0] * D], torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[C=4, D\]"):
        linear_cross_entropy_feature_grad(torch.randn(B, C), torch.randn(C + 1, D), torch.zeros(B, dtype=torch.long))

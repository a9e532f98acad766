"""Logit-standardised KD (``kd_loss(..., standardize=True)``, ``CRCDConfig.kd_standardize``)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crcd_plugin import CRCDDistiller
from crcd_plugin.config import CRCDConfig
from crcd_plugin.functional import kd_loss


def _sun_et_al(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sun et al. (CVPR 2024) as their code writes it: z-score with the unbiased std, KL, T^2."""

    def z(logits: torch.Tensor) -> torch.Tensor:
        return (logits - logits.mean(dim=-1, keepdim=True)) / (1e-7 + logits.std(dim=-1, keepdim=True))

    log_p = F.log_softmax(z(student) / temperature, dim=1)
    target = F.softmax(z(teacher) / temperature, dim=1)
    return F.kl_div(log_p, target, reduction="none").sum(1).mean() * temperature**2


def test_standardised_kd_equals_the_published_formula():
    torch.manual_seed(0)
    student, teacher = torch.randn(16, 10) * 3, torch.randn(16, 10) * 7 + 2
    for temperature in (1.0, 2.0, 4.0):
        torch.testing.assert_close(kd_loss(student, teacher, temperature, standardize=True),
                                   _sun_et_al(student, teacher, temperature))


def test_standardised_kd_ignores_each_rows_scale_and_shift():
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 5), torch.randn(8, 5)
    scale, shift = torch.rand(8, 1) * 10 + 0.1, torch.randn(8, 1) * 5
    base = kd_loss(student, teacher, 2.0, standardize=True)
    torch.testing.assert_close(kd_loss(scale * student + shift, teacher, 2.0, standardize=True), base)
    torch.testing.assert_close(kd_loss(student, scale * teacher + shift, 2.0, standardize=True), base)
    assert not torch.allclose(kd_loss(scale * student, teacher, 2.0), kd_loss(student, teacher, 2.0))


def test_standardised_kd_gradient_falls_as_the_student_logits_grow():
    """Hinton KD's logit gradient stays of one size however large the student logits become; the
    standardised form's falls as 1 / scale: a student whose logits grow damps its own KD steps."""
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 10), torch.randn(8, 10)

    def grad_norm(scale: float, standardize: bool) -> float:
        z = (scale * student).requires_grad_()
        kd_loss(z, teacher, 2.0, standardize=standardize).backward()
        return float(z.grad.norm())

    assert grad_norm(10.0, True) == pytest.approx(grad_norm(1.0, True) / 10, rel=1e-4)
    assert grad_norm(10.0, False) > 0.5 * grad_norm(1.0, False)


def test_standardised_kd_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        kd_loss(torch.randn(4, 1), torch.randn(4, 1), 2.0, standardize=True)


def test_config_kd_standardize_must_be_a_bool():
    with pytest.raises(TypeError, match=r"CRCDConfig.kd_standardize must be a bool, got 'yes'"):
        CRCDConfig(kd_standardize="yes")  # type: ignore[arg-type]


def test_distiller_kd_term_follows_kd_standardize():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    teacher = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    x, y = torch.randn(10, 6), torch.randint(0, 4, (10,))
    for standardize in (False, True):
        config = CRCDConfig(kd_standardize=standardize, kd_temperature=2.0, feature_weight=0.0)
        out = CRCDDistiller(student, teacher, "2", "2", config=config)(x, y)
        with torch.no_grad():
            expected = kd_loss(student(x), teacher(x), 2.0, standardize=standardize)
        torch.testing.assert_close(out["kd_loss"].detach(), expected)

"""ExplosionMonitor: one warning per exploding term, none for a healthy run, no sync between checks."""

import warnings

import pytest
import torch

from crcd_plugin.monitor import ExplosionMonitor


def _run(monitor: ExplosionMonitor, values):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for value in values:
            monitor.observe({"crcd_feature_loss": torch.tensor(value)})
    return [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_a_falling_loss_never_warns():
    assert _run(ExplosionMonitor(check_every=5), [4.0 - 0.01 * i for i in range(100)]) == []


def test_a_loss_growing_twentyfold_warns_once_naming_the_term():
    values = [16.7] + [355.0] * 99  # the bank + NCE divergence of issue reports
    caught = _run(ExplosionMonitor(check_every=10), values)
    assert len(caught) == 1
    assert "crcd_feature_loss" in str(caught[0].message) and "learning rate" in str(caught[0].message)


def test_a_non_finite_loss_warns():
    caught = _run(ExplosionMonitor(check_every=4), [1.0, 1.0, float("nan"), 1.0])
    assert len(caught) == 1 and "not finite" in str(caught[0].message)


def test_gradient_norms_use_their_own_factor():
    monitor = ExplosionMonitor(check_every=1, grad_factor=100.0)
    monitor.observe_gradient("student_feature_grad_norm", torch.full((4,), 1.0))
    monitor.observe_gradient("student_feature_grad_norm", torch.full((4,), 50.0))  # 50x: below 100x
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor.check()
        monitor.observe_gradient("student_feature_grad_norm", torch.full((4,), 1000.0))
        monitor.check()
    assert len(caught) == 1 and "student_feature_grad_norm" in str(caught[0].message)


def test_values_stay_on_the_device_between_checks(monkeypatch):
    monitor = ExplosionMonitor(check_every=1000)
    synced = []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: synced.append(1) or [])
    for _ in range(10):
        monitor.observe({"kd_loss": torch.tensor(1.0)})
    assert synced == []


@pytest.mark.parametrize("factor", [0.0, -1.0])
def test_bad_factors_are_rejected(factor):
    with pytest.raises(ValueError, match="loss_factor"):
        ExplosionMonitor(loss_factor=factor)

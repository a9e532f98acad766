"""NCE and InfoNCE: equal to the textbook formulas, stable where those overflow, masks honoured."""

import math

import pytest
import torch
from naive import naive_infonce, naive_nce, naive_z

from crcd_plugin.functional import infonce_loss, kd_loss, nce_log_normalizer, nce_loss

N = 1000


def _logits(seed=0, shape=(4, 3, 11), scale=5.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def test_nce_matches_probability_formula():
    logits = _logits()
    log_z = nce_log_normalizer(logits, N)
    torch.testing.assert_close(log_z.exp(), naive_z(logits, N))
    torch.testing.assert_close(nce_loss(logits, log_z, N), naive_nce(logits, naive_z(logits, N), N))


def test_nce_gradient_matches_probability_formula():
    logits = _logits().requires_grad_()
    ref = logits.detach().clone().requires_grad_()
    log_z = nce_log_normalizer(logits, N)
    nce_loss(logits, log_z, N).backward()
    naive_nce(ref, naive_z(ref.detach(), N), N).backward()
    torch.testing.assert_close(logits.grad, ref.grad)


def test_infonce_matches_cross_entropy():
    logits = _logits().requires_grad_()
    ref = logits.detach().clone().requires_grad_()
    infonce_loss(logits).backward()
    naive_infonce(ref).backward()
    torch.testing.assert_close(logits.grad, ref.grad)
    torch.testing.assert_close(infonce_loss(logits.detach()), naive_infonce(ref.detach()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_objectives_stay_finite_at_reference_temperature_in_half_precision(dtype):
    # cosine 1 at tau = 0.05 is a logit of 20: exp(20) = 4.9e8 overflows fp16.
    logits = torch.full((2, 3, 6), 20.0, dtype=dtype)
    log_z = nce_log_normalizer(logits, N)
    assert log_z.dtype == torch.float32
    assert math.isclose(float(log_z), 20.0 + math.log(N), rel_tol=1e-5)
    assert torch.isfinite(nce_loss(logits, log_z, N))
    assert torch.isfinite(infonce_loss(logits))


def test_masked_entries_and_rows_are_left_out():
    logits = _logits(shape=(2, 2, 5))
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[0, 0, 0] = True  # the positive coincides with its anchor: drop the row
    mask[1, 1, 2] = True  # one negative coincides with its anchor: drop that entry
    log_z = nce_log_normalizer(logits, N)
    z = log_z.exp()
    kept_rows = [(0, 1), (1, 0)]
    row = logits[1, 1]
    row_without_masked = torch.cat([row[:2], row[3:]])[None]
    # A masked negative leaves the row's sum; K stays the nominal number of negatives (4).
    expected = sum(naive_nce(logits[i, j][None], z, N) for i, j in kept_rows) + naive_nce(row_without_masked, z, N, k=4)
    torch.testing.assert_close(nce_loss(logits, log_z, N, mask), expected / 3)

    info_expected = sum(naive_infonce(logits[i, j][None]) for i, j in kept_rows) + naive_infonce(row_without_masked)
    torch.testing.assert_close(infonce_loss(logits, mask), info_expected / 3)


def test_mask_of_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        infonce_loss(_logits(), torch.zeros(4, 3, 10, dtype=torch.bool))


def test_kd_loss_is_zero_for_equal_logits_and_scaled_by_t_squared():
    logits = _logits(shape=(8, 10))
    assert float(kd_loss(logits, logits)) == pytest.approx(0.0, abs=1e-10)
    other = _logits(seed=1, shape=(8, 10))
    p_t = torch.softmax(other / 4, -1)
    expected = (p_t * (p_t.log() - torch.log_softmax(logits / 4, -1))).sum(-1).mean() * 16
    torch.testing.assert_close(kd_loss(logits, other, temperature=4.0), expected)


def test_the_public_contrastive_loss_refuses_bad_arguments_by_name():
    from crcd_plugin.functional import contrastive_loss

    scores, state = torch.randn(4, 3, 6), (torch.zeros(()), torch.tensor(False))
    cases = [
        (dict(objective="crd"), "objective must be one of"),
        (dict(layout="last"), "layout must be one of"),
        (dict(noise_size=0), "noise_size must be a positive int"),
        (dict(layout="separate"), 'positive is needed with layout="separate"'),
        (dict(positive=torch.randn(4, 3)), "positive is needed"),
    ]
    for options, match in cases:
        kwargs = dict(objective="nce", noise_size=100) | options
        with pytest.raises(ValueError, match=match):
            contrastive_loss(scores, *state, **kwargs)
    with pytest.raises(ValueError, match=r"scores must be a floating-point \[B, A, C\] tensor"):
        contrastive_loss(torch.randn(4, 6), *state, objective="nce", noise_size=100)
    loss, _ = contrastive_loss(scores, *state, objective="infonce", noise_size=100)
    assert torch.isfinite(loss)

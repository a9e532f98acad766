"""relation_logits: values and gradients equal the naive formulation, including degenerate entries."""

import pytest
import torch
import torch.nn.functional as F
from naive import naive_relations

from crcd_plugin.functional import relation_logits
from crcd_plugin.kernels import naive_relation_logits

B, A, K, D = 6, 5, 9, 32
TAU = 0.05


def _inputs(kind: str, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    student, anchors, candidates = unit(B, D), unit(A, D), unit(B, K + 1, D)
    if kind in ("equal", "near"):
        # The positive of sample i is anchor i (i < A), as in the bank; some negatives are anchors too.
        candidates[:A, 0] = anchors
        candidates[:, 3] = anchors[torch.arange(B) % A]
        candidates[:, 5] = anchors[(torch.arange(B) + 2) % A]
    if kind == "near":
        candidates = candidates + 1e-3 * unit(B, K + 1, D)
        anchors = anchors.clone()
        anchors[1] = anchors[0] + 1e-3 * unit(D)  # two anchors close to each other as well
    return [x.to(dtype) for x in (student, anchors, candidates)]


@pytest.mark.parametrize("kind", ["random", "equal", "near"])
def test_values_match_naive_loops(kind):
    student, anchors, candidates = _inputs(kind)
    expected = naive_relations(*(x.double() for x in (student, anchors, candidates)), TAU)
    got = relation_logits(student, anchors, candidates, TAU)
    assert got.shape == (B, A, K + 1)
    torch.testing.assert_close(got.double(), expected, atol=2e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", ["random", "equal", "near"])
def test_gradients_match_naive_loops(kind):
    inputs32 = [x.requires_grad_() for x in _inputs(kind)]
    inputs64 = [x.detach().double().requires_grad_() for x in inputs32]
    weights = torch.randn(B, A, K + 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (relation_logits(*inputs32, TAU) * weights.float()).sum().backward()
    (naive_relations(*inputs64, TAU) * weights).sum().backward()
    for ours, ref in zip(inputs32, inputs64):
        scale = ref.grad.abs().max()
        torch.testing.assert_close(ours.grad.double() / scale, ref.grad / scale, atol=5e-5, rtol=0)


def test_degenerate_entry_is_the_constant_eps_direction():
    student, anchors, candidates = _inputs("equal")
    got = relation_logits(student, anchors, candidates, TAU)
    # candidate 0 of sample 0 is anchor 0: its relation is normalize(eps * 1) = 1 / sqrt(D)
    expected = F.normalize(student[0] - anchors[0] + 1e-6, dim=0).sum() / D**0.5 / TAU
    torch.testing.assert_close(got[0, 0, 0], expected, atol=1e-4, rtol=1e-5)


def test_library_naive_kernel_matches_loops():
    student, anchors, candidates = _inputs("near")
    torch.testing.assert_close(
        naive_relation_logits(student, anchors, candidates, TAU).double(),
        naive_relations(*(x.double() for x in (student, anchors, candidates)), TAU),
        atol=2e-4,
        rtol=1e-5,
    )


@pytest.mark.parametrize("kind", ["random", "equal", "near"])
def test_gradcheck_float64(kind):
    small = [x[:3, :D].clone() for x in _inputs(kind, dtype=torch.float64)]
    student, anchors, candidates = small[0], small[1][:3], small[2][:, :4]
    # gradcheck perturbs by 1e-6, the size of eps itself: a larger eps keeps degenerate entries smooth.
    inputs = [x.requires_grad_() for x in (student, anchors, candidates)]
    assert torch.autograd.gradcheck(lambda s, a, c: relation_logits(s, a, c, TAU, eps=1e-2), inputs)


def test_half_inputs_are_computed_in_fp32():
    student, anchors, candidates = _inputs("random")
    got = relation_logits(student.half(), anchors.half(), candidates.half(), TAU)
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.randn(B, D), torch.randn(A, D + 1), torch.randn(B, K + 1, D)), "share D"),
        ((torch.randn(B, D), torch.randn(A, D), torch.randn(B + 1, K + 1, D)), "batch size"),
        ((torch.randn(B, D), torch.randn(A, D), torch.randn(B, D)), "candidates must be 3-D"),
        ((torch.randint(0, 3, (B, D)), torch.randn(A, D), torch.randn(B, K + 1, D)), "floating-point"),
    ],
)
def test_bad_inputs_raise_named_errors(args, message):
    with pytest.raises((ValueError, TypeError), match=message):
        relation_logits(*args, TAU)


def test_nonpositive_temperature_is_rejected():
    with pytest.raises(ValueError, match="temperature"):
        relation_logits(*_inputs("random"), 0.0)

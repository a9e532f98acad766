"""The Triton relation loss equals the naive formulation; checked on CPU under Triton's interpreter.

The interpreter runs the same kernel source with NumPy, so these tests cover the kernel's
arithmetic, masking and tiling (several anchor blocks and candidate tiles, sizes that are not
multiples of a block) but not GPU code generation; benchmarks/relation.py --device cuda --impl
triton checks that on a GPU.
"""

import logging
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import V020_RELATION
from naive import naive_infonce, naive_nce, naive_relations, naive_z
from probes import LargestTensor

from crcd_plugin import CRCDLoss, RelationConfig
from crcd_plugin.relation_loss import relation_loss

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # conftest.py sets it; a user's environment may not
    pytest.skip("the Triton tests run under TRITON_INTERPRET=1", allow_module_level=True)

TAU, N = 0.05, 1000


def _inputs(batch=4, num_anchors=5, num_candidates=70, dim=24, seed=0):
    """Bank-like: positive = own anchor, one exact and one 1e-3-near duplicate, two close anchors."""
    g = torch.Generator().manual_seed(seed)
    anchors = F.normalize(torch.randn(num_anchors, dim, generator=g), dim=-1)
    anchors[1] = F.normalize(anchors[0] + 1e-3 * torch.randn(dim, generator=g), dim=-1)
    candidates = F.normalize(torch.randn(batch, num_candidates, dim, generator=g), dim=-1)
    rows = torch.arange(batch) % num_anchors
    candidates[:, 0] = anchors[rows]
    candidates[:, 3] = anchors[(rows + 2) % num_anchors]
    candidates[:, 5] = anchors[(rows + 1) % num_anchors] + 1e-3 * F.normalize(torch.randn(batch, dim, generator=g), -1)
    student = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    return student, anchors, candidates


def _run(backend, student, anchors, candidates, objective, log_z=0.0, z_ready=False, mask=None):
    query = student.detach().clone().requires_grad_()
    loss, new_log_z = relation_loss(
        backend, query, anchors, candidates, None, torch.tensor(log_z), torch.tensor(z_ready), mask,
        temperature=TAU, eps=1e-6, objective=objective, noise_size=N,
    )
    loss.backward()
    return loss.detach(), new_log_z, query.grad


def _naive(student, anchors, candidates, objective, log_z=None):
    """Float64 reference loss and student gradient (Z from this batch unless log_z is given)."""
    query = student.detach().double().requires_grad_()
    logits = naive_relations(query, anchors.double(), candidates.double(), TAU)
    if objective == "infonce":
        loss = naive_infonce(logits)
    else:
        z = naive_z(logits.detach(), N) if log_z is None else torch.tensor(log_z, dtype=torch.float64).exp()
        loss = naive_nce(logits, z, N)
    loss.backward()
    return loss.detach(), query.grad


def _assert_matches(got, expected):
    (loss, grad), (ref_loss, ref_grad) = got, expected
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    scale = ref_grad.abs().max()
    torch.testing.assert_close(grad.double() / scale, ref_grad / scale, rtol=0, atol=1e-5)


@pytest.mark.parametrize("objective", ["nce", "infonce"])
def test_triton_loss_matches_naive_values_and_gradients(objective):
    inputs = _inputs()
    loss, _, grad = _run("triton", *inputs, objective)
    _assert_matches((loss, grad), _naive(*inputs, objective))


@pytest.mark.parametrize("log_z", [-30.0, 2.0, 40.0])
def test_triton_nce_with_a_fixed_constant_matches_naive_far_into_both_softplus_tails(log_z):
    inputs = _inputs(seed=1)
    loss, new_log_z, grad = _run("triton", *inputs, "nce", log_z=log_z, z_ready=True)
    assert new_log_z.item() == log_z
    _assert_matches((loss, grad), _naive(*inputs, "nce", log_z=log_z))


def test_triton_nce_fixes_the_constant_from_the_first_batch_like_eager():
    inputs = _inputs(seed=2)
    _, triton_log_z, _ = _run("triton", *inputs, "nce")
    _, eager_log_z, _ = _run("eager", *inputs, "nce")
    torch.testing.assert_close(triton_log_z, eager_log_z, rtol=1e-6, atol=1e-5)


def test_triton_tiles_several_anchor_blocks_and_candidate_tiles():
    # 70 anchors: two anchor blocks of 64 (the second partly masked); 130 candidates: three tiles.
    inputs = _inputs(batch=2, num_anchors=70, num_candidates=130, dim=16, seed=3)
    loss, _, grad = _run("triton", *inputs, "infonce")
    _assert_matches((loss, grad), _naive(*inputs, "infonce"))


def test_triton_loss_never_stores_the_scores(monkeypatch):
    from crcd_plugin.kernels import triton_relation

    # Scores [2, 32, 512] = 32768 entries; inputs and side tables are at most 16384, and the
    # nearest-anchor search is cut to chunks of 2048 entries (the default is 2**24).
    monkeypatch.setattr(triton_relation, "SEARCH_ENTRIES", 2048)
    student, anchors, candidates = _inputs(batch=2, num_anchors=32, num_candidates=512, dim=16, seed=5)
    scores = student.shape[0] * anchors.shape[0] * candidates.shape[1]
    with LargestTensor() as probe:
        _run("triton", student, anchors, candidates, "nce")
    assert probe.largest * 2 <= scores
    with LargestTensor() as probe:  # the probe sees the scores of the eager kernels
        _run("eager", student, anchors, candidates, "nce")
    assert probe.largest >= scores


def test_crcd_loss_with_the_triton_backend_trains_like_eager():
    def make(backend):
        torch.manual_seed(0)
        v020 = dict(V020_RELATION, embed_dim=16, objective="nce")  # 0.2.0: NCE on a bank, both sides
        return CRCDLoss(10, 14, RelationConfig(**v020, num_negatives=20, backend=backend), num_samples=40)

    losses = {"triton": make("triton"), "eager": make("eager")}
    for step in range(2):  # the first step fixes Z, the second uses it
        g = torch.Generator().manual_seed(step)
        student, teacher = torch.randn(6, 10, generator=g), torch.randn(6, 14, generator=g)
        index = torch.arange(6) + step
        results = {}
        for name, crcd in losses.items():
            torch.manual_seed(step)  # same negatives
            crcd.zero_grad()
            loss = crcd(student, teacher, index)
            loss.backward()
            results[name] = (loss.detach(), [p.grad.clone() for p in crcd.parameters()])
        torch.testing.assert_close(results["triton"][0], results["eager"][0], rtol=1e-5, atol=1e-5)
        for got, expected in zip(results["triton"][1], results["eager"][1]):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for name, value in losses["eager"].state_dict().items():
        torch.testing.assert_close(losses["triton"].state_dict()[name], value)


def test_triton_falls_back_to_eager_with_a_warning_where_it_cannot_run(caplog):
    student, anchors, candidates = _inputs(seed=4)
    mask = torch.zeros(student.shape[0], anchors.shape[0], candidates.shape[1], dtype=torch.bool)
    mask[:, :, 5] = True
    with caplog.at_level(logging.WARNING, logger="crcd_plugin.relation_loss"):
        got = _run("triton", student, anchors, candidates, "infonce", mask=mask)
    assert "self_anchor='mask'" in caplog.text
    expected = _run("eager", student, anchors, candidates, "infonce", mask=mask)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[2], expected[2])


def _shared_inputs(batch=6, num_anchors=4, num_queue=70, dim=24, seed=6):
    """Anchors are the first rows of the batch (one 1e-3 from another); queue rows equal to and
    1e-3 from anchors."""
    g = torch.Generator().manual_seed(seed)
    other = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    other[1] = F.normalize(other[0] + 1e-3 * torch.randn(dim, generator=g), dim=-1)
    queue = F.normalize(torch.randn(num_queue, dim, generator=g), dim=-1)
    queue[3] = other[2]
    queue[5] = other[1] + 1e-3 * F.normalize(torch.randn(dim, generator=g), dim=-1)
    student = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    return student, other[:num_anchors], queue, other


def _run_shared(backend, student, anchors, candidates, positives, objective, log_z=0.0, z_ready=False):
    from crcd_plugin.relation_loss import relation_loss

    query = student.detach().clone().requires_grad_()
    loss, new_log_z = relation_loss(
        backend, query, anchors, candidates, positives, torch.tensor(log_z), torch.tensor(z_ready),
        temperature=TAU, eps=1e-6, objective=objective, noise_size=N,
    )
    loss.backward()
    return loss.detach(), new_log_z, query.grad


def _naive_shared(student, anchors, candidates, positives, objective, log_z=None):
    """The per-sample candidates the shared ones stand for, through the float64 naive loops."""
    from crcd_plugin.memory import in_batch_candidate_index

    if positives is None:
        per_sample = candidates[in_batch_candidate_index(candidates.shape[0])]
    else:
        per_sample = torch.cat([positives[:, None], candidates[None].expand(len(positives), -1, -1)], dim=1)
    return _naive(student, anchors, per_sample, objective, log_z)


@pytest.mark.parametrize("objective", ["nce", "infonce"])
@pytest.mark.parametrize("layout", ["batch", "queue"])
def test_triton_shared_candidates_match_naive_values_and_gradients(objective, layout):
    student, anchors, queue, other = _shared_inputs()
    candidates, positives = (other, None) if layout == "batch" else (queue, other)
    loss, _, grad = _run_shared("triton", student, anchors, candidates, positives, objective)
    _assert_matches((loss, grad), _naive_shared(student, anchors, candidates, positives, objective))


def test_triton_shared_nce_with_a_fixed_constant_matches_naive_and_keeps_it():
    student, anchors, queue, other = _shared_inputs(seed=7)
    loss, new_log_z, grad = _run_shared("triton", student, anchors, queue, other, "nce", log_z=2.0, z_ready=True)
    assert new_log_z.item() == 2.0
    _assert_matches((loss, grad), _naive_shared(student, anchors, queue, other, "nce", log_z=2.0))


def test_triton_shared_nce_fixes_the_constant_like_eager():
    student, anchors, queue, other = _shared_inputs(seed=8)
    for candidates, positives in ((other, None), (queue, other)):
        _, triton_log_z, _ = _run_shared("triton", student, anchors, candidates, positives, "nce")
        _, eager_log_z, _ = _run_shared("eager", student, anchors, candidates, positives, "nce")
        torch.testing.assert_close(triton_log_z, eager_log_z, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("negatives", ["batch", "queue"])
def test_crcd_loss_with_shared_candidates_on_triton_trains_like_eager(negatives):
    def make(backend):
        torch.manual_seed(0)
        queue = {"queue_size": 20} if negatives == "queue" else {}
        v020 = dict(V020_RELATION, embed_dim=16, num_anchors=4)  # 0.2.0: both sides
        return CRCDLoss(10, 14, RelationConfig(**v020, backend=backend, **queue), negatives=negatives)

    losses = {"triton": make("triton"), "eager": make("eager")}
    for step in range(2):  # the first step fixes Z, the second uses it
        g = torch.Generator().manual_seed(step)
        student, teacher = torch.randn(6, 10, generator=g), torch.randn(6, 14, generator=g)
        results = {}
        for name, crcd in losses.items():
            torch.manual_seed(step)  # same anchors
            crcd.zero_grad()
            loss = crcd(student, teacher)
            loss.backward()
            results[name] = (loss.detach(), [p.grad.clone() for p in crcd.parameters()])
        torch.testing.assert_close(results["triton"][0], results["eager"][0], rtol=1e-5, atol=1e-5)
        for got, expected in zip(results["triton"][1], results["eager"][1]):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for name, value in losses["eager"].state_dict().items():
        torch.testing.assert_close(losses["triton"].state_dict()[name], value)


@pytest.mark.parametrize("objective", ["nce", "infonce"])
def test_triton_scores_of_collapsed_embeddings_stay_cosines_over_tau(objective):
    """All embeddings within ~1e-7 of each other (gradient elements of a confident teacher), where
    the eager kernels need their cosine clamp (tests/test_collapsed_embeddings.py). The kernel has
    no clamp of its own; this checks that on such inputs its loss stays below InfoNCE's bound,
    finite, and equal to the clamped eager loss."""
    g = torch.Generator().manual_seed(0)
    base = torch.linspace(-1.0, 1.0, 32)

    def collapsed(*shape):
        return F.normalize(base + 1e-7 * torch.randn(*shape, 32, generator=g), dim=-1)

    batch, num_anchors, num_candidates = 8, 8, 65
    student, anchors, candidates = collapsed(batch), collapsed(num_anchors), collapsed(batch, num_candidates)
    candidates[:, 0] = anchors[torch.arange(batch) % num_anchors]
    loss, _, grad = _run("triton", student, anchors, candidates, objective)
    ref_loss, _, ref_grad = _run("eager", student, anchors, candidates, objective)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    if objective == "infonce":
        assert float(loss) <= 2 / TAU + torch.log(torch.tensor(float(num_candidates)))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=1e-3)

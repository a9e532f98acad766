"""Shared candidates (in-batch and queue negatives): the fast path equals the naive formulation."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from naive import naive_infonce, naive_nce, naive_relations, naive_z
from probes import LargestTensor

from crcd_plugin import CRCDLoss, RelationConfig
from crcd_plugin.kernels import shared_relation_logits
from crcd_plugin.kernels.shared_candidates import uses_gram_form
from crcd_plugin.memory import in_batch_candidate_index
from crcd_plugin.relation_loss import per_sample_candidates, relation_loss

TAU, N = 0.05, 1000
# (B, D): the exact-difference form runs where D <= B, the re-centred Gram form elsewhere.
FORMS = {"difference": (9, 8), "gram": (5, 16)}


def _unit(g, *shape):
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _inputs(form, layout, kind="near", seed=0, num_anchors=4, num_queue=11):
    """Query, anchors, shared candidates and (queue) positives, float64 values that fp32 holds exactly.

    Anchors are the first ``A`` positives (or batch rows), as ``CRCDLoss`` takes them, so the
    positive of sample ``j < A`` equals anchor ``j``; ``kind="near"`` adds an anchor 1e-3 from
    another, a queue row equal to an anchor and one 1e-3 from one.
    """
    batch, dim = FORMS[form]
    g = torch.Generator().manual_seed(seed)
    query, other = _unit(g, batch, dim), _unit(g, batch, dim)
    if kind == "near":
        other[1] = F.normalize(other[0] + 1e-3 * _unit(g, dim), dim=-1)
    if layout == "batch":
        return _fp32_exact(query, other[:num_anchors], other, None)
    queue = _unit(g, num_queue, dim)
    if kind == "near":
        queue[2] = other[3]
        queue[5] = other[2] + 1e-3 * _unit(g, dim)
    return _fp32_exact(query, other[:num_anchors], queue, other)


def _fp32_exact(*tensors):
    # Rounded to fp32 first: the kernels run in fp32, and a 1e-3 difference between two rounded
    # vectors differs from the float64 one by 1e-5 of itself, which would be the test's error.
    return tuple(None if x is None else x.float().double() for x in tensors)


def _per_sample_candidates(candidates, positives):
    """The ``[B, K+1, D]`` candidates the shared ones stand for (index 0 = the positive)."""
    if positives is None:
        return candidates[in_batch_candidate_index(candidates.shape[0])]
    expanded = candidates[None].expand(positives.shape[0], -1, -1)
    return torch.cat([positives[:, None], expanded], dim=1)


def _naive_loss(query, anchors, candidates, positives, objective):
    """Float64 loops of tests/naive.py on the per-sample candidates; NCE's Z from this batch."""
    logits = naive_relations(query, anchors, _per_sample_candidates(candidates, positives), TAU)
    if objective == "infonce":
        return naive_infonce(logits)
    return naive_nce(logits, naive_z(logits.detach(), N), N)


def _run_shared(backend, query, anchors, candidates, positives, objective, chunk_size=None, masks=(None, None)):
    query = query.detach().float().requires_grad_()
    loss, log_z = relation_loss(
        backend, query, anchors.float(), candidates.float(), None if positives is None else positives.float(),
        torch.zeros(()), torch.tensor(False), *masks,
        temperature=TAU, eps=1e-6, objective=objective, noise_size=N, chunk_size=chunk_size,
    )
    loss.backward()
    return loss.detach().double(), log_z, query.grad.double()


def _assert_close(got, expected, tolerance=1e-5):
    (loss, grad), (ref_loss, ref_grad) = got, expected
    torch.testing.assert_close(loss, ref_loss, rtol=tolerance, atol=tolerance)
    scale = ref_grad.abs().max()
    torch.testing.assert_close(grad / scale, ref_grad / scale, rtol=0, atol=tolerance)


def test_the_two_forms_are_picked_by_shape():
    assert not uses_gram_form(*FORMS["difference"]) and uses_gram_form(*FORMS["gram"])


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("kind", ["random", "near"])
def test_shared_logits_match_naive_loops_in_values_and_all_gradients(form, kind):
    query, anchors, candidates, _ = _inputs(form, "queue", kind)
    inputs64 = [x.clone().requires_grad_() for x in (query, anchors, candidates)]
    inputs32 = [x.detach().float().requires_grad_() for x in inputs64]
    expected = naive_relations(inputs64[0], inputs64[1], inputs64[2][None].expand(len(query), -1, -1), TAU)
    got = shared_relation_logits(*inputs32, TAU)
    torch.testing.assert_close(got.double(), expected, atol=2e-4, rtol=1e-5)
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (expected * weights).sum().backward()
    (got * weights.float()).sum().backward()
    for ours, ref in zip(inputs32, inputs64):
        scale = ref.grad.abs().max()
        torch.testing.assert_close(ours.grad.double() / scale, ref.grad / scale, atol=5e-5, rtol=0)


def test_candidate_equal_to_its_anchor_gets_the_constant_eps_direction():
    query, anchors, candidates, _ = _inputs("difference", "queue")
    for form_inputs in ((query, anchors, candidates), (query[:5], anchors, candidates)):  # D <= B, then D > B
        q, a, c = (x.float() for x in form_inputs)
        got = shared_relation_logits(q, a, c, TAU)[:, 3, 2]  # candidate 2 is anchor 3
        expected = F.normalize(q - a[3] + 1e-6, dim=-1).sum(-1) / q.shape[1] ** 0.5 / TAU
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "naive", "chunked"])
@pytest.mark.parametrize("objective", ["nce", "infonce"])
@pytest.mark.parametrize("layout", ["batch", "queue"])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_shared_core_matches_naive_values_and_query_gradient(backend, objective, layout, form):
    query, anchors, candidates, positives = _inputs(form, layout)
    reference = query.clone().requires_grad_()
    expected = _naive_loss(reference, anchors, candidates, positives, objective)
    expected.backward()
    chunk_size = 4 if backend == "chunked" else None  # 9 or 11 candidates: the last chunk is short
    loss, _, grad = _run_shared(
        "eager" if backend == "chunked" else backend, query, anchors, candidates, positives, objective, chunk_size
    )
    _assert_close((loss, grad), (expected.detach(), reference.grad))


def _masks(layout, batch, num_anchors):
    """self_anchor="mask" for anchors = the first A samples: shared ``[A, M]`` and per-sample forms."""
    anchor_pos = torch.arange(num_anchors)
    if layout == "batch":
        shared = (anchor_pos[:, None] == torch.arange(batch)[None, :], None)
        ids = in_batch_candidate_index(batch)
    else:
        shared = (None, torch.arange(batch)[:, None] == anchor_pos[None, :])
        ids = torch.cat([torch.arange(batch)[:, None], torch.full((batch, 11), -1)], dim=1)
    return shared, ids[:, None, :] == anchor_pos[None, :, None]


@pytest.mark.parametrize("objective", ["nce", "infonce"])
@pytest.mark.parametrize("layout", ["batch", "queue"])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_masked_shared_core_equals_the_masked_per_sample_core(objective, layout, chunk_size):
    query, anchors, candidates, positives = _inputs("difference", layout)
    shared_masks, mask = _masks(layout, len(query), len(anchors))
    got = _run_shared("eager", query, anchors, candidates, positives, objective, chunk_size, shared_masks)
    reference = query.detach().float().requires_grad_()
    per_sample = _per_sample_candidates(candidates, positives).float()
    loss, log_z = relation_loss(
        "eager", reference, anchors.float(), per_sample, None, torch.zeros(()), torch.tensor(False), mask,
        temperature=TAU, eps=1e-6, objective=objective, noise_size=N,
    )
    loss.backward()
    _assert_close((got[0], got[2]), (loss.detach().double(), reference.grad.double()))
    torch.testing.assert_close(got[1], log_z, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("objective", ["nce", "infonce"])
@pytest.mark.parametrize("layout", ["batch", "queue"])
def test_anchor_free_shared_core_equals_the_per_sample_crd_core(objective, layout):
    query, _, candidates, positives = _inputs("difference", layout)
    query32 = query.detach().float().requires_grad_()
    loss, _ = relation_loss(
        "eager", query32, None, candidates.float(), None if positives is None else positives.float(),
        torch.zeros(()), torch.tensor(False), temperature=TAU, eps=1e-6, objective=objective, noise_size=N,
    )
    loss.backward()
    reference = query.detach().float().requires_grad_()
    expected, _ = relation_loss(
        "eager", reference, None, _per_sample_candidates(candidates, positives).float(), None, torch.zeros(()),
        torch.tensor(False), None, temperature=TAU, eps=1e-6, objective=objective, noise_size=N,
    )
    expected.backward()
    _assert_close((loss.double(), query32.grad.double()), (expected.double(), reference.grad.double()))


@pytest.mark.parametrize("form", sorted(FORMS))
def test_shared_core_never_expands_the_candidates_per_sample(form):
    # B * M * D dominates every tensor the shared path needs (scores B * A * M, [A, M, D] or [M, D]).
    batch, dim = (64, 8) if form == "difference" else (8, 64)
    g = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    anchors = F.normalize(torch.randn(2, dim, generator=g), dim=-1)
    queue = F.normalize(torch.randn(512, dim, generator=g), dim=-1)
    with LargestTensor() as probe:
        loss, _ = relation_loss(
            "eager", query, anchors, queue, anchors.new_zeros(batch, dim).add_(query.detach()),
            torch.zeros(()), torch.tensor(False), temperature=TAU, eps=1e-6, objective="nce", noise_size=N,
        )
        loss.backward()
    assert probe.largest * 4 <= batch * 512 * dim


@pytest.mark.slow
def test_compiled_shared_core_matches_naive_values_and_gradients():
    import crcd_plugin.relation_loss as dispatch

    torch._dynamo.reset()
    query, anchors, candidates, positives = _inputs("difference", "batch")
    reference = query.clone().requires_grad_()
    expected = _naive_loss(reference, anchors, candidates, positives, "nce")
    expected.backward()
    loss, _, grad = _run_shared("compile", query, anchors, candidates, positives, "nce")
    assert not dispatch._COMPILED.failures, "compile fell back to eager"
    _assert_close((loss, grad), (expected.detach(), reference.grad))


CONFIGS = [
    dict(negatives="batch", objective="nce"),
    dict(negatives="batch", objective="infonce", self_anchor="mask", symmetric=False),
    dict(negatives="batch", objective="nce", anchored=False),
    dict(negatives="queue", objective="nce", self_anchor="mask"),
    dict(negatives="queue", objective="infonce", num_negatives=7),  # a random subset of the queue
    dict(negatives="queue", objective="nce", anchored=False, chunk_size=5),
    dict(negatives="batch", objective="infonce", embed_dim=32, chunk_size=3),  # D > B: the Gram form
    # The student-side loss also trains the teacher head: gradients through anchors and candidates.
    # In float64: where a candidate is its anchor's own sample, the two reach the teacher head as
    # two ~1/eps terms that cancel, and in fp32 what is left is rounding (0.03 of the gradient's
    # scale for the naive formulation itself, so neither path can match another to 1e-4 there).
    dict(negatives="batch", objective="nce", symmetric=False, train_teacher_embedding=True, dtype=torch.float64),
    dict(negatives="queue", objective="infonce", symmetric=False, train_teacher_embedding=True, embed_dim=32,
         dtype=torch.float64),
]


def _train(config, share):
    torch.manual_seed(0)
    config = dict(config)
    dtype = config.pop("dtype", torch.float32)
    negatives = config.pop("negatives")
    queue = {"queue_size": 16} if negatives == "queue" else {}
    crcd = CRCDLoss(10, 12, RelationConfig(**{"embed_dim": 6, "num_anchors": 5, **queue, **config}),
                    negatives=negatives).to(dtype)
    steps = []
    for step in range(3):  # the first step fixes NCE's Z and fills the queue, later ones use them
        g = torch.Generator().manual_seed(step)
        student, teacher = torch.randn(8, 10, generator=g).to(dtype), torch.randn(8, 12, generator=g).to(dtype)
        torch.manual_seed(100 + step)  # same anchors and queue draws on both paths
        crcd.zero_grad()
        with contextlib.nullcontext() if share else per_sample_candidates():
            loss = crcd(student, teacher)
        loss.backward()
        steps.append((loss.detach(), [p.grad.clone() for p in crcd.parameters() if p.grad is not None]))
    return steps, crcd.state_dict()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if k != "dtype"))
def test_crcd_loss_shared_path_equals_the_per_sample_path(config):
    (shared_steps, shared_state), (steps, state) = _train(config, True), _train(config, False)
    for (loss, grads), (ref_loss, ref_grads) in zip(shared_steps, steps):
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        assert len(grads) == len(ref_grads) > 0
        for got, expected in zip(grads, ref_grads):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert shared_state.keys() == state.keys()
    for name, value in state.items():
        torch.testing.assert_close(shared_state[name], value, rtol=1e-5, atol=1e-6)


BANK_CONFIGS = [
    dict(objective="nce"),
    dict(objective="infonce", self_anchor="mask", symmetric=False),
    dict(objective="nce", anchored=False),
    dict(objective="infonce", memory_init="cold", chunk_size=5),
    dict(objective="nce", embed_dim=32),  # D > B: the Gram form
    dict(objective="infonce", symmetric=False, train_teacher_embedding=True, dtype=torch.float64),
]


def _train_bank(config, share, num_negatives=7, num_samples=20):
    """Three steps of a bank loss; the per-sample path gets every sample the one draw that the
    shared path made (recorded from the shared run), so both must give the same losses, gradients
    and memory."""
    torch.manual_seed(0)
    config = dict(config)
    dtype = config.pop("dtype", torch.float32)
    config = RelationConfig(**{"embed_dim": 6, "num_anchors": 5, "num_negatives": num_negatives,
                               "share_negatives": share, **config})
    crcd = CRCDLoss(10, 12, config, negatives="bank", num_samples=num_samples).to(dtype)
    bank = crcd.memory_teacher
    draw = bank.sample
    steps, draws = [], []
    for step in range(3):  # the first step reads unwritten rows as the batch's own embeddings
        g = torch.Generator().manual_seed(step)
        student, teacher = torch.randn(8, 10, generator=g).to(dtype), torch.randn(8, 12, generator=g).to(dtype)
        index = torch.randperm(num_samples, generator=g)[:8]
        index[7] = index[0]  # a sample twice in the batch
        torch.manual_seed(100 + step)
        shared_draw = draw(index, (num_negatives,))  # the draw both paths use
        draws.append(shared_draw)
        sample = (lambda _, shape, d=shared_draw: d) if share else (lambda _, shape, d=shared_draw: d.expand(*shape))
        bank.sample = sample  # an instance attribute: only this bank's draws are replaced
        torch.manual_seed(200 + step)  # same anchors on both paths
        crcd.zero_grad()
        loss = crcd(student, teacher, index=index)
        loss.backward()
        steps.append((loss.detach(), [p.grad.clone() for p in crcd.parameters() if p.grad is not None]))
    return steps, crcd.state_dict(), draws


@pytest.mark.parametrize("config", BANK_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_shared_bank_negatives_equal_the_per_sample_path_given_the_same_draw(config):
    shared_steps, shared_state, draws = _train_bank(config, True)
    steps, state, ref_draws = _train_bank(config, False)
    assert all(torch.equal(a, b) for a, b in zip(draws, ref_draws))
    assert any(len(set(d.tolist())) > 1 for d in draws)  # real draws, not one repeated row
    for (loss, grads), (ref_loss, ref_grads) in zip(shared_steps, steps):
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        assert len(grads) == len(ref_grads) > 0
        for got, expected in zip(grads, ref_grads):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    for name, value in state.items():
        torch.testing.assert_close(shared_state[name], value, rtol=1e-5, atol=1e-6)


def test_shared_bank_negatives_are_one_draw_for_the_whole_batch():
    torch.manual_seed(0)
    crcd = CRCDLoss(10, 12, RelationConfig(embed_dim=6, num_negatives=9, share_negatives=True), negatives="bank",
                    num_samples=50)
    drawn = []
    sample = crcd.memory_teacher.sample
    crcd.memory_teacher.sample = lambda index, shape: drawn.append(shape) or sample(index, shape)
    crcd(torch.randn(8, 10), torch.randn(8, 12), index=torch.arange(8)).backward()
    assert drawn == [(9,)]  # K slots, not [B, K]
    assert "share_negatives=True" in repr(crcd)


@pytest.mark.parametrize("negatives", ["queue", "batch"])
def test_share_negatives_needs_a_bank(negatives):
    with pytest.raises(ValueError, match='share_negatives=True .* needs negatives="bank"'):
        CRCDLoss(10, 12, RelationConfig(queue_size=32, share_negatives=True), negatives=negatives)

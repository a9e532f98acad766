"""Properties of the relation math, over generated shapes and values (hypothesis, float64).

Each property follows from the formula ``logit[b, j, k] = <n(c[b,k] - a[j] + eps), n(s[b] - a[j] + eps)> / tau``
(``n`` = L2 normalisation) and the two objectives over its last axis (index 0 = positive).
"""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from naive import naive_infonce, naive_nce, naive_relations, naive_z

from crcd_plugin.functional import infonce_loss, nce_log_normalizer, nce_loss, relation_logits

TAU = 0.07
PROPERTY = settings(max_examples=25, deadline=None)


@st.composite
def relation_inputs(draw, max_batch=5, max_anchors=4, max_candidates=6, max_dim=6):
    """``(student [B, D], anchors [A, D], candidates [B, K+1, D])`` in float64, some candidates equal to anchors."""
    batch = draw(st.integers(1, max_batch))
    anchors_n = draw(st.integers(1, max_anchors))
    candidates_n = draw(st.integers(2, max_candidates))
    dim = draw(st.integers(2, max_dim))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    student = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    anchors = torch.randn(anchors_n, dim, generator=g, dtype=torch.float64)
    candidates = torch.randn(batch, candidates_n, dim, generator=g, dtype=torch.float64)
    if draw(st.booleans()):
        # As in the bank: a sample's positive is its own anchor (the degenerate, eps-direction entry).
        rows = min(batch, anchors_n)
        candidates[:rows, 0] = anchors[:rows]
    return student, anchors, candidates


@PROPERTY
@given(relation_inputs())
def test_relation_logits_have_shape_batch_anchors_candidates(inputs):
    student, anchors, candidates = inputs
    logits = relation_logits(student, anchors, candidates, TAU)
    assert logits.shape == (student.shape[0], anchors.shape[0], candidates.shape[1])
    assert logits.dtype == torch.float64


@PROPERTY
@given(relation_inputs())
def test_relation_logits_equal_the_naive_loops_in_float64(inputs):
    student, anchors, candidates = inputs
    expected = naive_relations(student, anchors, candidates, TAU)
    torch.testing.assert_close(relation_logits(student, anchors, candidates, TAU), expected, rtol=1e-9, atol=1e-9)


@PROPERTY
@given(relation_inputs(), st.randoms(use_true_random=False))
def test_permuting_the_batch_permutes_the_rows(inputs, rng):
    student, anchors, candidates = inputs
    order = torch.tensor(rng.sample(range(student.shape[0]), student.shape[0]))
    logits = relation_logits(student, anchors, candidates, TAU)
    permuted = relation_logits(student[order], anchors, candidates[order], TAU)
    torch.testing.assert_close(permuted, logits[order], rtol=0, atol=1e-12)


@PROPERTY
@given(relation_inputs(), st.randoms(use_true_random=False))
def test_permuting_the_anchors_permutes_the_anchor_axis(inputs, rng):
    student, anchors, candidates = inputs
    order = torch.tensor(rng.sample(range(anchors.shape[0]), anchors.shape[0]))
    logits = relation_logits(student, anchors, candidates, TAU)
    permuted = relation_logits(student, anchors[order], candidates, TAU)
    torch.testing.assert_close(permuted, logits[:, order], rtol=0, atol=1e-12)


@PROPERTY
@given(relation_inputs(), st.randoms(use_true_random=False))
def test_permuting_the_negatives_permutes_the_scores_and_leaves_both_objectives_unchanged(inputs, rng):
    student, anchors, candidates = inputs
    negatives = rng.sample(range(1, candidates.shape[1]), candidates.shape[1] - 1)
    order = torch.tensor([0, *negatives])
    logits = relation_logits(student, anchors, candidates, TAU)
    permuted = relation_logits(student, anchors, candidates[:, order], TAU)
    torch.testing.assert_close(permuted, logits[..., order], rtol=0, atol=1e-12)
    log_z = nce_log_normalizer(logits, noise_size=100)
    torch.testing.assert_close(nce_loss(permuted, log_z, 100), nce_loss(logits, log_z, 100))
    torch.testing.assert_close(infonce_loss(permuted), infonce_loss(logits))


@PROPERTY
@given(relation_inputs(), st.floats(-3.0, 3.0, allow_subnormal=False))
def test_translating_every_embedding_by_one_vector_changes_nothing(inputs, scale):
    # Relations are differences to anchors: a common shift cancels (eps is added after it).
    student, anchors, candidates = inputs
    shift = scale * torch.linspace(-1.0, 1.0, student.shape[1], dtype=torch.float64)
    logits = relation_logits(student, anchors, candidates, TAU)
    moved = relation_logits(student + shift, anchors + shift, candidates + shift, TAU)
    torch.testing.assert_close(moved, logits, rtol=1e-9, atol=1e-9)


@PROPERTY
@given(relation_inputs(), st.floats(0.01, 1.0, allow_subnormal=False))
def test_scores_scale_inversely_with_the_temperature(inputs, tau):
    student, anchors, candidates = inputs
    torch.testing.assert_close(
        relation_logits(student, anchors, candidates, tau) * tau,
        relation_logits(student, anchors, candidates, 1.0),
        rtol=1e-9,
        atol=1e-12,
    )


@PROPERTY
@given(relation_inputs())
def test_scores_are_cosines_over_tau(inputs):
    student, anchors, candidates = inputs
    logits = relation_logits(student, anchors, candidates, TAU)
    assert bool((logits.abs() <= 1.0 / TAU + 1e-9).all())


@PROPERTY
@given(relation_inputs(), st.integers(1, 1000))
def test_objectives_equal_the_naive_probability_forms_in_float64(inputs, num_samples):
    logits = relation_logits(*inputs, TAU)
    z = naive_z(logits, num_samples)
    torch.testing.assert_close(nce_log_normalizer(logits, num_samples), torch.log(z), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(nce_loss(logits, torch.log(z), num_samples), naive_nce(logits, z, num_samples))
    torch.testing.assert_close(infonce_loss(logits), naive_infonce(logits))

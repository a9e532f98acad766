"""Fast paths equal the naive formulation and never build the [B, A, K+1, D] tensor."""

import pytest
import torch
import torch.nn.functional as F
from naive import naive_nce, naive_relations, naive_z
from probes import LargestTensor

from crcd_plugin.config import BACKENDS
from crcd_plugin.kernels import gram_relation_logits, naive_relation_logits
from crcd_plugin.relation_loss import BACKEND_LOSSES, relation_loss, relation_loss_core

B, A, K, D = 8, 8, 63, 256
FOUR_D = B * A * (K + 1) * D
# The candidates themselves are [B, K+1, D] = FOUR_D / A; nothing may be larger than twice that.
LIMIT = 2 * B * (K + 1) * D


def _bank_like_inputs(batch=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    anchors = F.normalize(torch.randn(A, D, generator=g), dim=-1)
    candidates = F.normalize(torch.randn(batch, K + 1, D, generator=g), dim=-1)
    candidates[: min(batch, A), 0] = anchors[: min(batch, A)]  # positive = own anchor, as in the bank
    candidates[:, 7] = anchors[torch.arange(batch) % A] + 1e-3 * F.normalize(torch.randn(batch, D, generator=g), dim=-1)
    student = F.normalize(torch.randn(batch, D, generator=g), dim=-1).requires_grad_()
    return student, anchors, candidates


def _largest_tensor(kernel):
    student, anchors, candidates = _bank_like_inputs()
    with LargestTensor() as mode:
        kernel(student, anchors, candidates, 0.05).logsumexp(-1).sum().backward()
    return mode.largest


def test_gram_kernel_never_materialises_the_four_d_tensor():
    assert _largest_tensor(gram_relation_logits) <= LIMIT


def test_largest_tensor_probe_catches_the_naive_kernel():
    assert _largest_tensor(naive_relation_logits) >= FOUR_D


def _graph_largest_numel(fn, *args):
    """Largest tensor in the forward and backward graphs that torch.compile would hand to inductor."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    sizes = []

    def record(graph_module, example_inputs):
        for node in graph_module.graph.nodes:
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor):
                sizes.append(value.numel())
        return make_boxed_func(graph_module.forward)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True)
    compiled(*args)[0].backward()
    return max(sizes)


def test_compiled_graph_never_holds_the_four_d_tensor():
    student, anchors, candidates = _bank_like_inputs()
    largest = _graph_largest_numel(
        lambda s, a, c: relation_loss_core(
            s, a, c, None, torch.zeros(()), torch.tensor(False), None, None, 0.05, 1e-6, "nce", 1000
        ),
        student,
        anchors,
        candidates,
    )
    assert largest <= LIMIT


def _expected_nce(student, anchors, candidates):
    logits = naive_relations(student.double(), anchors.double(), candidates.double(), 0.05)
    return naive_nce(logits, naive_z(logits.detach(), 1000), 1000)


@pytest.mark.slow
def test_compiled_core_matches_naive_values_and_gradients_across_batch_sizes():
    torch._dynamo.reset()
    for batch in (B, B - 3):  # the second size must reuse the dynamic-shape graph
        student, anchors, candidates = _bank_like_inputs(batch, seed=batch)
        reference = student.detach().double().requires_grad_()
        loss, log_z = relation_loss(
            "compile", student, anchors, candidates, None, torch.zeros(()), torch.tensor(False), None,
            temperature=0.05, eps=1e-6, objective="nce", noise_size=1000,
        )
        loss.backward()
        expected = _expected_nce(reference, anchors, candidates)
        expected.backward()
        torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-4)
        scale = reference.grad.abs().max()
        torch.testing.assert_close(student.grad.double() / scale, reference.grad / scale, atol=1e-4, rtol=0)
    import crcd_plugin.relation_loss as dispatch

    assert not dispatch._COMPILED.failures, "compile fell back to eager"


@pytest.mark.parametrize("objective", ["nce", "infonce"])
def test_eager_and_naive_backends_agree(objective):
    student, anchors, candidates = _bank_like_inputs()
    mask = torch.zeros(B, A, K + 1, dtype=torch.bool)
    mask[:, :, 7] = True
    results = []
    for backend in ("eager", "naive"):
        s = student.detach().clone().requires_grad_()
        loss, _ = relation_loss(
            backend, s, anchors, candidates, None, torch.zeros(()), torch.tensor(False), mask,
            temperature=0.05, eps=1e-6, objective=objective, noise_size=1000,
        )
        loss.backward()
        results.append((loss, s.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-5)


def test_every_configurable_backend_has_a_loss_and_an_unresolved_one_is_refused():
    assert set(BACKEND_LOSSES) == set(BACKENDS) - {"auto"}
    student, anchors, candidates = _bank_like_inputs()
    for backend in ("auto", "fused"):
        with pytest.raises(ValueError, match=f"backend must be one of .*got '{backend}'"):
            relation_loss(backend, student, anchors, candidates, None, torch.zeros(()), torch.tensor(False),
                          temperature=0.05, eps=1e-6, objective="nce", noise_size=1000)


@pytest.mark.parametrize("objective", ["nce", "infonce"])
@pytest.mark.parametrize("anchored", [True, False])
@pytest.mark.parametrize("masked", [True, False])
def test_chunked_core_equals_unchunked(objective, anchored, masked):
    student, anchors, candidates = _bank_like_inputs()
    mask = None
    if masked:
        mask = torch.zeros(B, A if anchored else 1, K + 1, dtype=torch.bool)
        mask[0, 0, 0] = True  # a dropped row
        mask[:, :, 7] = True  # a masked negative
    results = []
    for chunk_size in (None, 10):  # 64 candidates in chunks of 10: the last chunk is short
        s = student.detach().clone().requires_grad_()
        loss, log_z = relation_loss(
            "eager", s, anchors if anchored else None, candidates, None, torch.zeros(()), torch.tensor(False), mask,
            temperature=0.05, eps=1e-6, objective=objective, noise_size=1000, chunk_size=chunk_size,
        )
        loss.backward()
        results.append((loss, log_z, s.grad))
    (loss0, z0, g0), (loss1, z1, g1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z1, z0, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)


def _largest_tensor_of_core(chunk_size):
    # Scores dominate here: [B, A, K+1] = 16 * 16 * 256 against candidates [B, K+1, D] = 16 * 256 * 4.
    g = torch.Generator().manual_seed(0)
    student = torch.randn(16, 4, generator=g).requires_grad_()
    anchors, candidates = torch.randn(16, 4, generator=g), torch.randn(16, 256, 4, generator=g)
    with LargestTensor() as mode:
        loss, _ = relation_loss(
            "eager", student, anchors, candidates, None, torch.zeros(()), torch.tensor(False), None,
            temperature=0.05, eps=1e-6, objective="nce", noise_size=1000, chunk_size=chunk_size,
        )
        loss.backward()
    return mode.largest


def test_chunked_core_never_holds_all_scores():
    scores = 16 * 16 * 256
    assert _largest_tensor_of_core(None) >= scores  # the probe sees the scores when unchunked
    assert _largest_tensor_of_core(16) <= scores // 4


def test_crcd_loss_chunk_size_is_validated():
    from crcd_plugin import CRCDLoss, RelationConfig

    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        CRCDLoss(4, 4, RelationConfig(chunk_size=0), negatives="batch")


@pytest.mark.slow
def test_option_sets_beyond_dynamos_recompile_limit_still_compile(monkeypatch):
    # Every cached core once shared one code object, so dynamo's per-code recompile limit (8) made
    # the ninth option set fail to compile and run eager. A limit of 2 shows it with 3 sets.
    import crcd_plugin.relation_loss as dispatch

    monkeypatch.setattr(dispatch, "_COMPILED", dispatch.CompileCache())
    query, anchors, candidates = torch.randn(4, 8, requires_grad=True), torch.randn(3, 8), torch.randn(4, 6, 8)
    state = torch.zeros(()), torch.tensor(False)
    with torch._dynamo.config.patch(recompile_limit=2):
        for temperature in (0.05, 0.06, 0.07):
            compiled, _ = relation_loss("compile", query, anchors, candidates, None, *state, temperature=temperature,
                                        eps=1e-6, objective="infonce", noise_size=100)
            eager, _ = relation_loss("eager", query, anchors, candidates, None, *state, temperature=temperature,
                                     eps=1e-6, objective="infonce", noise_size=100)
            torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert dispatch._COMPILED.failures == {} and len(dispatch._COMPILED.compiled) == 3


def test_a_failed_compile_runs_eager_for_its_inputs_only_and_the_cache_is_bounded(monkeypatch):
    import crcd_plugin.relation_loss as dispatch

    cache = dispatch.CompileCache(size=2)
    monkeypatch.setattr(dispatch, "_COMPILED", cache)
    calls = []

    def fake_compile(core, **options):  # per-sample candidates "fail to compile", shared ones compile
        def compiled(*tensors):
            calls.append(tensors[2].dim())
            if tensors[2].dim() == 3:
                raise RuntimeError("inductor failed")
            return core(*tensors)

        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    student, anchors, candidates = _bank_like_inputs()
    options = dict(eps=1e-6, objective="nce", noise_size=1000)

    def run(backend, candidates, temperature=0.05):
        state = (None, torch.zeros(()), torch.tensor(False))
        return relation_loss(backend, student, anchors, candidates, *state, temperature=temperature, **options)[0]

    torch.testing.assert_close(run("compile", candidates), run("eager", candidates))  # fell back to eager
    assert len(cache.failures) == 1
    shared = candidates[0]
    torch.testing.assert_close(run("compile", shared), run("eager", shared))
    run("compile", candidates)  # the failure is remembered: no second attempt for these inputs
    assert calls == [3, 2]
    for temperature in (0.1, 0.2, 0.3):
        run("compile", shared, temperature)
    assert len(cache.compiled) == 2

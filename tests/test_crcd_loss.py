"""CRCDLoss: the whole module against the naive reference, its state, and its input checks."""

import io

import pytest
import torch
import torch.nn.functional as F
from conftest import V020_BANK, V020_RELATION
from naive import naive_nce, naive_relations, naive_z

from crcd_plugin import CRCDLoss
from crcd_plugin.config import RelationConfig

B, DS, DT, EMBED, N, K = 6, 10, 14, 8, 40, 7
# 0.2.0's settings (the naive reference's: every sample an anchor, NCE on a bank, both sides), at this size.
V020_SMALL = dict(V020_RELATION, embed_dim=EMBED)


def _feats(seed=0, batch=B):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, DS, generator=g), torch.randn(batch, DT, generator=g)


def _bank_loss(num_samples=N, **options):
    torch.manual_seed(0)
    config = RelationConfig(**{**V020_BANK, "embed_dim": EMBED, "num_negatives": K, **options})
    return CRCDLoss(DS, DT, config, negatives="bank", num_samples=num_samples)


def _naive_bank_loss(crcd, student_feat, teacher_feat, index, seed):
    """Reference settings (A = B, keep self-anchors, NCE with Z from this first batch, symmetric)."""
    heads = [crcd.embed_student.proj, crcd.embed_teacher.proj]
    v = F.normalize(heads[0](student_feat.double()), dim=1)
    u = F.normalize(heads[1](teacher_feat.double()), dim=1)
    torch.manual_seed(seed)
    negatives = torch.randint(N, (B, K))
    cand_index = torch.cat([index[:, None], negatives], 1)
    total = 0.0
    for query, memory in ((v, crcd.memory_teacher.weight), (u, crcd.memory_student.weight)):
        memory = memory.double()
        logits = naive_relations(query, memory[index], memory[cand_index], crcd.temperature)
        total = total + naive_nce(logits, naive_z(logits.detach(), N), N)
    return total


def test_bank_loss_and_gradients_match_naive_reference():
    # The cold bank is the reference's: its random rows are used as samples from the start.
    crcd = _bank_loss(memory_init="cold").double()
    reference = _bank_loss(memory_init="cold").double()
    student_feat, teacher_feat = _feats()
    index = torch.tensor([3, 17, 0, 39, 22, 8])
    s1 = student_feat.double().requires_grad_()
    s2 = student_feat.double().requires_grad_()

    expected = _naive_bank_loss(reference, s2, teacher_feat, index, seed=5)
    torch.manual_seed(5)
    got = crcd(s1, teacher_feat.double(), index)
    torch.testing.assert_close(got, expected)

    got.backward()
    expected.backward()
    torch.testing.assert_close(s1.grad, s2.grad)
    for ours, ref in zip(crcd.parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad, ref.grad)


def test_bank_loss_in_fp32_matches_naive_reference():
    crcd, reference = _bank_loss(memory_init="cold"), _bank_loss(memory_init="cold").double()
    student_feat, teacher_feat = _feats()
    index = torch.arange(B) * 5
    expected = _naive_bank_loss(reference, student_feat, teacher_feat, index, seed=1)
    torch.manual_seed(1)
    torch.testing.assert_close(crcd(student_feat, teacher_feat, index).double(), expected, rtol=1e-4, atol=1e-4)


def test_cold_memory_rows_get_the_reference_momentum_update_in_training_only():
    crcd = _bank_loss(momentum=0.5, memory_init="cold")
    student_feat, teacher_feat = _feats()
    index = torch.tensor([1, 2, 3, 4, 5, 6])
    before = crcd.memory_student.weight.clone()
    crcd.eval()
    crcd(student_feat, teacher_feat, index)
    assert torch.equal(crcd.memory_student.weight, before)
    assert not crcd.z_ready.any()

    crcd.train()
    crcd(student_feat, teacher_feat, index)
    v = crcd.embed_student(student_feat).detach()
    expected = F.normalize(0.5 * before[index] + 0.5 * v, dim=1)
    torch.testing.assert_close(crcd.memory_student.weight[index], expected)
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(crcd.memory_student.weight[untouched], before[untouched])
    assert crcd.z_ready.all()


def test_nce_constant_is_fixed_by_the_first_training_batch():
    crcd = _bank_loss()
    crcd(*_feats(0), torch.arange(B))
    first = crcd.log_z.clone()
    crcd(*_feats(1), torch.arange(B) + 10)
    assert torch.equal(crcd.log_z, first)


def test_queue_wraps_around():
    crcd = CRCDLoss(DS, DT, RelationConfig(**V020_SMALL, queue_size=10), negatives="queue")
    batches = [_feats(seed) for seed in range(3)]  # 18 rows into a queue of 10
    for student_feat, teacher_feat in batches:
        crcd(student_feat, teacher_feat)
    assert int(crcd.memory_student.pointer) == 18 % 10
    embedded = [crcd.embed_student(s).detach() for s, _ in batches]
    # slots written: batch 0 -> 0..5, batch 1 -> 6..9 then 0..1, batch 2 -> 2..7
    torch.testing.assert_close(crcd.memory_student.weight[2:8], embedded[2])
    torch.testing.assert_close(crcd.memory_student.weight[8:10], embedded[1][2:4])
    torch.testing.assert_close(crcd.memory_student.weight[0:2], embedded[1][4:6])


def test_state_dict_round_trip_reproduces_the_loss():
    crcd = _bank_loss()
    for seed in range(3):
        crcd(*_feats(seed), torch.arange(B) + seed)
    buffer = io.BytesIO()
    torch.save(crcd.state_dict(), buffer)
    restored = _bank_loss()
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert {"memory_student.weight", "memory_teacher.weight", "log_z", "z_ready"} <= set(crcd.state_dict())
    torch.manual_seed(9)
    expected = crcd(*_feats(7), torch.arange(B))
    torch.manual_seed(9)
    torch.testing.assert_close(restored(*_feats(7), torch.arange(B)), expected)


def test_queue_pointer_round_trips_through_state_dict():
    crcd = CRCDLoss(DS, DT, RelationConfig(embed_dim=EMBED, queue_size=10), negatives="queue")
    crcd(*_feats())
    restored = CRCDLoss(DS, DT, RelationConfig(embed_dim=EMBED, queue_size=10), negatives="queue")
    restored.load_state_dict(crcd.state_dict())
    assert int(restored.memory_teacher.pointer) == B
    assert torch.equal(restored.memory_teacher.weight, crcd.memory_teacher.weight)


def test_state_travels_with_dtype_conversion():
    crcd = _bank_loss().double()
    assert crcd.memory_student.weight.dtype == torch.float64
    student_feat, teacher_feat = _feats()
    assert crcd(student_feat.double(), teacher_feat.double(), torch.arange(B)).dtype == torch.float64


def test_anchor_free_setting_is_crd():
    crcd = _bank_loss(anchored=False, symmetric=False, memory_init="cold")
    student_feat, teacher_feat = _feats()
    index = torch.arange(B)
    memory = crcd.memory_teacher.weight.clone()  # before the update of this step
    torch.manual_seed(3)
    got = crcd(student_feat, teacher_feat, index)
    torch.manual_seed(3)
    negatives = torch.randint(N, (B, K))
    v = crcd.embed_student(student_feat)
    logits = torch.einsum("bkd,bd->bk", memory[torch.cat([index[:, None], negatives], 1)], v) / crcd.temperature
    torch.testing.assert_close(got, naive_nce(logits, naive_z(logits.detach(), N), N))


def test_masking_self_anchors_drops_degenerate_entries():
    keep = _bank_loss(symmetric=False, memory_init="cold")
    mask = _bank_loss(symmetric=False, self_anchor="mask", memory_init="cold")
    student_feat, teacher_feat = _feats()
    index = torch.arange(B)
    memory = keep.memory_teacher.weight.clone().double()  # before the update of this step
    v = keep.embed_student(student_feat).detach().double()
    torch.manual_seed(2)
    kept = keep(student_feat, teacher_feat, index)
    torch.manual_seed(2)
    masked = mask(student_feat, teacher_feat, index)
    torch.manual_seed(2)
    negatives = torch.randint(N, (B, K))
    logits = naive_relations(v, memory[index], memory[torch.cat([index[:, None], negatives], 1)], 0.05)
    z = naive_z(logits, N)
    total, count = 0.0, 0
    for i in range(B):
        for j in range(B):
            if i == j:
                continue  # the positive is the anchor's own memory row: row dropped
            keep_k = torch.cat([torch.tensor([0]), (negatives[i] != index[j]).nonzero().flatten() + 1])
            total = total + naive_nce(logits[i, j][keep_k][None], z, N, k=K)
            count += 1
    torch.testing.assert_close(masked.double(), total / count, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(masked, kept)


@pytest.mark.parametrize("negatives, options", [("queue", {"queue_size": 16}), ("batch", {})])
def test_index_free_modes_train_heads_without_indices(negatives, options):
    crcd = CRCDLoss(DS, DT, RelationConfig(**V020_SMALL, objective="infonce", **options), negatives=negatives)
    student_feat = _feats()[0].requires_grad_()
    crcd(student_feat, _feats()[1]).backward()
    assert student_feat.grad.abs().sum() > 0
    assert crcd.embed_teacher.proj.weight.grad.abs().sum() > 0


def test_anchor_subset_uses_num_anchors_rows():
    crcd = _bank_loss(num_anchors=3, objective="infonce")
    loss = crcd.forward_parts(*_feats(), torch.arange(B))
    assert set(loss) == {"loss", "student_loss", "teacher_loss"}
    torch.testing.assert_close(loss["loss"], loss["student_loss"] + loss["teacher_loss"])


def test_teacher_feature_gets_no_gradient():
    crcd = _bank_loss()
    teacher_feat = _feats()[1].requires_grad_()
    crcd(_feats()[0], teacher_feat, torch.arange(B)).backward()
    assert teacher_feat.grad is None


def test_nonfinite_features_raise_and_leave_memory_untouched():
    crcd = _bank_loss()
    student_feat, teacher_feat = _feats()
    student_feat[2, 0] = float("nan")
    before = crcd.memory_student.weight.clone()
    with pytest.raises(ValueError, match="non-finite"):
        crcd(student_feat, teacher_feat, torch.arange(B))
    assert torch.equal(crcd.memory_student.weight, before)


def test_skip_mode_keeps_nonfinite_rows_out_of_memory_and_queue():
    crcd = _bank_loss(on_nonfinite="skip", symmetric=True)
    student_feat, teacher_feat = _feats()
    student_feat[2] = float("inf")
    before = crcd.memory_teacher.weight.clone()
    crcd(student_feat, teacher_feat, torch.arange(B))
    assert torch.isfinite(crcd.memory_student.weight).all() and torch.isfinite(crcd.memory_teacher.weight).all()
    assert torch.equal(crcd.memory_teacher.weight[2], before[2])
    assert not torch.equal(crcd.memory_teacher.weight[3], before[3])
    assert torch.isfinite(crcd.log_z).all()

    queue = CRCDLoss(DS, DT, RelationConfig(embed_dim=EMBED, queue_size=8, on_nonfinite="skip", symmetric=True),
                     negatives="queue")
    old = queue.memory_student.weight.clone()
    queue(student_feat, teacher_feat)
    assert torch.equal(queue.memory_student.weight[2], old[2])
    assert torch.isfinite(queue.memory_student.weight).all()


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda c: c(torch.randn(B, DS), torch.randn(B + 1, DT), torch.arange(B)), ValueError, "same batch size"),
        (
            lambda c: c(torch.randn(B, DS + 1), torch.randn(B, DT), torch.arange(B)),
            ValueError,
            r"student_feat must have shape \[B, 10\]",
        ),
        (
            lambda c: c(torch.randn(B, DS), torch.randn(B, DT, 2), torch.arange(B)),
            ValueError,
            "teacher_feat must have shape",
        ),
        (lambda c: c(torch.randint(0, 2, (B, DS)), torch.randn(B, DT), torch.arange(B)), TypeError, "floating-point"),
        (
            lambda c: c([0.0] * DS, torch.randn(B, DT), torch.arange(B)),
            TypeError,
            "student_feat must be a torch.Tensor",
        ),
        (lambda c: c(torch.randn(B, DS), torch.randn(B, DT)), ValueError, "needs index"),
        (lambda c: c(torch.randn(B, DS), torch.randn(B, DT), torch.arange(B).float()), TypeError, "integer tensor"),
        (
            lambda c: c(torch.randn(B, DS), torch.randn(B, DT), torch.arange(B + 1)),
            ValueError,
            r"index must have shape \[6\]",
        ),
        (
            lambda c: c(torch.randn(B, DS), torch.randn(B, DT), torch.arange(B) + N - 2),
            ValueError,
            r"index must be in \[0, num_samples=40\)",
        ),
        (lambda c: c(torch.randn(B, DS), torch.randn(B, DT), torch.arange(B) - 1), ValueError, "index must be in"),
        (lambda c: c(torch.randn(1, DS), torch.randn(1, DT), torch.arange(1)), ValueError, "at least two samples"),
        (lambda c: c(torch.randn(B, DS, device="meta"), torch.randn(B, DT), torch.arange(B)), ValueError, "is on meta"),
    ],
)
def test_bad_inputs_raise_clear_errors_and_leave_memory_untouched(call, error, message):
    crcd = _bank_loss()
    before = crcd.memory_student.weight.clone()
    with pytest.raises(error, match=message):
        call(crcd)
    assert torch.equal(crcd.memory_student.weight, before)


def test_batch_larger_than_queue_is_rejected():
    crcd = CRCDLoss(DS, DT, RelationConfig(embed_dim=EMBED, queue_size=4), negatives="queue")
    with pytest.raises(ValueError, match="queue_size=4"):
        crcd(*_feats())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"negatives": "bank"}, "needs num_samples"),
        ({"negatives": "queue"}, "needs queue_size"),
        ({"negatives": "batch", "num_negatives": 5}, "leave num_negatives=None"),
        ({"negatives": "memory"}, "negatives must be one of"),
        ({"negatives": "batch", "objective": "ce"}, "objective must be one of"),
        ({"negatives": "batch", "temperature": 0}, "temperature must be > 0"),
        ({"negatives": "batch", "embed_head": "identity"}, 'head="identity"'),
        ({"negatives": "bank", "num_samples": 10, "num_negatives": 0}, "num_negatives must be a positive int"),
    ],
)
def test_bad_options_raise_clear_errors(options, message):
    options = dict(options)
    arguments = {name: options.pop(name) for name in ("negatives", "num_samples") if name in options}
    with pytest.raises(ValueError, match=message):
        CRCDLoss(DS, DT, RelationConfig(**options), **arguments)


def test_loss_core_runs_in_fp32_under_autocast():
    crcd = _bank_loss()
    student_feat, teacher_feat = _feats()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(4)
        mixed = crcd.forward_parts(student_feat.bfloat16(), teacher_feat.bfloat16(), torch.arange(B))
    crcd_fp32 = _bank_loss()
    torch.manual_seed(4)
    exact = crcd_fp32(student_feat.bfloat16().float(), teacher_feat.bfloat16().float(), torch.arange(B))
    assert mixed["loss"].dtype == torch.float32
    # bf16 features are upcast, and heads and core run in fp32 despite autocast: same loss.
    torch.testing.assert_close(mixed["loss"], exact, rtol=1e-5, atol=1e-5)


def test_chunked_loss_equals_unchunked_and_updates_the_same_state():
    whole, chunked = _bank_loss(), _bank_loss(chunk_size=3)  # K + 1 = 8 candidates: chunks 3, 3, 2
    for seed in range(2):  # the first call fixes Z, the second uses it
        student_feat, teacher_feat = _feats(seed)
        torch.manual_seed(seed)
        expected = whole(student_feat, teacher_feat, torch.arange(B) + seed)
        torch.manual_seed(seed)
        torch.testing.assert_close(chunked(student_feat, teacher_feat, torch.arange(B) + seed), expected)
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(chunked.state_dict()[name], value)


def test_repeated_indices_in_a_batch_take_the_last_occurrence():
    from crcd_plugin import MemoryBank

    torch.manual_seed(0)
    bank = MemoryBank(10, 4, momentum=0.5, init="cold")
    before = bank.weight.clone()
    values = torch.randn(3, 4)
    bank.update(torch.tensor([7, 2, 7]), values)
    torch.testing.assert_close(bank.weight[7], F.normalize(0.5 * before[7] + 0.5 * values[2], dim=0))
    torch.testing.assert_close(bank.weight[2], F.normalize(0.5 * before[2] + 0.5 * values[1], dim=0))


def test_value_checks_off_the_cpu_are_device_asserts_that_never_read_a_value_back(monkeypatch):
    crcd = _bank_loss()
    asserted = []
    monkeypatch.setattr(torch, "_assert_async", lambda flag, message: asserted.append(message))

    def host_read(self):
        raise AssertionError("a device value was read on the host")

    monkeypatch.setattr(torch.Tensor, "__bool__", host_read)
    # meta tensors stand for an accelerator's: their values are never available on the host
    crcd._check_values(torch.ones(B, dtype=torch.bool, device="meta"), torch.arange(B, device="meta"))
    assert [message.split(" ")[0] for message in asserted] == ["non-finite", "index"]

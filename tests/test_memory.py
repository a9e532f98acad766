"""The memory bank is right from each row's first write; never-written rows never act as samples."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crcd_plugin import CRCDConfig, CRCDDistiller, CRCDLoss, MemoryBank
from crcd_plugin.config import RelationConfig

B, DS, DT, EMBED, N, K = 6, 10, 14, 8, 40, 7


def _feats(seed=0, batch=B):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, DS, generator=g), torch.randn(batch, DT, generator=g)


def _bank_loss(num_samples=N, **options):
    torch.manual_seed(0)
    config = RelationConfig(**{"embed_dim": EMBED, "num_negatives": K, **options})
    return CRCDLoss(DS, DT, config, negatives="bank", num_samples=num_samples)


def _unit(rows, dim=4, seed=0):
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def _poison_unwritten_rows(crcd):
    """Put NaN in every row not written yet: any read of one as a sample makes the loss NaN."""
    for bank in (crcd.memory_student, crcd.memory_teacher):
        if bank is not None:  # a one-sided loss has no student-side memory
            bank.weight[~bank.seen] = float("nan")


# ---------------------------------------------------------------- MemoryBank


def test_first_write_stores_the_embedding_and_later_writes_blend():
    bank = MemoryBank(10, 4, momentum=0.5)
    first, second = _unit(2, seed=1), _unit(2, seed=2)
    bank.update(torch.tensor([3, 5]), first)
    torch.testing.assert_close(bank.weight[[3, 5]], first)
    assert bank.seen.tolist() == [i in (3, 5) for i in range(10)]
    bank.update(torch.tensor([3, 5]), second)
    torch.testing.assert_close(bank.weight[[3, 5]], F.normalize(0.5 * first + 0.5 * second, dim=1))


def test_repeated_indices_in_a_first_write_take_the_last_occurrence():
    bank = MemoryBank(10, 4)
    values = _unit(3)
    bank.update(torch.tensor([7, 2, 7]), values)
    torch.testing.assert_close(bank.weight[7], values[2])
    torch.testing.assert_close(bank.weight[2], values[1])


def test_invalid_rows_stay_unwritten():
    bank = MemoryBank(10, 4)
    before = bank.weight.clone()
    bank.update(torch.tensor([1, 2]), _unit(2), valid=torch.tensor([True, False]))
    assert bank.seen[1] and not bank.seen[2]
    assert torch.equal(bank.weight[2], before[2])


def test_cold_bank_counts_every_row_as_written_and_blends_the_first_write():
    torch.manual_seed(0)
    bank = MemoryBank(10, 4, momentum=0.5, init="cold")
    before = bank.weight.clone()
    values = _unit(2)
    assert bool(bank.seen.all())
    bank.update(torch.tensor([3, 5]), values)
    torch.testing.assert_close(bank.weight[[3, 5]], F.normalize(0.5 * before[[3, 5]] + 0.5 * values, dim=1))
    torch.manual_seed(1)
    drawn = bank.sample(torch.tensor([3, 5]), (2, 50))
    torch.manual_seed(1)
    assert torch.equal(drawn, torch.randint(10, (2, 50)))  # the reference's uniform draw over all rows


def test_negatives_are_drawn_only_among_written_rows_and_the_batch():
    bank = MemoryBank(50, 4)
    bank.update(torch.tensor([4, 9, 30]), _unit(3))
    index = torch.tensor([9, 12, 12])  # 9 written; 12 unwritten, its last occurrence is position 2
    torch.manual_seed(0)
    slots = bank.sample(index, (400,))
    assert set(slots.tolist()) == {4, 9, 30, 50 + 2}  # each reachable slot drawn, nothing else


@pytest.mark.parametrize("repeats", [1, 8])  # few slots: gathers and a where; many: one gather from [bank; batch]
def test_unwritten_batch_rows_read_the_current_embedding(repeats):
    bank = MemoryBank(10, 4)
    stored = _unit(1, seed=3)
    bank.update(torch.tensor([1]), stored)
    current = _unit(3, seed=4)
    index = torch.tensor([1, 6, 6])
    slots = bank.slots(index)
    assert slots.tolist() == [1, 10 + 2, 10 + 2]
    rows = bank.read(slots.repeat(repeats), current)
    torch.testing.assert_close(rows, torch.stack([stored[0], current[2], current[2]]).repeat(repeats, 1))


def test_seen_flags_round_trip_through_state_dict():
    bank = MemoryBank(10, 4)
    bank.update(torch.tensor([2, 8]), _unit(2))
    restored = MemoryBank(10, 4)
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.seen, bank.seen) and torch.equal(restored.weight, bank.weight)


def test_state_dict_without_seen_flags_loads_with_every_row_written():
    old_checkpoint = {"weight": _unit(10)}  # saved before the flags existed
    bank = MemoryBank(10, 4)
    bank.load_state_dict(old_checkpoint)  # strict
    assert bool(bank.seen.all())
    torch.testing.assert_close(bank.read(torch.arange(10), _unit(10, seed=5)), old_checkpoint["weight"])


def test_results_do_not_depend_on_the_host_knowing_that_every_row_is_written():
    bank = MemoryBank(8, 4)
    bank.update(torch.arange(8), _unit(8))
    assert bank._all_seen  # learnt on CPU at the write that completed the bank
    index, current = torch.tensor([1, 5]), _unit(2, seed=6)
    torch.manual_seed(0)
    fast = bank.read(bank.sample(index, (2, 20)), current)
    bank._all_seen = False  # the device-side slot path
    torch.manual_seed(0)
    slow = bank.read(bank.sample(index, (2, 20)), current)
    assert torch.equal(fast, slow)


# ---------------------------------------------------------------- CRCDLoss with a bank


@pytest.mark.parametrize("num_samples", [60, 1000])  # both read paths
@pytest.mark.parametrize("self_anchor", ["keep", "mask"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_never_written_rows_are_never_used_as_anchors_positives_or_negatives(self_anchor, symmetric, num_samples):
    crcd = _bank_loss(num_samples=num_samples, num_negatives=50, self_anchor=self_anchor, symmetric=symmetric)
    _poison_unwritten_rows(crcd)  # 6 rows written per step: a uniform draw would hit NaN at once
    for step in range(3):
        student_feat = _feats(step)[0].requires_grad_()
        loss = crcd(student_feat, _feats(step)[1], torch.arange(B) * 7 + step)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(student_feat.grad).all()
    assert int(crcd.memory_teacher.seen.sum()) == 3 * B


def test_the_cold_option_does_use_never_written_rows():
    # The check above can fail: the cold bank reads the same poisoned rows.
    crcd = _bank_loss(num_samples=1000, num_negatives=50, memory_init="cold", symmetric=True)
    for bank in (crcd.memory_student, crcd.memory_teacher):
        bank.weight[B:] = float("nan")
    assert torch.isnan(crcd(*_feats(), torch.arange(B)))


def test_first_training_step_stores_the_embeddings_themselves():
    crcd = _bank_loss(symmetric=True)  # 0.2.0's default: the student-side memory is written too
    student_feat, teacher_feat = _feats()
    index = torch.tensor([3, 17, 0, 39, 22, 8])
    crcd(student_feat, teacher_feat, index)
    torch.testing.assert_close(crcd.memory_student.weight[index], crcd.embed_student(student_feat).detach())
    torch.testing.assert_close(crcd.memory_teacher.weight[index], crcd.embed_teacher(teacher_feat).detach())
    assert int(crcd.memory_student.seen.sum()) == B


def test_eval_mode_writes_nothing_and_reads_no_unwritten_row():
    crcd = _bank_loss(num_samples=1000, num_negatives=50)
    crcd(*_feats(0), torch.arange(B))  # one training step writes 6 rows
    _poison_unwritten_rows(crcd)
    state = {k: v.clone() for k, v in crcd.state_dict().items()}
    crcd.eval()
    loss = crcd(*_feats(1), torch.arange(B) + 100)  # a batch of unwritten rows
    assert torch.isfinite(loss)
    for name, value in crcd.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0, equal_nan=True, msg=name)
    assert int(crcd.memory_teacher.seen.sum()) == B


def test_eval_on_a_fresh_bank_uses_the_batch_alone():
    crcd = _bank_loss(num_samples=1000, num_negatives=50).eval()
    _poison_unwritten_rows(crcd)  # every row
    assert torch.isfinite(crcd(*_feats(), torch.arange(B)))
    assert not crcd.memory_teacher.seen.any()


def test_loss_state_dict_round_trip_keeps_the_seen_flags():
    crcd = _bank_loss(symmetric=True)
    crcd(*_feats(), torch.arange(B))
    restored = _bank_loss(symmetric=True)
    restored.load_state_dict(crcd.state_dict())
    assert {"memory_student.seen", "memory_teacher.seen"} <= set(crcd.state_dict())
    assert torch.equal(restored.memory_teacher.seen, crcd.memory_teacher.seen)
    torch.manual_seed(3)
    expected = crcd(*_feats(1), torch.arange(B) + 3)
    torch.manual_seed(3)
    torch.testing.assert_close(restored(*_feats(1), torch.arange(B) + 3), expected)


def test_loss_loads_a_checkpoint_saved_before_the_seen_flags():
    old = _bank_loss(memory_init="cold", symmetric=True)
    old(*_feats(), torch.arange(B))
    checkpoint = {k: v for k, v in old.state_dict().items() if not k.endswith(".seen")}
    restored = _bank_loss(symmetric=True)
    restored.load_state_dict(checkpoint)  # strict
    assert bool(restored.memory_student.seen.all()) and bool(restored.memory_teacher.seen.all())


def test_bad_memory_init_is_rejected():
    with pytest.raises(ValueError, match="memory_init must be one of"):
        _bank_loss(memory_init="warm")


# ---------------------------------------------------------------- fill_memory


def test_fill_memory_writes_embeddings_as_first_writes_in_any_mode():
    crcd = _bank_loss(symmetric=True)
    crcd(*_feats(0), torch.arange(B))  # rows 0..5 written once
    crcd.eval()
    log_z = crcd.log_z.clone()
    student_feat, teacher_feat = _feats(1)
    crcd.fill_memory(student_feat, teacher_feat, torch.arange(B))
    torch.testing.assert_close(crcd.memory_student.weight[:B], crcd.embed_student(student_feat).detach())
    torch.testing.assert_close(crcd.memory_teacher.weight[:B], crcd.embed_teacher(teacher_feat).detach())
    assert torch.equal(crcd.log_z, log_z)


def test_fill_memory_fills_a_cold_bank_and_accepts_a_batch_of_one():
    crcd = _bank_loss(memory_init="cold", symmetric=True)
    student_feat, teacher_feat = _feats(batch=1)
    crcd.fill_memory(student_feat, teacher_feat, torch.tensor([4]))
    torch.testing.assert_close(crcd.memory_student.weight[4], crcd.embed_student(student_feat).detach()[0])


def test_fill_memory_checks_its_inputs_and_needs_a_memory():
    crcd = _bank_loss()
    with pytest.raises(ValueError, match="needs index"):
        crcd.fill_memory(*_feats())
    with pytest.raises(ValueError, match="keeps no memory"):
        CRCDLoss(DS, DT, RelationConfig(embed_dim=EMBED), negatives="batch").fill_memory(*_feats())
    assert not crcd.memory_teacher.seen.any()


class _Net(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, width), nn.ReLU(), nn.Dropout(0.5))
        self.fc = nn.Linear(width, 3)

    def forward(self, x):
        return self.fc(self.body(x))


@pytest.mark.parametrize("gradient_element", [False, True])
def test_distiller_fill_memory_writes_every_row_from_a_loader(gradient_element):
    torch.manual_seed(0)
    student, teacher = _Net(6), _Net(9)
    config = CRCDConfig(gradient_element=gradient_element, feature_weight=0.3,
                        relation=RelationConfig(embed_dim=4, num_negatives=5, symmetric=True))
    distiller = CRCDDistiller(student, teacher, num_samples=20, config=config)
    x, y = torch.randn(20, 5), torch.randint(0, 3, (20,))
    loader = [(x[i : i + 8], y[i : i + 8], torch.arange(i, min(i + 8, 20))) for i in range(0, 20, 8)]  # 8, 8, 4
    distiller.train()
    distiller.fill_memory(loader)
    assert distiller.training and student.training and not teacher.training
    losses = [distiller.crcd_feature] + ([distiller.crcd_gradient] if gradient_element else [])
    for loss in losses:
        assert bool(loss.memory_student.seen.all()) and bool(loss.memory_teacher.seen.all())
    with torch.no_grad():  # eval-mode student features (dropout off), as the warm-up used
        expected = distiller.crcd_feature.embed_student(student.body.eval()(x))
    torch.testing.assert_close(distiller.crcd_feature.memory_student.weight, expected)
    assert all(p.grad is None for p in distiller.parameters())


# ---------------------------------------------------------------- teacher head


@pytest.mark.parametrize(
    "negatives, options", [("bank", {"num_samples": N}), ("queue", {"queue_size": 16}), ("batch", {})]
)
def test_teacher_head_trains_from_the_student_side_only_when_asked(negatives, options):
    grads = []
    for teacher_head_grad in (False, True):
        torch.manual_seed(0)
        sizes = dict(options)
        num_samples = sizes.pop("num_samples", None)
        config = RelationConfig(embed_dim=EMBED, symmetric=False, train_teacher_embedding=teacher_head_grad, **sizes)
        crcd = CRCDLoss(DS, DT, config, negatives=negatives, num_samples=num_samples)
        index = torch.arange(B) if negatives == "bank" else None
        crcd(*_feats(), index).backward()
        grads.append(crcd.embed_teacher.proj.weight.grad)
    assert grads[0] is None
    assert grads[1] is not None and grads[1].abs().sum() > 0


def test_last_occurrence_by_row_table_equals_the_pairwise_comparison():
    from crcd_plugin.memory import last_occurrence

    index = torch.randint(0, 20, (64,), generator=torch.Generator().manual_seed(0))  # many repeats
    assert torch.equal(last_occurrence(index, num_rows=20), last_occurrence(index))


# ---------------------------------------------------------------- one-sided: no student-side memory


def test_a_one_sided_loss_keeps_no_student_side_memory_in_memory_or_state():
    crcd = _bank_loss(num_samples=1000)  # symmetric=False, the default: nothing reads student rows
    assert crcd.memory_student is None
    assert not any(key.startswith("memory_student.") for key in crcd.state_dict())
    rows = sum(buffer.numel() for name, buffer in crcd.named_buffers() if name.startswith("memory_"))
    assert rows == 1000 * EMBED + 1000  # the teacher-side bank and its seen flags, once
    crcd.fill_memory(*_feats(), torch.arange(B))  # student rows given: still nowhere to write them
    assert crcd.memory_student is None and int(crcd.memory_teacher.seen.sum()) == B


def test_a_one_sided_loss_draws_the_random_stream_a_symmetric_one_draws():
    # A seed gives the same run as before the student side was dropped (0.3 made it and drew it).
    torch.manual_seed(0)
    _bank_loss(num_samples=500)
    one_sided = torch.rand(4)
    torch.manual_seed(0)
    _bank_loss(num_samples=500, symmetric=True)
    assert torch.equal(one_sided, torch.rand(4))


def _v03_distiller():
    # The fixture's models and options, from the script that wrote it.
    spec = importlib.util.spec_from_file_location("make_v03", Path(__file__).parent / "data" / "make_v03_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make()


@pytest.mark.parametrize("which", ["state_dict", "crcd_state_dict"])
def test_a_0_3_one_sided_checkpoint_loads_and_gives_the_loss_0_3_gave(which):
    saved = torch.load(Path(__file__).parent / "data" / "distiller-0.3-one-sided.pt", weights_only=True)
    assert any(".memory_student." in key for key in saved["crcd_state_dict"])  # what 0.3 saved
    distiller = _v03_distiller()
    if which == "state_dict":
        distiller.load_state_dict(saved["state_dict"])  # strict
    else:
        models = {k: v for k, v in saved["state_dict"].items() if k.startswith(("student.", "teacher."))}
        distiller.load_state_dict(models, strict=False)
        distiller.load_crcd_state_dict(saved["crcd_state_dict"])  # strict
    assert not any(".memory_student." in key for key in distiller.crcd_state_dict())
    torch.manual_seed(saved["seed"])
    out = distiller(saved["input"], saved["target"], saved["index"])
    for key, expected in saved["losses"].items():
        assert torch.equal(out[key].detach(), expected), key

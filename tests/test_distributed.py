"""Under torch.distributed (gloo, 2 CPU processes) the memory, queue and Z stay identical on every rank."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import V020_RELATION

from crcd_plugin import CRCDLoss, RelationConfig

pytestmark = pytest.mark.slow  # several processes or a subprocess run: left out by -m "not slow"

B, DS, DT, EMBED, N = 4, 6, 8, 8, 32
WORLD = 2


def _make(negatives):
    torch.manual_seed(0)  # identical heads and memories on every rank, as DDP would broadcast
    # NCE explicitly: its constant Z is part of the state under test (a queue defaults to InfoNCE).
    # 0.2.0's relation options: symmetric, so that the student-side memory checked below is written.
    options = dict(V020_RELATION, embed_dim=EMBED, objective="nce")
    if negatives.startswith("bank"):
        init = "cold" if negatives == "bank-cold" else "first_write"
        return CRCDLoss(DS, DT, RelationConfig(**options, num_negatives=5, memory_init=init), num_samples=N)
    return CRCDLoss(DS, DT, RelationConfig(**options, negatives="queue", queue_size=16))


def _rank_batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(B, DS, generator=g), torch.randn(B, DT, generator=g), torch.arange(B) + rank * B


def _worker(rank, init_file, out_dir, negatives):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        crcd = _make(negatives)
        student_feat, teacher_feat, index = _rank_batch(rank)
        torch.manual_seed(rank)  # ranks draw different negatives, as they would
        crcd(student_feat, teacher_feat, index if negatives.startswith("bank") else None).backward()
        torch.save(crcd.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("negatives", ["bank", "bank-cold", "queue"])
def test_state_is_identical_on_all_ranks_and_holds_every_ranks_rows(tmp_path, negatives):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), negatives), nprocs=WORLD, join=True)
    states = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name

    reference = _make(negatives)
    batches = [_rank_batch(rank) for rank in range(WORLD)]
    student_rows = torch.cat([reference.embed_student(s) for s, _, _ in batches]).detach()
    if negatives.startswith("bank"):
        index = torch.cat([i for _, _, i in batches])
        if negatives == "bank-cold":  # the reference: the first write blends with the random row
            old = reference.memory_student.weight[index]
            expected = F.normalize(0.5 * old + 0.5 * student_rows, dim=1)
        else:  # the first write stores the embedding itself, and marks the rows of both ranks
            expected = student_rows
            assert states[0]["memory_student.seen"].sum() == WORLD * B
            assert bool(states[0]["memory_student.seen"][index].all())
        torch.testing.assert_close(states[0]["memory_student.weight"][index], expected)
    else:
        torch.testing.assert_close(states[0]["memory_student.weight"][: WORLD * B], student_rows)
        assert int(states[0]["memory_student.pointer"]) == WORLD * B
    assert bool(states[0]["z_ready"].all())


def _grad_worker(rank, init_file, out_dir):
    from crcd_plugin.distributed import average_gradients

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        layer, unused = torch.nn.Linear(3, 2), torch.nn.Linear(1, 1)
        layer.weight.grad = torch.full_like(layer.weight, float(rank + 1))
        layer.bias.grad = torch.full_like(layer.bias, 10.0 * rank)
        average_gradients([layer.weight, layer.bias, unused.weight])
        torch.save([layer.weight.grad, layer.bias.grad, unused.weight.grad], os.path.join(out_dir, f"g{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_average_gradients_gives_every_rank_the_mean_and_zero_fills_missing_grads(tmp_path):
    mp.spawn(_grad_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        weight, bias, unused = torch.load(tmp_path / f"g{rank}.pt")
        assert torch.equal(weight, torch.full((2, 3), 1.5))
        assert torch.equal(bias, torch.full((2,), 5.0))
        assert torch.equal(unused, torch.zeros(1, 1))

"""Distributed pieces in a single process: no-ops without a process group, the sharded bank as one
shard, and argument checks."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from crcd_plugin import CRCDDistiller, CRCDLoss, MemoryBank
from crcd_plugin.sharded_memory import ShardedMemoryBank


def tiny_distiller():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    teacher = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    return CRCDDistiller(student, teacher, "2", "2", crcd_options={"queue_size": 16, "embed_dim": 4})


def test_sharded_bank_in_one_process_reads_and_writes_like_the_replicated_bank():
    torch.manual_seed(0)
    replicated = MemoryBank(20, 4, init="cold")  # the sharded bank is cold (no first-write slots yet)
    sharded = ShardedMemoryBank(20, 4)
    sharded.load_state_dict(replicated.state_dict())
    index, values = torch.tensor([3, 7, 3]), torch.randn(3, 4)
    replicated.update(index, values)
    sharded.update(index, values)
    query = torch.tensor([[3, 7], [0, 19]])
    assert torch.equal(sharded.gather(query), replicated.gather(query))


def test_sharded_bank_loads_a_replicated_banks_checkpoint():
    replicated = MemoryBank(20, 4)
    sharded = ShardedMemoryBank(20, 4)
    sharded.load_state_dict(replicated.state_dict())
    assert torch.equal(sharded.shard.weight, replicated.weight)


def test_shard_memory_without_a_bank_is_a_value_error_naming_the_option():
    with pytest.raises(ValueError, match="shard_memory"):
        CRCDLoss(4, 4, negatives="queue", queue_size=8, shard_memory=True)


def test_prepare_distributed_without_a_process_group_leaves_the_student_unwrapped():
    distiller = tiny_distiller()
    student = distiller.student
    assert distiller.prepare_distributed() is distiller
    assert distiller.student is student


def test_sync_gradients_without_a_process_group_leaves_gradients_unchanged():
    distiller = tiny_distiller()
    distiller(torch.randn(5, 4), torch.randint(0, 3, (5,)))["loss"].backward()
    before = [p.grad.clone() for p in distiller.parameters() if p.grad is not None]
    distiller.sync_gradients()
    after = [p.grad for p in distiller.parameters() if p.grad is not None]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_a_ddp_wrapped_teacher_is_a_value_error(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        teacher = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 3)))
        with pytest.raises(ValueError, match="teacher"):
            CRCDDistiller(nn.Sequential(nn.Linear(4, 3)), teacher, "0", "0", crcd_options={"queue_size": 8})
    finally:
        dist.destroy_process_group()

"""Distributed pieces in a single process: no-ops without a process group, the sharded bank as one
shard, and argument checks."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from crcd_plugin import CRCDConfig, CRCDDistiller, CRCDLoss, MemoryBank, RelationConfig
from crcd_plugin.sharded_memory import ShardedMemoryBank


def tiny_distiller():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    teacher = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    config = CRCDConfig(relation=RelationConfig(queue_size=16, embed_dim=4))
    return CRCDDistiller(student, teacher, "2", "2", config=config)


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
        CRCDLoss(4, 4, RelationConfig(queue_size=8, shard_memory=True), negatives="queue")


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
            config = CRCDConfig(relation=RelationConfig(queue_size=8))
            CRCDDistiller(nn.Sequential(nn.Linear(4, 3)), teacher, "0", "0", config=config)
    finally:
        dist.destroy_process_group()


def test_importing_crcd_plugin_binds_torch_distributed_nn_defaults_before_any_process_group():
    # Bound to a live group (first imported after init_process_group), these defaults would keep
    # it alive past destroy_process_group() and gloo's threads into interpreter exit (issue 22).
    import inspect

    import torch.distributed.nn.functional as dist_nn

    defaults = [
        default for function in vars(dist_nn).values() if inspect.isfunction(function)
        for default in function.__defaults__ or ()
    ]
    assert defaults and not any(isinstance(default, dist.ProcessGroup) for default in defaults)


def test_release_distributed_frees_the_ddp_wrapper_and_destroy_frees_the_group(tmp_path, monkeypatch):
    import weakref

    import crcd_plugin.contract

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        distiller = tiny_distiller()
        student = distiller.student
        with monkeypatch.context() as patch:  # one process, but let prepare_distributed() wrap the student
            patch.setattr(crcd_plugin.contract, "world_size", lambda: 2)  # where prepare_distributed reads it
            distiller.prepare_distributed()
        distiller(torch.randn(5, 4), torch.randint(0, 3, (5,)))["loss"].backward()
        distiller.sync_gradients()
        wrapper_ref, distiller_ref = weakref.ref(distiller.student), weakref.ref(distiller)
        group_ref = weakref.ref(dist.group.WORLD)
        assert isinstance(wrapper_ref(), nn.parallel.DistributedDataParallel)
        assert distiller.release_distributed() is distiller
        assert distiller.student is student
        assert wrapper_ref() is None  # freed at once, not left to the garbage collector
        del distiller
        assert distiller_ref() is None
    finally:
        dist.destroy_process_group()
    assert group_ref() is None  # nothing keeps the group (and gloo's threads) alive

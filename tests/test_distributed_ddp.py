"""CRCDDistiller under DDP (gloo, 2 CPU processes): identical state on every rank, accumulation with
no_sync, an uneven last batch, the 2-rank step against one process fed the concatenated batch, and
the sharded memory bank against the replicated one.

Two processes are started once for the whole file (starting them costs seconds on a small machine);
each scenario writes its results to a file and the tests below check one behaviour each.
"""

import os
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import V020_BANK, V020_WEIGHTS
from torch import nn

from crcd_plugin import CRCDConfig, CRCDDistiller, CRCDLoss, RelationConfig

pytestmark = pytest.mark.slow  # several processes or a subprocess run: left out by -m "not slow"

WORLD, N, DIN, CLASSES, B = 2, 40, 6, 3, 4


class Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(DIN, 8), nn.Tanh())
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, x):
        return self.fc(self.body(x))


class Teacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(DIN, 12), nn.ReLU())
        self.fc = nn.Linear(12, CLASSES)

    def forward(self, x):
        return self.fc(self.body(x))


def make_distiller(gradient_element=True, v020=False, **crcd):
    """Same models on every rank (as loaded from a checkpoint); CRCD state from each rank's own seed.

    The library's defaults, or with ``v020`` 0.2.0's (weights, NCE bank, every sample an anchor, both
    sides' memories written) for the scenarios whose checks were written against them."""
    torch.manual_seed(0)
    student, teacher = Student(), Teacher()
    relation = RelationConfig(**{**(V020_BANK if v020 else {}), "embed_dim": 8, "num_negatives": 6, **crcd})
    config = CRCDConfig(**(V020_WEIGHTS if v020 else {}), gradient_element=gradient_element, relation=relation)
    return CRCDDistiller(student, teacher, "fc", "fc", config, num_samples=N)


def batch(step, rank, size=B):
    """Rank ``rank``'s batch of a step: distinct samples on every rank, as a DistributedSampler gives."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    index = (torch.randperm(N // WORLD, generator=g)[:size] * WORLD + rank)
    return torch.randn(size, DIN, generator=g), torch.randint(0, CLASSES, (size,), generator=g), index


def train(distiller, steps, sizes=None, accumulate=1, use_no_sync=True):
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        for micro in range(accumulate):
            size = sizes[step] if sizes else B
            x, y, index = batch(step * accumulate + micro, dist.get_rank(), size)
            last = micro == accumulate - 1
            with distiller.no_sync() if (use_no_sync and not last) else torch.enable_grad():
                (distiller(x, y, index)["loss"] / accumulate).backward()
        distiller.sync_gradients()
        optimizer.step()
        optimizer.zero_grad()
    return distiller


def scenario_ddp(rank, out):
    torch.manual_seed(rank)  # CRCD heads and memories start different: prepare_distributed fixes that
    distiller = make_distiller().prepare_distributed()
    assert isinstance(distiller.student, nn.parallel.DistributedDataParallel)
    torch.save(train(distiller, steps=3).state_dict(), out("ddp"))


def scenario_accumulate(rank, out):
    for use_no_sync in (True, False):
        torch.manual_seed(rank)
        distiller = make_distiller().prepare_distributed()
        train(distiller, steps=2, accumulate=2, use_no_sync=use_no_sync)
        torch.save(distiller.state_dict(), out(f"accumulate_no_sync={use_no_sync}"))


def scenario_uneven(rank, out):
    torch.manual_seed(rank)
    distiller = make_distiller(v020=True).prepare_distributed()  # symmetric: the student memory is written
    last = 5 if rank == 0 else 3  # the last batch differs between the ranks
    torch.save(train(distiller, steps=3, sizes=[B, B, last]).state_dict(), out("uneven"))


# Where one rank's step is exactly its share of the concatenated batch's: the anchors of the
# anchored loss are the rank's own batch, and the gradient element is scaled by 1 / (rank's batch),
# so both differ from one process's by design (docs/distributed.md).
# A cold bank: with first-write rows, a rank's rows not written yet stand in only for its own
# batch's samples, so its draws differ from one process's over the whole batch (docs/distributed.md).
# 0.2.0's settings: with num_anchors < B a rank would draw its anchors (a randperm, even unanchored),
# which shifts its stream of negative draws; symmetric, so that the teacher embedding head has a gradient.
CONCATENATED = {
    "gradient_element": False, "anchored": False, "objective": "infonce", "memory_init": "cold", "v020": True,
}


def scenario_concatenated(rank, out):
    """One step whose negatives are aligned with a single process drawing for the whole batch."""
    distiller = make_distiller(**CONCATENATED).prepare_distributed()
    x, y, index = batch(0, rank)
    torch.manual_seed(7)
    if rank == 1:
        torch.randint(N, (B, 6))  # skip the draws that rank 0 makes: one stream, split by rank
    losses = distiller(x, y, index)
    losses["loss"].backward()
    distiller.sync_gradients()
    grads = {name: p.grad for name, p in distiller.named_parameters() if p.grad is not None}
    parts = {k: v.detach() for k, v in losses.items() if k != "logits"}
    torch.save({"parts": parts, "grads": grads, "state": distiller.crcd_state_dict()}, out("concatenated"))


def make_loss(shard_memory, share_negatives=False):
    torch.manual_seed(0)
    # The sharded bank is cold (no first-write slots yet): compare it with a cold replicated bank.
    # Symmetric, so that both sides keep a bank to shard.
    return CRCDLoss(
        5, 7, embed_dim=8, num_samples=N, num_negatives=9, shard_memory=shard_memory, memory_init="cold",
        share_negatives=share_negatives, symmetric=True,
    )


# Per step, each rank's batch size; the last step is uneven and its indices overlap across ranks.
SHARDED_SIZES = [(B, B), (B, B), (5, 3)]


def sharded_batch(step, rank):
    g = torch.Generator().manual_seed(500 + 10 * step + rank)
    size = SHARDED_SIZES[step][rank]
    index = torch.randperm(N, generator=g)[:size]
    if step == len(SHARDED_SIZES) - 1:
        index[0] = 3  # the same sample on both ranks: rank 1's row is the one that stays
    return torch.randn(size, 5, generator=g), torch.randn(size, 7, generator=g), index


def scenario_sharded(rank, out):
    replicated, sharded = make_loss(False), make_loss(True)
    sharded.load_state_dict(replicated.state_dict())  # each rank keeps its slice of the same rows
    # share_negatives=True: one draw per rank and step, read through the same collective.
    replicated_shared, sharded_shared = make_loss(False, True), make_loss(True, True)
    sharded_shared.load_state_dict(replicated_shared.state_dict())
    results = {"rows": (sharded.memory_student.start, sharded.memory_student.stop)}
    runs = (
        ("replicated", replicated), ("sharded", sharded),
        ("replicated_shared", replicated_shared), ("sharded_shared", sharded_shared),
    )
    for name, crcd in runs:
        losses = []
        for step in range(len(SHARDED_SIZES)):
            torch.manual_seed(step * WORLD + rank)  # the same draws for both banks
            loss = crcd(*sharded_batch(step, rank))
            loss.backward()
            losses.append(loss.detach())
        results[name] = {
            "losses": torch.stack(losses),
            "grads": {k: p.grad for k, p in crcd.named_parameters()},
            "state": crcd.state_dict(),
        }
    torch.save(results, out("sharded"))


class MlpHeadStudent(Student):
    """A classifier head that is not one Linear: the gradient element double-backprops through it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, CLASSES))


def scenario_mlp_head(rank, out):
    torch.manual_seed(0)
    config = CRCDConfig(gradient_element=True, relation=RelationConfig(embed_dim=8, num_negatives=6))
    distiller = CRCDDistiller(MlpHeadStudent(), Teacher(), config=config, num_samples=N,
                              example_input=torch.randn(2, DIN))
    torch.manual_seed(rank)
    torch.save(train(distiller.prepare_distributed(), steps=2).state_dict(), out("mlp_head"))


def scenario_teardown(rank, out):
    torch.manual_seed(rank)
    distiller = make_distiller().prepare_distributed().sync_gradients_in_backward()
    train(distiller, steps=2)
    wrapper, owner = weakref.ref(distiller.student), weakref.ref(distiller)
    distiller.release_distributed()
    released = wrapper() is None  # without gc.collect(): no cycle holds the wrapper
    del distiller
    torch.save({"wrapper_freed": released, "distiller_freed": owner() is None}, out("teardown"))


SCENARIOS = [
    scenario_ddp, scenario_accumulate, scenario_uneven, scenario_concatenated, scenario_sharded, scenario_mlp_head,
    scenario_teardown,
]


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    group = weakref.ref(dist.group.WORLD)
    try:
        for scenario in SCENARIOS:
            scenario(rank, lambda name: os.path.join(out_dir, f"{name}.rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # Freed inside destroy_process_group(), which then waits for gloo's worker threads.
    torch.save({"group_freed": group() is None}, os.path.join(out_dir, f"destroyed.rank{rank}.pt"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(str(out_dir / "init"), str(out_dir)), nprocs=WORLD, start_method="spawn")
    return lambda name, rank: torch.load(out_dir / f"{name}.rank{rank}.pt")


def assert_same_on_both_ranks(results, name):
    first, second = results(name, 0), results(name, 1)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_ddp_student_keeps_every_tensor_of_the_distiller_identical_on_all_ranks(results):
    assert_same_on_both_ranks(results, "ddp")


def test_ddp_state_dict_holds_the_wrapped_student_and_the_crcd_state(results):
    state = results("ddp", 0)
    assert "student.module.fc.weight" in state and "crcd_feature.memory_teacher.weight" in state
    assert not any(key.startswith("teacher.module") for key in state)


def test_gradient_element_through_a_non_linear_student_head_keeps_ranks_identical(results):
    assert_same_on_both_ranks(results, "mlp_head")


def test_no_sync_accumulation_keeps_ranks_identical(results):
    assert_same_on_both_ranks(results, "accumulate_no_sync=True")


def test_no_sync_accumulation_equals_syncing_every_micro_batch(results):
    deferred, eager = results("accumulate_no_sync=True", 0), results("accumulate_no_sync=False", 0)
    for key in deferred:
        torch.testing.assert_close(deferred[key], eager[key], msg=key)


def test_uneven_last_batch_keeps_ranks_identical(results):
    assert_same_on_both_ranks(results, "uneven")


def test_uneven_last_batch_writes_every_ranks_rows_to_the_memory(results):
    state = results("uneven", 0)
    reference = make_distiller(v020=True)
    fresh = reference.crcd_feature.memory_student.weight
    written = (state["crcd_feature.memory_student.weight"] != fresh).any(1)
    for rank, size in ((0, 5), (1, 3)):
        assert written[batch(2, rank, size)[2]].all()


def _single_process_step():
    distiller = make_distiller(**CONCATENATED)
    batches = [batch(0, rank) for rank in range(WORLD)]
    x, y, index = (torch.cat(parts) for parts in zip(*batches))
    torch.manual_seed(7)
    losses = distiller(x, y, index)
    losses["loss"].backward()
    return distiller, losses


def test_two_ranks_give_the_loss_of_one_process_fed_the_concatenated_batch(results):
    # Every term is a mean over the batch: the concatenated batch's loss is the mean of the ranks'.
    _, losses = _single_process_step()
    ranks = [results("concatenated", rank)["parts"] for rank in range(WORLD)]
    for key in ("loss", "task_loss", "kd_loss", "crcd_feature_loss"):
        torch.testing.assert_close((ranks[0][key] + ranks[1][key]) / 2, losses[key].detach(), msg=key)


def test_two_ranks_give_the_student_and_feature_head_gradients_of_one_process(results):
    distiller, _ = _single_process_step()
    grads = results("concatenated", 0)["grads"]
    for name, param in distiller.named_parameters():
        if name.startswith("student.") or name.startswith("crcd_feature."):
            ddp_name = "student.module." + name[len("student."):] if name.startswith("student.") else name
            torch.testing.assert_close(grads[ddp_name], param.grad, msg=name)


def test_two_ranks_leave_the_memory_of_one_process(results):
    distiller, _ = _single_process_step()
    state = results("concatenated", 0)["state"]
    for key, value in distiller.crcd_state_dict().items():
        torch.testing.assert_close(state[key], value, msg=key)


def test_sharded_bank_gives_the_replicated_banks_losses_for_the_same_draws(results):
    for rank in range(WORLD):
        run = results("sharded", rank)
        torch.testing.assert_close(run["sharded"]["losses"], run["replicated"]["losses"], rtol=0, atol=0)


def test_sharded_bank_with_shared_draws_gives_the_replicated_banks_losses_gradients_and_rows(results):
    runs = [results("sharded", rank) for rank in range(WORLD)]
    for run in runs:
        torch.testing.assert_close(run["sharded_shared"]["losses"], run["replicated_shared"]["losses"], rtol=0, atol=0)
        for name, grad in run["replicated_shared"]["grads"].items():
            torch.testing.assert_close(run["sharded_shared"]["grads"][name], grad, msg=name)
    shards = torch.cat([run["sharded_shared"]["state"]["memory_teacher.shard.weight"] for run in runs])
    torch.testing.assert_close(shards, runs[0]["replicated_shared"]["state"]["memory_teacher.weight"], rtol=0, atol=0)
    # Not the per-sample path's numbers: the draws are of another shape.
    assert not torch.equal(runs[0]["replicated_shared"]["losses"], runs[0]["replicated"]["losses"])


def test_sharded_bank_gives_the_replicated_banks_head_gradients(results):
    for rank in range(WORLD):
        run = results("sharded", rank)
        for name, grad in run["replicated"]["grads"].items():
            torch.testing.assert_close(run["sharded"]["grads"][name], grad, msg=name)


def test_sharded_bank_rows_put_together_equal_the_replicated_bank(results):
    runs = [results("sharded", rank) for rank in range(WORLD)]
    for side in ("memory_student", "memory_teacher"):
        shards = torch.cat([run["sharded"]["state"][f"{side}.shard.weight"] for run in runs])
        torch.testing.assert_close(shards, runs[0]["replicated"]["state"][f"{side}.weight"], rtol=0, atol=0)


def test_sharded_bank_holds_its_share_of_the_rows_on_each_rank(results):
    rows = [results("sharded", rank)["rows"] for rank in range(WORLD)]
    assert rows == [(0, N // 2), (N // 2, N)]
    assert results("sharded", 1)["sharded"]["state"]["memory_student.shard.weight"].shape == (N // 2, 8)


@pytest.mark.parametrize("rank", range(WORLD))
def test_release_distributed_frees_the_ddp_wrapper_and_the_distiller_without_the_garbage_collector(results, rank):
    assert results("teardown", rank) == {"wrapper_freed": True, "distiller_freed": True}


@pytest.mark.parametrize("rank", range(WORLD))
def test_destroy_process_group_frees_the_group_after_ddp_training(results, rank):
    assert results("destroyed", rank) == {"group_freed": True}

"""TeacherCache under torch.distributed (gloo, 2 CPU processes): a sharded build equals a one-process
build and reads back on every rank; a sharded build that misses rows fails on every rank and leaves
no metadata; fill_memory() from the cache leaves every rank with every teacher row.

The two processes are started once for the file; each scenario writes its results for the tests.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from crcd_plugin import CRCDConfig, CRCDDistiller, RelationConfig, TeacherCache

pytestmark = pytest.mark.slow  # several processes or a subprocess run: left out by -m "not slow"

WORLD, N, IN_DIM, CLASSES = 2, 24, 5, 3


class Indexed(Dataset):
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, IN_DIM, generator=generator)
        self.y = torch.randint(0, CLASSES, (N,), generator=generator)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


def teacher() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN_DIM, 7), nn.Tanh(), nn.Linear(7, CLASSES)).eval()


def student() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(IN_DIM, 4), nn.Tanh(), nn.Linear(4, CLASSES))


def config() -> CRCDConfig:
    return CRCDConfig(gradient_element=True, relation=RelationConfig(embed_dim=8, num_negatives=4))


def _worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        data = Indexed()
        sampler = DistributedSampler(data, num_replicas=WORLD, rank=rank, shuffle=False)
        cache = TeacherCache.build(os.path.join(out, "sharded"), teacher(), DataLoader(data, 4, sampler=sampler),
                                   "2", num_samples=N)
        torch.save(cache.rows(torch.arange(N)), os.path.join(out, f"rows{rank}.pt"))

        # Rank 1 leaves out its last batch: both ranks must fail, and nothing is marked complete.
        batches = list(DataLoader(data, 4, sampler=sampler))
        try:
            TeacherCache.build(os.path.join(out, "partial"), teacher(), batches[:-1] if rank else batches, "2",
                               num_samples=N)
            error = ""
        except ValueError as exc:
            error = str(exc)
        torch.save(error, os.path.join(out, f"partial{rank}.pt"))

        torch.manual_seed(5)  # identical CRCD heads on both ranks
        distiller = CRCDDistiller(student(), cache, "2", None, config(), num_samples=N)
        distiller.fill_memory(batch_size=3)  # uneven chunks: the ranks' shares of the last differ
        torch.save(distiller.crcd_state_dict(), os.path.join(out, f"state{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher_cache_ddp")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return out


def test_a_sharded_build_equals_a_one_process_build_and_reads_back_on_every_rank(results, tmp_path):
    # One process fed the ranks' batches: a CPU kernel may round a row differently in another batch.
    data = Indexed()
    batches = [batch for rank in range(WORLD)
               for batch in DataLoader(data, 4, sampler=DistributedSampler(data, WORLD, rank, shuffle=False))]
    single = TeacherCache.build(tmp_path / "single", teacher(), batches, "2", num_samples=N)
    sharded = TeacherCache.open(results / "sharded", teacher=teacher(), num_samples=N)
    assert sharded.metadata["world_size"] == WORLD
    for name in ("feature", "head_logits", "logits", "targets", "written"):
        assert (single.path / f"{name}.bin").read_bytes() == (sharded.path / f"{name}.bin").read_bytes(), name
    expected = single.rows(torch.arange(N))
    for rank in range(WORLD):
        rows = torch.load(results / f"rows{rank}.pt")
        assert all(torch.equal(a, b) for a, b in zip(rows, expected))


def test_a_sharded_build_that_misses_rows_fails_on_every_rank_and_leaves_no_metadata(results):
    errors = [torch.load(results / f"partial{rank}.pt") for rank in range(WORLD)]
    assert all("rows were never written" in error for error in errors), errors
    assert not (results / "partial" / "metadata.json").exists()


def test_fill_memory_from_the_cache_gives_every_rank_every_teacher_row(results):
    states = [torch.load(results / f"state{rank}.pt") for rank in range(WORLD)]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    for loss in ("crcd_feature", "crcd_gradient"):
        assert bool(states[0][f"{loss}.memory_teacher.seen"].all())
    torch.manual_seed(5)
    reference = CRCDDistiller(student(), TeacherCache.open(results / "sharded"), "2", None, config(), num_samples=N)
    reference.fill_memory(batch_size=N)
    torch.testing.assert_close(states[0]["crcd_feature.memory_teacher.weight"],
                               reference.crcd_state_dict()["crcd_feature.memory_teacher.weight"], rtol=1e-5, atol=1e-6)

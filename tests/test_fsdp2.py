"""CRCDDistiller with an FSDP2 student and a teacher sharded per block (gloo, 2 CPU processes).

Two ranks under FSDP2 against one process fed the concatenated batch (losses and updated
parameters), the gradient element through the sharded classifier against DDP, mixed precision,
the sharded teacher's outputs and per-rank share, and resume from a sharded checkpoint.
Two processes are started once for the whole file; each scenario writes its results to a file.
"""

import copy
import gc
import os
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import V020_BANK, V020_WEIGHTS
from torch import nn

from crcd_plugin import CRCDConfig, CRCDDistiller, RelationConfig
from crcd_plugin.fsdp import (
    check_fsdp_integration,
    is_fully_sharded,
    load_sharded_checkpoint,
    save_sharded_checkpoint,
    shard_teacher,
)

fsdp = pytest.importorskip("torch.distributed.fsdp")

WORLD, N, DIN, CLASSES, B, K = 2, 40, 6, 3, 4, 6


class Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(DIN, 8), nn.Tanh())
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, x):
        return self.fc(self.body(x))


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.relu(self.linear(x))


class Teacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(DIN, 12)
        self.blocks = nn.Sequential(Block(12), Block(12), Block(12))
        self.fc = nn.Linear(12, CLASSES)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)))


# Where two ranks compute one process's step on the concatenated batch (docs/distributed.md): no
# gradient element (its 1/B factor is per rank), unanchored, a cold bank.
CONCATENATED = dict(gradient_element=False, anchored=False, objective="infonce", memory_init="cold", v020=True)


def make_distiller(gradient_element=True, v020=False, **crcd):
    torch.manual_seed(0)
    student, teacher = Student(), Teacher()
    relation = RelationConfig(**{**(V020_BANK if v020 else {}), "embed_dim": 8, "num_negatives": K, **crcd})
    config = CRCDConfig(**(V020_WEIGHTS if v020 else {}), gradient_element=gradient_element, relation=relation)
    return CRCDDistiller(student, teacher, "fc", "fc", config, num_samples=N)


def shard_student(distiller, mp_policy=None):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = mp_policy or MixedPrecisionPolicy()
    fully_shard(distiller.student.body, mp_policy=policy)
    fully_shard(distiller.student, mp_policy=policy)
    return distiller.prepare_distributed()


def batch(step, rank, size=B):
    g = torch.Generator().manual_seed(1000 * step + rank)
    index = torch.randperm(N // WORLD, generator=g)[:size] * WORLD + rank
    return torch.randn(size, DIN, generator=g), torch.randint(0, CLASSES, (size,), generator=g), index


def full_state(distiller):
    """Every tensor of the distiller, FSDP2 shards gathered (collective)."""
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v.clone() for k, v in distiller.state_dict().items()}


def aligned_steps(distiller, steps, rank, first=0):
    """Steps whose negative draws are one process's draws for the concatenated batch, split by rank."""
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for step in range(first, first + steps):
        x, y, index = batch(step, rank)
        torch.manual_seed(7 + step)
        if rank == 1:
            torch.randint(N, (B, K))  # rank 0's draws
        out = distiller(x, y, index)
        out["loss"].backward()
        distiller.sync_gradients()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(torch.stack([out[k].detach() for k in ("loss", "task_loss", "kd_loss", "crcd_feature_loss")]))
    return torch.stack(losses)


def scenario_concatenated(rank, out):
    distiller = shard_student(make_distiller(**CONCATENATED))
    assert is_fully_sharded(distiller.student)
    assert not isinstance(distiller.student, nn.parallel.DistributedDataParallel)  # FSDP2 reduces its own
    losses = aligned_steps(distiller, 3, rank)
    torch.save({"losses": losses, "state": full_state(distiller)}, out("concatenated"))


def scenario_sharded_teacher(rank, out):
    distiller = make_distiller(**CONCATENATED)
    reference = copy.deepcopy(distiller.teacher)
    numel = sum(p.numel() for p in distiller.teacher.parameters())
    shard_teacher(distiller.teacher, [Block])
    local = sum(p.to_local().numel() for p in distiller.teacher.parameters())
    x = batch(9, rank)[0]
    with torch.no_grad():
        sharded_rows, plain = distiller.teacher_side.rows(x, None, gradient=False), reference(x)
    shard_student(distiller)
    losses = aligned_steps(distiller, 3, rank)
    torch.save({
        "numel": numel, "local": local, "losses": losses, "state": full_state(distiller),
        "logits": (sharded_rows.logits, plain), "feature": (sharded_rows.feature, reference.blocks(reference.stem(x))),
        "unsharded_after_forward": [type(p).__name__ for p in distiller.teacher.parameters()],
    }, out("sharded_teacher"))


def train(distiller, steps, accumulate=1):
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        for micro in range(accumulate):
            x, y, index = batch(step * accumulate + micro, dist.get_rank())
            torch.manual_seed(100 * step + 10 * micro + dist.get_rank())
            last = micro == accumulate - 1
            with distiller.no_sync() if not last else torch.enable_grad():
                (distiller(x, y, index)["loss"] / accumulate).backward()
        distiller.sync_gradients()
        optimizer.step()
        optimizer.zero_grad()
    return distiller


def scenario_gradient_element(rank, out):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    results = {}
    ddp = train(make_distiller().prepare_distributed(), 2)
    results["ddp"] = {k.replace("student.module.", "student."): v for k, v in full_state(ddp).items()}
    results["fsdp"] = full_state(train(shard_student(make_distiller()), 2))
    with_teacher = make_distiller()
    shard_teacher(with_teacher.teacher, [Block])
    results["fsdp_sharded_teacher"] = full_state(train(shard_student(with_teacher), 2))
    results["fsdp_accumulate"] = full_state(train(shard_student(make_distiller()), 1, accumulate=2))
    results["fsdp_every_micro_batch"] = full_state(train(shard_student(make_distiller()), 1, accumulate=1))
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mixed = shard_student(make_distiller(), mp_policy=bf16)
    dtypes = []
    mixed.student.register_forward_hook(lambda module, input, output: dtypes.append(output.dtype))
    results["bf16"] = full_state(train(mixed, 2))
    results["bf16_logits_dtype"] = dtypes[0]
    torch.save(results, out("gradient_element"))


def scenario_checkpoint(rank, out):
    """Two steps, a sharded checkpoint, two more; against a fresh run resumed from the checkpoint."""
    path = out("checkpoint").replace(f".rank{rank}.pt", "")
    runs = {}
    for name in ("straight", "resumed"):
        distiller = shard_student(make_distiller(shard_memory=True, memory_init="cold"))
        optimizer = torch.optim.SGD(distiller.parameters(), lr=0.1, momentum=0.9)
        steps = range(4) if name == "straight" else range(2, 4)
        if name == "resumed":
            load_sharded_checkpoint(distiller, path, optimizer)
        losses = []
        for step in steps:
            x, y, index = batch(step, rank)
            torch.manual_seed(100 * step + rank)
            loss = distiller(x, y, index)["loss"]
            loss.backward()
            distiller.sync_gradients()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
            if name == "straight" and step == 1:
                save_sharded_checkpoint(distiller, path, optimizer)
                runs["at_save"] = {k: v.clone() for k, v in distiller.crcd_state_dict().items()}
        runs[name] = {"losses": torch.stack(losses[-2:]), "state": full_state(distiller)}
    torch.save(runs, out("checkpoint"))


def scenario_refused(rank, out):
    distiller = shard_student(make_distiller())
    errors = {}
    for integration in ("hf", "lightning", "timm"):
        try:
            check_fsdp_integration(integration, distiller.student)
        except NotImplementedError as error:
            errors[integration] = str(error)
    check_fsdp_integration("loop", distiller.student)
    own_unit = make_distiller()
    from torch.distributed.fsdp import fully_shard

    fully_shard(own_unit.student.fc)
    fully_shard(own_unit.student)
    x, y, index = batch(0, rank)
    try:
        own_unit.prepare_distributed()(x, y, index)
    except ValueError as error:
        errors["classifier_unit"] = str(error)
    torch.save(errors, out("refused"))


def scenario_teardown(rank, out):
    """Last: release_distributed() empties DTensor's caches, which hold the mesh and so the group."""
    distiller = make_distiller()
    shard_teacher(distiller.teacher, [Block])
    train(shard_student(distiller), 1).release_distributed()


SCENARIOS = [scenario_concatenated, scenario_sharded_teacher, scenario_gradient_element, scenario_checkpoint,
             scenario_refused, scenario_teardown]


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    group = weakref.ref(dist.group.WORLD)
    try:
        for scenario in SCENARIOS:
            scenario(rank, lambda name: os.path.join(out_dir, f"{name}.rank{rank}.pt"))
    finally:
        gc.collect()  # FSDP2's modules hold the group too, in reference cycles (module <-> hooks)
        dist.destroy_process_group()
    # Freed inside destroy_process_group(), which then waits for gloo's worker threads.
    torch.save({"group_freed": group() is None}, os.path.join(out_dir, f"destroyed.rank{rank}.pt"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp2")
    mp.start_processes(_worker, args=(str(out_dir / "init"), str(out_dir)), nprocs=WORLD, start_method="spawn")
    load = lambda name, rank: torch.load(out_dir / f"{name}.rank{rank}.pt", weights_only=False)  # noqa: E731
    load.dir = out_dir
    return load


def _single_process(steps, **settings):
    """One process, unsharded, fed both ranks' batches concatenated, with the same draws."""
    distiller = make_distiller(**settings)
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for step in range(steps):
        x, y, index = (torch.cat(parts) for parts in zip(*(batch(step, rank) for rank in range(WORLD))))
        torch.manual_seed(7 + step)
        out = distiller(x, y, index)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(torch.stack([out[k].detach() for k in ("loss", "task_loss", "kd_loss", "crcd_feature_loss")]))
    return torch.stack(losses), distiller.state_dict()


@pytest.mark.parametrize("name", ["concatenated", "sharded_teacher"])
def test_two_fsdp2_ranks_give_the_losses_of_one_process_fed_the_concatenated_batch(results, name):
    losses, _ = _single_process(3, **CONCATENATED)
    ranks = [results(name, rank)["losses"] for rank in range(WORLD)]
    torch.testing.assert_close((ranks[0] + ranks[1]) / 2, losses)


@pytest.mark.parametrize("name", ["concatenated", "sharded_teacher"])
def test_two_fsdp2_ranks_leave_the_parameters_and_memories_of_one_process(results, name):
    _, state = _single_process(3, **CONCATENATED)
    for rank in range(WORLD):
        got = results(name, rank)["state"]
        assert got.keys() == state.keys()
        for key, value in state.items():
            torch.testing.assert_close(got[key], value, msg=f"rank {rank}: {key}")


def test_sharded_teacher_gives_the_unsharded_teachers_features_and_logits(results):
    for rank in range(WORLD):
        run = results("sharded_teacher", rank)
        for sharded, plain in (run["logits"], run["feature"]):
            torch.testing.assert_close(sharded, plain, rtol=0, atol=0)


def test_sharded_teacher_holds_half_of_its_parameters_per_rank_and_none_gathered_after_a_step(results):
    runs = [results("sharded_teacher", rank) for rank in range(WORLD)]
    assert sum(run["local"] for run in runs) == runs[0]["numel"]
    assert all(run["local"] <= 0.6 * run["numel"] for run in runs)
    assert set(runs[0]["unsharded_after_forward"]) == {"DTensor"}


@pytest.mark.parametrize("name", ["fsdp", "fsdp_sharded_teacher"])
def test_gradient_element_through_the_fsdp2_student_equals_ddp(results, name):
    for rank in range(WORLD):
        run = results("gradient_element", rank)
        assert run[name].keys() == run["ddp"].keys()
        for key, value in run["ddp"].items():
            torch.testing.assert_close(run[name][key], value, msg=key)


def test_fsdp2_no_sync_accumulation_keeps_ranks_identical(results):
    first, second = (results("gradient_element", rank)["fsdp_accumulate"] for rank in range(WORLD))
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_fsdp2_bf16_mixed_precision_trains_the_student_in_bf16_and_keeps_ranks_identical(results):
    runs = [results("gradient_element", rank) for rank in range(WORLD)]
    assert runs[0]["bf16_logits_dtype"] == torch.bfloat16
    for key, value in runs[0]["bf16"].items():
        assert torch.equal(runs[1]["bf16"][key], value), key
        assert value.dtype == runs[0]["fsdp"][key].dtype, key  # fp32 master weights and CRCD state
    moved = runs[0]["bf16"]["student.fc.weight"] - make_distiller().student.fc.weight
    assert moved.abs().max() > 0
    torch.testing.assert_close(runs[0]["bf16"]["student.fc.weight"], runs[0]["fsdp"]["student.fc.weight"],
                               rtol=0, atol=0.05)


def test_resume_from_a_sharded_checkpoint_continues_exactly(results):
    for rank in range(WORLD):
        run = results("checkpoint", rank)
        torch.testing.assert_close(run["resumed"]["losses"], run["straight"]["losses"], rtol=0, atol=0)
        for key, value in run["straight"]["state"].items():
            torch.testing.assert_close(run["resumed"]["state"][key], value, rtol=0, atol=0, msg=key)


def test_a_two_rank_sharded_checkpoint_loads_into_one_process(results):
    # Another world size: the student's shards and the sharded bank's rows are put back together.
    saved = [results("checkpoint", rank)["at_save"] for rank in range(WORLD)]
    distiller = make_distiller(shard_memory=True, memory_init="cold")
    load_sharded_checkpoint(distiller, str(results.dir / "checkpoint"))
    state = distiller.crcd_state_dict()
    for key, value in saved[0].items():
        if ".shard." in key:
            value = torch.cat([part[key] for part in saved])
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


def test_integrations_refuse_an_fsdp2_student_with_a_message_that_says_what_to_use(results):
    errors = results("refused", 0)
    assert sorted(errors) == ["classifier_unit", "hf", "lightning", "timm"]
    assert all("torchrun loop" in errors[name] for name in ("hf", "lightning", "timm"))


def test_gradient_element_refuses_a_student_classifier_that_is_its_own_fsdp2_unit(results):
    assert "do not fully_shard the classifier itself" in results("refused", 1)["classifier_unit"]


@pytest.mark.parametrize("rank", range(WORLD))
def test_destroy_process_group_frees_the_group_after_fsdp2_training_and_release_distributed(results, rank):
    assert results("destroyed", rank) == {"group_freed": True}


def test_check_fsdp_integration_names_the_unknown_integration():
    with pytest.raises(ValueError, match="integration must be one of"):
        check_fsdp_integration("deepspeed", nn.Linear(2, 2))


def test_shard_teacher_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        shard_teacher(Teacher(), [Block])


def test_check_fsdp_integration_refuses_a_framework_configured_to_shard():
    with pytest.raises(NotImplementedError, match="FSDPStrategy under the 'lightning' integration"):
        check_fsdp_integration("lightning", nn.Linear(2, 2), sharding="FSDPStrategy")
    check_fsdp_integration("lightning", nn.Linear(2, 2))  # not sharded: nothing to refuse


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "ModelParallelStrategy"])
def test_lightning_callback_refuses_an_fsdp_strategy_before_building_the_distiller(strategy):
    import types

    pytest.importorskip("lightning")
    from lightning.pytorch import strategies

    from crcd_plugin.integrations.lightning import CRCDCallback

    callback = CRCDCallback(Teacher(), student_classifier="fc", teacher_classifier="fc")
    trainer = types.SimpleNamespace(strategy=getattr(strategies, strategy)())
    module = types.SimpleNamespace(automatic_optimization=True)
    with pytest.raises(NotImplementedError, match=strategy):
        callback.on_fit_start(trainer, module)
    assert callback.distiller is None


EXAMPLE = "torchrun --standalone --nproc_per_node 2 examples/fsdp2_train.py"


def test_fsdp2_example_trains_checkpoints_and_ends_with_identical_crcd_state():
    import shlex
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert EXAMPLE in (root / "docs" / "distributed.md").read_text()
    env = dict(os.environ, PYTHONPATH=str(root), CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(shlex.split(EXAMPLE), cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch ") == 3, result.stdout
    assert "teacher parameters held per rank: 0.50 of the teacher" in result.stdout
    assert result.stdout.rstrip().endswith("identical on all 2 ranks: True"), result.stdout
    assert float(result.stdout.split("student train accuracy ")[1].split()[0]) > 0.3, result.stdout

"""CRCD distillation with an FSDP2 student and a teacher sharded per block, launched by torchrun.

    torchrun --standalone --nproc_per_node 2 examples/fsdp2_train.py

The toy problem of ``ddp_train.py`` (gloo on CPU, NCCL on GPUs). The student is sharded with
``fully_shard`` (each hidden layer its own unit, then the root, which keeps the classifier), the frozen
teacher with ``shard_teacher`` (each hidden layer its own unit), and the CRCD heads and memory bank
stay replicated beside them. The run saves a sharded checkpoint with ``torch.distributed.checkpoint``,
loads it back, and checks that every rank's CRCD state equals rank 0's.
"""

import gc
import os
import tempfile

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler
from toy_problem import accuracy, make_data, mlp, train_teacher  # next to this script

from crcd_plugin import CRCDConfig, CRCDDistiller, RelationConfig
from crcd_plugin.fsdp import load_sharded_checkpoint, save_sharded_checkpoint, shard_teacher

EPOCHS, BATCH = 3, 32


def main() -> None:
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)

    distil(rank, world, device)
    # The sharded models hold the process group (through the device mesh), in reference cycles: with
    # distil()'s locals gone, collect them, so that destroy_process_group() frees the group and waits
    # for gloo's worker threads (docs/distributed.md, "Ending a run").
    gc.collect()
    dist.destroy_process_group()


def distil(rank: int, world: int, device: torch.device) -> None:
    data = make_data()
    teacher = shard_teacher(train_teacher(data, device), blocks=["0", "2"])  # frozen, 1/world per rank
    torch.manual_seed(1)
    student = mlp(32).to(device)
    config = CRCDConfig(gradient_element=True, relation=RelationConfig(embed_dim=32, num_negatives=128))
    distiller = CRCDDistiller(student, teacher, "4", "4", config, num_samples=len(data)).to(device)
    for layer in (student[0], student[2]):
        fully_shard(layer)
    fully_shard(student)  # the root holds the classifier "4", which the gradient element reads
    torch.manual_seed(100 + rank)  # negatives are drawn per rank
    distiller.prepare_distributed()  # an FSDP2 student is not wrapped in DDP
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=BATCH, sampler=sampler)
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        distiller.train()
        total = torch.zeros(2, device=device)
        for x, y, index in loader:
            x, y, index = x.to(device), y.to(device), index.to(device)
            out = distiller(x, y, index)
            out["loss"].backward()  # FSDP2 reduce-scatters the student's gradients
            distiller.sync_gradients()  # the CRCD heads' gradients
            optimizer.step()
            optimizer.zero_grad()
            total += torch.stack([out["loss"].detach() * len(y), torch.tensor(float(len(y)), device=device)])
        dist.all_reduce(total)
        if rank == 0:
            print(f"epoch {epoch}: mean loss {float(total[0] / total[1]):.4f} over {int(total[1])} samples")

    # A sharded checkpoint: every rank writes its shards, then all read them back.
    checkpoint = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(checkpoint)
    save_sharded_checkpoint(distiller, checkpoint[0], optimizer)
    load_sharded_checkpoint(distiller, checkpoint[0], optimizer)

    distiller.eval()
    student_accuracy = accuracy(distiller.student, data, device)  # collective: every rank runs it
    shard = sum(p.to_local().numel() for p in teacher.parameters()) / sum(p.numel() for p in teacher.parameters())
    state = torch.cat([t.detach().float().flatten() for t in distiller.crcd_state_dict().values()])
    reference = state.clone()
    dist.broadcast(reference, 0)
    same = torch.tensor(float(torch.equal(state, reference)), device=device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    if rank == 0:
        print(f"teacher parameters held per rank: {shard:.2f} of the teacher")
        print(f"student train accuracy {student_accuracy:.3f}")
        print(f"CRCD state identical on all {world} ranks: {bool(same)}")
    dist.barrier()  # no rank tears the group down while another is still printing or reducing
    distiller.release_distributed()  # empties DTensor's caches, which hold the device mesh


if __name__ == "__main__":
    main()

"""CRCD distillation with a DDP-wrapped student, launched by torchrun (gloo on CPU, NCCL on GPUs).

    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py

A tiny teacher and student on generated data (20-D Gaussian clusters, 10 classes), so the run
takes seconds on two CPU cores. Each rank loads its share of the data (DistributedSampler), the
student is wrapped in DDP by ``prepare_distributed()``, the frozen teacher is not, and the CRCD heads'
gradients are averaged by ``sync_gradients()``. Gradient accumulation over two micro-batches uses
``distiller.no_sync()``. At the end every rank checks that its CRCD state equals rank 0's.
"""

import contextlib
import os

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from toy_problem import accuracy, make_data, mlp, train_teacher  # next to this script

from crcd_plugin import CRCDConfig, CRCDDistiller, RelationConfig

EPOCHS, BATCH, ACCUMULATE = 3, 32, 2


def main() -> None:
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)

    data = make_data()
    teacher = train_teacher(data, device)
    torch.manual_seed(1)  # the student starts the same everywhere (DDP would broadcast it anyway)
    config = CRCDConfig(
        gradient_element=True,
        schedule="step", schedule_until=0.96,  # the reference: no distillation in the last 4% of the epochs
        relation=RelationConfig(embed_dim=32, num_negatives=128),
    )
    distiller = CRCDDistiller(
        mlp(32), teacher, "4", "4", config,  # "4": dotted path of each classifier
        num_samples=len(data),  # memory-bank negatives: the loader yields dataset indices
        total_steps=EPOCHS,  # the schedule counts epochs (set_progress(epoch))
    ).to(device)
    # Each rank may now draw from its own random stream (negatives are per rank by design).
    torch.manual_seed(100 + rank)
    distiller.prepare_distributed(device_ids=[local_rank] if use_cuda else None)
    # lr 0.01: at 0.05 KD from this very confident toy teacher diverges (student at chance).
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=BATCH, sampler=sampler)
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        distiller.train()
        distiller.set_progress(epoch)
        total = torch.zeros(2, device=device)
        for step, (x, y, index) in enumerate(loader):
            x, y, index = x.to(device), y.to(device), index.to(device)
            update = (step + 1) % ACCUMULATE == 0 or step + 1 == len(loader)
            with distiller.no_sync() if not update else contextlib.nullcontext():
                out = distiller(x, y, index)
                (out["loss"] / ACCUMULATE).backward()
            if update:
                distiller.sync_gradients()  # the CRCD heads are outside DDP
                optimizer.step()
                optimizer.zero_grad()
            total += torch.stack([out["loss"].detach() * len(y), torch.tensor(float(len(y)), device=device)])
        dist.all_reduce(total)
        if rank == 0:
            print(f"epoch {epoch}: mean loss {float(total[0] / total[1]):.4f} over {int(total[1])} samples")

    distiller.eval()
    student_accuracy = accuracy(distiller.student, data, device)
    # Every rank's CRCD heads, memories and NCE constants must equal rank 0's.
    state = torch.cat([t.detach().float().flatten() for t in distiller.crcd_state_dict().values()])
    reference = state.clone()
    dist.broadcast(reference, 0)
    same = torch.tensor(float(torch.equal(state, reference)), device=device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    if rank == 0:
        print(f"student train accuracy {student_accuracy:.3f}")
        print(f"CRCD state identical on all {world} ranks: {bool(same)}")
    dist.barrier()  # no rank tears the group down while another is still printing or reducing
    # Drop the DDP wrapper (its reducer holds the process group) so that destroy_process_group()
    # frees the group and waits for gloo's worker threads; a group left alive until interpreter
    # exit can abort the process there (docs/distributed.md, "Ending a run").
    distiller.release_distributed()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""CRCD distillation under Hugging Face ``accelerate`` (DDP on CPU processes or GPUs).

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no examples/accelerate_train.py

No ``accelerate config`` file is needed (the last three flags only silence accelerate's warning
about defaults). ``--multi_gpu`` is accelerate's launcher that starts one process per rank
(``torch.distributed.run``); on a machine without GPUs the script asks for CPU processes (gloo)
itself, because ``accelerate launch --cpu --num_processes 2`` starts a single process unless
an MPI hostfile is given. The same tiny problem as
``examples/ddp_train.py``: ``accelerator.prepare`` wraps the student in DDP and shards the loader,
``accelerator.accumulate`` skips the gradient sync on accumulation micro-batches, and
``distiller.sync_gradients()`` averages the CRCD heads (outside DDP) before each optimizer step.
"""

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from toy_problem import accuracy, make_data, mlp, train_teacher  # next to this script

from crcd_plugin import CRCDConfig, CRCDDistiller, RelationConfig

EPOCHS, BATCH, ACCUMULATE = 3, 32, 2


def main() -> None:
    # Without GPUs, CPU processes with gloo; with GPUs, one GPU per process with NCCL.
    accelerator = Accelerator(gradient_accumulation_steps=ACCUMULATE, cpu=not torch.cuda.is_available())
    if accelerator.device.type == "cpu":
        torch.set_num_threads(1)
    data = make_data()
    teacher = train_teacher(data, accelerator.device)  # frozen: never passed to prepare()
    torch.manual_seed(1)
    config = CRCDConfig(
        gradient_element=True,
        schedule="step", schedule_until=0.96,  # the reference: no distillation in the last 4% of the epochs
        relation=RelationConfig(embed_dim=32, num_negatives=128),
    )
    distiller = CRCDDistiller(
        mlp(32), teacher, "4", "4", config,  # "4": dotted path of each classifier
        num_samples=len(data),  # memory-bank negatives: the loader yields dataset indices
        total_steps=EPOCHS,  # the schedule counts epochs (set_progress(epoch))
    ).to(accelerator.device)
    # lr 0.01: at 0.05 KD from this very confident toy teacher diverges (student at chance).
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loader = DataLoader(data, batch_size=BATCH, shuffle=True)
    # Only the student is wrapped; prepare_distributed() then keeps that wrapper and gives every
    # process rank 0's CRCD heads and memories.
    distiller.student, optimizer, loader = accelerator.prepare(distiller.student, optimizer, loader)
    distiller.prepare_distributed()

    for epoch in range(EPOCHS):
        distiller.train()
        distiller.set_progress(epoch)
        total = torch.zeros(2, device=accelerator.device)
        for x, y, index in loader:
            with accelerator.accumulate(distiller.student):
                out = distiller(x, y, index)
                accelerator.backward(out["loss"])
                if accelerator.sync_gradients:
                    distiller.sync_gradients()  # the CRCD heads are outside DDP
                optimizer.step()  # accelerate steps only when gradients were synced
                optimizer.zero_grad()
            total += torch.stack([out["loss"].detach() * len(y), torch.tensor(float(len(y)), device=total.device)])
        total = accelerator.reduce(total, reduction="sum")
        accelerator.print(f"epoch {epoch}: mean loss {float(total[0] / total[1]):.4f} over {int(total[1])} samples")

    distiller.eval()
    student_accuracy = accuracy(distiller.student, data, accelerator.device)
    state = torch.cat([t.detach().float().flatten() for t in distiller.crcd_state_dict().values()])
    gathered = accelerator.gather(state[None])  # [processes, numel]
    accelerator.print(f"student train accuracy {student_accuracy:.3f}")
    accelerator.print(
        f"CRCD state identical on all {accelerator.num_processes} processes: {bool((gathered == gathered[0]).all())}"
    )
    accelerator.wait_for_everyone()  # no process tears the group down while another is still working
    # Drop every reference to the DDP wrapper (ours and the accelerator's) so that end_training()
    # frees the process group and waits for gloo's worker threads (docs/distributed.md, "Ending a run").
    distiller.release_distributed()
    accelerator.free_memory()
    accelerator.end_training()


if __name__ == "__main__":
    main()

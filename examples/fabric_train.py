"""CRCD with Lightning Fabric: your own loop, ``CRCDDistiller`` as the model Fabric sets up.

    python examples/fabric_train.py                 # one process
    python examples/fabric_train.py --devices 2     # DDP on two CPU processes (gloo)

The tiny problem of the distributed examples (generated data, ``toy_problem.py``): the teacher is
trained first, then the distiller (student, frozen teacher, CRCD heads and memory bank) goes through
``fabric.setup`` with its optimizer, the loss through ``fabric.backward``, and gradient accumulation
through ``fabric.no_backward_sync``. At the end every rank checks that its CRCD state equals rank 0's.
"""

import argparse

import lightning as L
import torch
from lightning.fabric.strategies import DDPStrategy
from torch.utils.data import DataLoader
from toy_problem import accuracy, make_data, mlp, train_teacher  # next to this script

from crcd_plugin import CRCDConfig, CRCDDistiller, RelationConfig

EPOCHS, BATCH, ACCUMULATE = 3, 32, 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: more threads only add overhead
    # DDP must not re-broadcast buffers on each forward (torch's broadcast_buffers): the memory bank is
    # a buffer that every rank already updates with all ranks' rows, and rank 0's copy would
    # overwrite it. Unused parameters: once the step schedule turns distillation off, the CRCD heads
    # get no gradient.
    strategy = DDPStrategy(forward_sync_buffers=False, find_unused_parameters=True) if args.devices > 1 else "auto"
    fabric = L.Fabric(accelerator=args.accelerator, devices=args.devices, strategy=strategy)
    fabric.launch()  # with --devices 2, starts the second process

    data = make_data()
    teacher = train_teacher(data, fabric.device)
    fabric.seed_everything(1)  # the same student and CRCD heads on every rank
    # The authors' recipe (CE + 0.9 KD at T 4, NCE, every sample an anchor, a cold bank, the step
    # schedule) rather than the defaults: with CE and KD at 0.5 (KD at T 1), three epochs at lr 0.01
    # leave the student under-trained once two ranks share the data (half the optimizer steps).
    config = CRCDConfig.reference(
        gradient_element=True, relation=RelationConfig.reference(embed_dim=32, num_negatives=128)
    )
    distiller = CRCDDistiller(
        mlp(32), teacher, "4", "4", config,  # dotted paths of the classifier heads
        num_samples=len(data),  # memory-bank negatives: the loader yields dataset indices
        total_steps=EPOCHS,  # the schedule counts epochs (set_progress(epoch))
    )
    optimizer = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    model, optimizer = fabric.setup(distiller, optimizer)  # DDP around student and heads; the teacher is frozen
    loader = fabric.setup_dataloaders(DataLoader(data, batch_size=BATCH, shuffle=True, drop_last=True))

    for epoch in range(EPOCHS):
        distiller.train()
        distiller.set_progress(epoch)
        total = torch.zeros(2, device=fabric.device)
        for step, (x, y, index) in enumerate(loader):
            update = (step + 1) % ACCUMULATE == 0 or step + 1 == len(loader)
            with fabric.no_backward_sync(model, enabled=not update):
                out = model(x, y, index)
                fabric.backward(out["loss"] / ACCUMULATE)
            if update:
                optimizer.step()
                optimizer.zero_grad()
            total += torch.stack([out["loss"].detach() * len(y), torch.tensor(float(len(y)), device=fabric.device)])
        total = fabric.all_reduce(total, reduce_op="sum")
        fabric.print(f"epoch {epoch}: mean loss {float(total[0] / total[1]):.4f} over {int(total[1])} samples")

    distiller.eval()
    student_accuracy = accuracy(distiller.student, data, fabric.device)
    state = torch.cat([t.detach().float().flatten() for t in distiller.crcd_state_dict().values()])
    same = torch.equal(state, fabric.broadcast(state.clone(), src=0))
    same = bool(fabric.all_reduce(torch.tensor(float(same)), reduce_op="mean") == 1.0)
    fabric.print(f"student train accuracy {student_accuracy:.3f}")
    fabric.print(f"CRCD state identical on all {fabric.world_size} ranks: {same}")
    fabric.barrier()


if __name__ == "__main__":
    main()

"""Writes tests/data/distiller-0.3-one-sided.pt: a distiller state saved by crcd-plugin 0.3 (commit
4682b82) with the default one-sided loss, whose memory bank then still held a student-side memory,
with the batch and the losses 0.3 computed after loading it, for tests/test_memory.py.

Run it against the 0.3 tree, e.g.::

    git worktree add /tmp/crcd-03 4682b82
    PYTHONPATH=/tmp/crcd-03 python tests/data/make_v03_checkpoint.py tests/data
    git worktree remove /tmp/crcd-03
"""

import sys
from pathlib import Path

import torch
from torch import nn

from crcd_plugin import CRCDConfig, CRCDDistiller, RelationConfig

N, B = 32, 8


class Net(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, width), nn.ReLU())
        self.fc = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def make() -> CRCDDistiller:
    torch.manual_seed(0)
    # 0.3's default weights, spelled out: the defaults have changed since this fixture was written.
    config = CRCDConfig(task_weight=0.5, kd_weight=0.5, kd_temperature=1.0, kd_standardize=False, feature_weight=0.3,
                        gradient_element=True, relation=RelationConfig(embed_dim=8, num_negatives=6))
    return CRCDDistiller(Net(6), Net(10), "fc", "fc", config, num_samples=N)


def main(out: Path) -> None:
    distiller = make()
    data = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y, index = torch.randn(B, 8, generator=data), torch.randint(0, 3, (B,), generator=data), \
            torch.randperm(N, generator=data)[:B]
        distiller(x, y, index)["loss"].backward()
    state = {k: v.clone() for k, v in distiller.state_dict().items()}
    crcd_state = {k: v.clone() for k, v in distiller.crcd_state_dict().items()}
    assert any(".memory_student." in key for key in crcd_state)
    x, y, index = torch.randn(B, 8, generator=data), torch.randint(0, 3, (B,), generator=data), \
        torch.randperm(N, generator=data)[:B]
    torch.manual_seed(7)
    losses = {k: v.detach().clone() for k, v in distiller(x, y, index).items() if k != "logits"}
    torch.save({"state_dict": state, "crcd_state_dict": crcd_state, "input": x, "target": y, "index": index,
                "seed": 7, "losses": losses}, out / "distiller-0.3-one-sided.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

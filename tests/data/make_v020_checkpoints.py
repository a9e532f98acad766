"""Writes tests/data/crcd_loss_v020_*.pt: CRCDLoss state dicts saved by crcd-plugin 0.2.0 (commit
61c9035), with inputs and the losses 0.2.0 computed from them, for tests/test_checkpoint_compat.py.

Run it against the 0.2.0 tree, e.g.::

    git worktree add /tmp/crcd-020 61c9035
    PYTHONPATH=/tmp/crcd-020 python tests/data/make_v020_checkpoints.py tests/data
    git worktree remove /tmp/crcd-020
"""

import sys
from pathlib import Path

import torch

import crcd_plugin
from crcd_plugin import CRCDLoss

DS, DT, EMBED, B, N = 10, 12, 8, 8, 50
MODES = {
    "bank": dict(negatives="bank", num_samples=N, num_negatives=9),
    "queue": dict(negatives="queue", queue_size=16, num_negatives=9),
    "batch": dict(negatives="batch"),
}


def _features(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, DS, generator=g), torch.randn(B, DT, generator=g), torch.randperm(N, generator=g)[:B]


def main(out: Path) -> None:
    for mode, options in MODES.items():
        torch.manual_seed(0)
        crcd = CRCDLoss(DS, DT, embed_dim=EMBED, **options)
        for step in range(3):  # real memory rows, a filled queue and a fixed NCE constant
            student, teacher, index = _features(step)
            crcd(student, teacher, index if mode == "bank" else None).backward()
        state = {key: value.clone() for key, value in crcd.state_dict().items()}
        student, teacher, index = _features(10)
        index = index if mode == "bank" else None
        crcd.eval()
        torch.manual_seed(123)
        eval_parts = crcd(student, teacher, index, return_parts=True)
        crcd.train()
        torch.manual_seed(456)
        train_loss = crcd(student, teacher, index)
        torch.save(
            {
                "version": crcd_plugin.__version__,
                "options": dict(options, embed_dim=EMBED),
                "dims": (DS, DT),
                "state_dict": state,
                "inputs": (student, teacher, index),
                "eval_seed": 123,
                "eval_parts": {key: value.detach() for key, value in eval_parts.items()},
                "train_seed": 456,
                "train_loss": train_loss.detach(),
                "state_after_train": {key: value.clone() for key, value in crcd.state_dict().items()},
            },
            out / f"crcd_loss_v020_{mode}.pt",
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))

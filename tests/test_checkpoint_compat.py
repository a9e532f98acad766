"""CRCDLoss state dicts saved by 0.2.0 load and give the losses 0.2.0 computed from them.

The fixtures (tests/data/crcd_loss_v020_*.pt) were written by tests/data/make_v020_checkpoints.py
run against the 0.2.0 tree (commit 61c9035): state dict, inputs, and 0.2.0's own results.
"""

from pathlib import Path

import pytest
import torch
from conftest import V020_BANK, V020_RELATION

from crcd_plugin import CRCDLoss
from crcd_plugin.config import RelationConfig

DATA = Path(__file__).parent / "data"


def _load(mode):
    fixture = torch.load(DATA / f"crcd_loss_v020_{mode}.pt")
    options = dict(fixture["options"])
    negatives, num_samples = options.pop("negatives"), options.pop("num_samples", None)
    # written by 0.2.0 with its defaults (NCE for a bank only); the fixture's own options override them
    v020 = V020_BANK if negatives == "bank" else V020_RELATION
    config = RelationConfig(**{**v020, **options})
    crcd = CRCDLoss(*fixture["dims"], config, negatives=negatives, num_samples=num_samples)
    crcd.load_state_dict(fixture["state_dict"])
    return crcd, fixture


@pytest.mark.parametrize("mode", ["bank", "queue", "batch"])
def test_a_0_2_0_checkpoint_loads_and_gives_the_0_2_0_loss(mode):
    crcd, fixture = _load(mode)
    assert fixture["version"] == "0.1.0"  # what 0.2.0's __version__ said
    student, teacher, index = fixture["inputs"]
    crcd.eval()
    torch.manual_seed(fixture["eval_seed"])
    parts = crcd.forward_parts(student, teacher, index)
    for name, expected in fixture["eval_parts"].items():
        torch.testing.assert_close(parts[name].detach(), expected, rtol=1e-6, atol=1e-6)
    crcd.train()
    torch.manual_seed(fixture["train_seed"])
    torch.testing.assert_close(crcd(student, teacher, index).detach(), fixture["train_loss"], rtol=1e-6, atol=1e-6)
    state = crcd.state_dict()
    assert state.keys() == fixture["state_after_train"].keys()
    for name, expected in fixture["state_after_train"].items():
        torch.testing.assert_close(state[name], expected, rtol=1e-6, atol=1e-6)

"""Exact resume: N steps, save everything, load in a fresh process, continue; the losses equal an
uninterrupted run bit for bit (CPU), as docs/reliability.md describes."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import V020_BANK, V020_RELATION, V020_WEIGHTS
from torch import nn

from crcd_plugin import CRCDConfig, CRCDDistiller, RelationConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One script, two roles: "first" trains N steps, saves a checkpoint, then goes on M more steps (the
# uninterrupted run); "resume" is a fresh process that loads the checkpoint and runs the same M steps.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch import nn
    from crcd_plugin import CRCDConfig, CRCDDistiller, RelationConfig

    role, path, negatives = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    N_STEPS, M_STEPS, BATCH, SAMPLES = 4, 4, 8, 64

    class Net(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, width), nn.BatchNorm1d(width), nn.ReLU())
            self.fc = nn.Linear(width, 3)
        def forward(self, x):
            return self.fc(self.body(x))

    torch.manual_seed(0)
    options = {"embed_dim": 8}
    if negatives == "bank":
        options.update(num_negatives=16, num_anchors=5)  # random negatives and a random anchor subset
        extra = {"num_samples": SAMPLES}
    elif negatives == "queue":
        options.update(queue_size=24)
        extra = {}
    else:
        extra = {}
    config = CRCDConfig(gradient_element=True, warmup_steps=6, schedule="linear", schedule_start=0.2,
                        schedule_until=0.9, relation=RelationConfig(**options))
    distiller = CRCDDistiller(Net(5), Net(9), config=config, total_steps=20, **extra)
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    data = torch.Generator().manual_seed(1)

    def step(t):
        distiller.train()
        distiller.set_progress(t)
        index = torch.randperm(SAMPLES, generator=data)[:BATCH]
        x, y = torch.randn(BATCH, 6, generator=data), torch.randint(0, 3, (BATCH,), generator=data)
        out = distiller(x, y, index if negatives == "bank" else None)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        scheduler.step()
        return {k: float(v).hex() for k, v in out.items() if k != "logits"}

    if role == "first":
        for t in range(N_STEPS):
            step(t)
        torch.save({"distiller": distiller.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
                    "data_rng": data.get_state()}, path + ".ckpt")
    else:
        checkpoint = torch.load(path + ".ckpt")
        distiller.load_state_dict(checkpoint["distiller"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        torch.set_rng_state(checkpoint["rng"])
        data.set_state(checkpoint["data_rng"])
    losses = [step(t) for t in range(N_STEPS, N_STEPS + M_STEPS)]
    with open(path + "." + role + ".json", "w") as handle:
        json.dump(losses, handle)
    """
)


def _run(script, role, path, negatives):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, script, role, path, negatives], check=True, env=env, cwd=ROOT, timeout=300)
    with open(f"{path}.{role}.json") as handle:
        return json.load(handle)


# Bank and queue: the modes with random draws (negatives, anchor subsets) and state that moves.
@pytest.mark.slow
@pytest.mark.parametrize("negatives", ["bank", "queue"])
def test_resumed_run_continues_with_bit_identical_losses(tmp_path, negatives):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    path = str(tmp_path / "state")
    uninterrupted = _run(script, "first", path, negatives)
    resumed = _run(script, "resume", path, negatives)
    assert resumed == uninterrupted
    assert len({row["loss"] for row in resumed}) == len(resumed)  # the steps do differ


# --- 0.2.0 checkpoints ---------------------------------------------------------------------------

DATA = Path(__file__).parent / "data"


class FixtureNet(nn.Module):
    """The models of tests/data/distiller-0.2.0-*.pt (written by the 0.2.0 code, commit 61c9035)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, width), nn.ReLU())
        self.fc = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def _v02_distiller(mode: str) -> CRCDDistiller:
    # The 0.2.0 options of the fixture, in the 0.3 spelling, on 0.2.0's defaults (tests/conftest.py) that wrote it.
    if mode == "bank":
        relation = RelationConfig(**dict(V020_BANK, embed_dim=8, num_negatives=6))
        config = CRCDConfig(**V020_WEIGHTS, gradient_element=True, schedule="step", schedule_until=0.9,
                            relation=relation)
        return CRCDDistiller(FixtureNet(6), FixtureNet(10), "fc", "fc", config, num_samples=32, total_steps=10)
    relation = RelationConfig(**dict(V020_RELATION, embed_dim=8))
    config = CRCDConfig(**V020_WEIGHTS, gradient_element=True, relation=relation)
    return CRCDDistiller(FixtureNet(6), FixtureNet(10), "fc", "fc", config)


@pytest.mark.parametrize("mode", ["bank", "batch"])
@pytest.mark.parametrize("which", ["state_dict", "crcd_state_dict"])
def test_a_0_2_0_checkpoint_loads_and_gives_the_loss_the_0_2_0_code_gave(mode, which):
    saved = torch.load(DATA / f"distiller-0.2.0-{mode}.pt", weights_only=True)
    distiller = _v02_distiller(mode)
    if which == "state_dict":
        distiller.load_state_dict(saved["state_dict"])
    else:
        models = {k: v for k, v in saved["state_dict"].items() if k.startswith(("student.", "teacher."))}
        distiller.load_state_dict(models, strict=False)
        distiller.load_crcd_state_dict(saved["crcd_state_dict"])
    torch.manual_seed(saved["seed"])
    out = distiller(saved["input"], saved["target"], saved["index"])
    for key, expected in saved["losses"].items():
        torch.testing.assert_close(out[key].detach(), expected, msg=key)

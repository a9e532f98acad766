"""CRCDTrainer under torchrun (2 CPU processes, gloo): the Trainer path keeps CRCD state identical on every rank.

Run as a script, this file is the torchrun worker.
"""

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow  # several processes or a subprocess run: left out by -m "not slow"

pytest.importorskip("transformers")

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = 2


def worker(out_dir: str) -> None:
    """One rank: a few accumulated steps of CRCDTrainer on its shard of the data, then its state saved."""
    import torch.distributed as dist
    from transformers import TrainingArguments

    sys.path.insert(0, HERE)
    from test_hf_trainer import TextSet, bert, queue_config

    from crcd_plugin.integrations.hf import CRCDTrainer

    torch.set_num_threads(1)
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3,
        learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        ddp_backend="gloo", disable_tqdm=True, seed=0,
    )
    trainer = CRCDTrainer(
        model=bert(16), teacher_model=bert(24, seed=1), args=args, train_dataset=TextSet(64),
        crcd_config=queue_config(gradient_element=True),
    )
    initial = {k: v.clone() for k, v in trainer.distiller.crcd_state_dict().items()}
    trainer.train()
    torch.save(
        {
            "initial": initial,
            "crcd": trainer.distiller.crcd_state_dict(),
            "student": trainer.model.state_dict(),
            "wrapper": type(trainer.model_wrapped).__name__,
            "teacher_wrapped": type(trainer.teacher_model).__name__,
            "logs": [entry for entry in trainer.state.log_history if "loss" in entry],
        },
        os.path.join(out_dir, f"rank{dist.get_rank()}.pt"),
    )


def test_torchrun_keeps_crcd_state_and_student_identical_on_both_ranks(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(HERE)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
               os.path.abspath(__file__), str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]

    assert ranks[0]["wrapper"] == "DistributedDataParallel"
    assert ranks[0]["teacher_wrapped"] == "BertForSequenceClassification"
    for part in ("initial", "crcd", "student"):
        assert ranks[0][part].keys() == ranks[1][part].keys()
        for name in ranks[0][part]:
            assert torch.equal(ranks[0][part][name], ranks[1][part][name]), (part, name)
    # The heads trained and the queue moved: equality is not that of untouched state.
    changed = [name for name in ranks[0]["crcd"] if not torch.equal(ranks[0]["crcd"][name], ranks[0]["initial"][name])]
    assert any("embed_student" in name for name in changed) and any("memory" in name for name in changed)
    # Logged components are averaged over ranks, so every rank logs the same numbers.
    assert ranks[0]["logs"] == ranks[1]["logs"] and "crcd_feature_loss" in ranks[0]["logs"][0]


if __name__ == "__main__":
    worker(sys.argv[1])

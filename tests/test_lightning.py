"""CRCDCallback: CRCD added to an unchanged LightningModule by one callback (tiny models, CPU)."""

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning")

from crcd_plugin import CRCDDistiller  # noqa: E402
from crcd_plugin.config import CRCDConfig, RelationConfig  # noqa: E402
from crcd_plugin.integrations.lightning import CRCDCallback  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = ("task_loss", "kd_loss", "crcd_feature_loss", "crcd_gradient_loss")


class _Net(nn.Module):
    def __init__(self, width: int, batch_norm: bool = False) -> None:
        super().__init__()
        norm = nn.BatchNorm1d(width) if batch_norm else nn.Identity()
        self.body = nn.Sequential(nn.Linear(12, width), norm, nn.ReLU())
        self.fc = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class _Classifier(L.LightningModule):
    """A plain LightningModule: it knows nothing of distillation."""

    def __init__(self, return_dict: bool = False) -> None:
        super().__init__()
        self.model = _Net(8)
        self.return_dict = return_dict

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.model(x), y)
        return {"loss": loss} if self.return_dict else loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.model(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _data(n: int = 32, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 12, generator=generator), torch.randint(0, 4, (n,), generator=generator))


def _config(**changes) -> CRCDConfig:
    # Both sides train; every sample an anchor (no random draw, so runs compare bit for bit).
    relation = RelationConfig(embed_dim=8, queue_size=16, objective="nce", symmetric=True, num_anchors=None)
    return CRCDConfig(**{"feature_weight": 0.3, "gradient_element": True, "relation": relation, **changes})


def _teacher() -> nn.Module:
    torch.manual_seed(123)
    return _Net(16, batch_norm=True)


def _fit(module, callback, data=None, batch_size=8, ckpt_path=None, **trainer_kwargs):
    options = dict(
        max_epochs=1, accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
        logger=False, enable_checkpointing=False, log_every_n_steps=1,
    )
    options.update(trainer_kwargs)
    trainer = L.Trainer(callbacks=[callback, *options.pop("callbacks", [])], **options)
    loader = DataLoader(data if data is not None else _data(), batch_size=batch_size)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def _crcd_state(callback: CRCDCallback) -> dict:
    return {k: v.detach().clone() for k, v in callback.state_dict()["crcd"].items()}


class _Snapshot(L.pytorch.callbacks.Callback):
    """Copies a CRCDCallback's state when training starts (after it is built, before the first step)."""

    def __init__(self, callback: CRCDCallback, into: dict) -> None:
        self.callback, self.into = callback, into

    def on_train_start(self, trainer, pl_module):
        self.into.update(_crcd_state(self.callback))


@pytest.mark.parametrize("return_dict", [False, True], ids=["tensor", "dict"])
def test_every_loss_component_is_logged_and_added_to_the_returned_loss(return_dict):
    torch.manual_seed(0)
    callback = CRCDCallback(_teacher(), student_classifier="model.fc", config=_config())
    trainer = _fit(_Classifier(return_dict), callback)
    for name in COMPONENTS:
        assert name in trainer.callback_metrics and torch.isfinite(trainer.callback_metrics[name])
    assert all(float(trainer.callback_metrics[name]) > 0 for name in COMPONENTS)


def test_teacher_is_bitwise_unchanged_frozen_in_eval_mode_and_outside_the_module():
    teacher = _teacher()
    before = copy.deepcopy(teacher.state_dict())
    module = _Classifier()
    _fit(module, CRCDCallback(teacher, student_classifier="model.fc", config=_config()), max_epochs=2)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # BatchNorm stats too
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert not any(m is teacher for m in module.modules())
    assert set(module.state_dict()) == {f"model.{k}" for k in _Net(8).state_dict()}


def test_crcd_heads_train_in_the_modules_optimizer_and_training_step_is_restored():
    torch.manual_seed(0)
    callback = CRCDCallback(_teacher(), student_classifier="model.fc", config=_config())
    initial = {}
    module = _Classifier()
    trainer = _fit(module, callback, max_epochs=2, callbacks=[_Snapshot(callback, initial)])
    heads = [k for k in initial if k.endswith((".weight", ".bias")) and "memory" not in k]
    assert len(heads) == 8  # student and teacher embedding heads of both elements
    assert all(not torch.equal(initial[k], callback.state_dict()["crcd"][k]) for k in heads)
    optimizer = trainer.optimizers[0]
    assert len(optimizer.param_groups) == 2 and optimizer.param_groups[1]["momentum"] == 0.9
    assert "training_step" not in vars(module)


def test_the_heads_follow_the_modules_lr_scheduler():
    class Scheduled(_Classifier):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            return [optimizer], [torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5**epoch)]

    trainer = _fit(Scheduled(), CRCDCallback(_teacher(), student_classifier="model.fc", config=_config()), max_epochs=2)
    assert [group["lr"] for group in trainer.optimizers[0].param_groups] == [0.025, 0.025]


def test_a_fit_with_the_callback_equals_the_plain_loop_distiller_bitwise():
    torch.manual_seed(0)
    module, teacher = _Classifier(), _teacher()
    student, plain_teacher = copy.deepcopy(module.model), copy.deepcopy(teacher)
    callback = CRCDCallback(teacher, student_classifier="model.fc", config=_config())
    initial = {}
    _fit(module, callback, max_epochs=2, callbacks=[_Snapshot(callback, initial)])

    distiller = CRCDDistiller(student, plain_teacher, "fc", "fc", _config())
    distiller.load_crcd_state_dict(initial)
    optimizer = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    for _ in range(2):
        for x, y in DataLoader(_data(), batch_size=8):
            optimizer.zero_grad()
            distiller(x, y)["loss"].backward()
            optimizer.step()
    assert all(torch.equal(v, module.model.state_dict()[k]) for k, v in student.state_dict().items())
    assert all(torch.equal(v, callback.state_dict()["crcd"][k]) for k, v in distiller.crcd_state_dict().items())


def test_memory_bank_negatives_read_the_index_of_three_element_batches():
    class Indexed(_Classifier):
        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            return nn.functional.cross_entropy(self.model(x), y)

    x, y = _data().tensors
    config = _config(relation=RelationConfig(embed_dim=8, num_negatives=8, symmetric=True))
    callback = CRCDCallback(_teacher(), student_classifier="model.fc", config=config, num_samples=32)
    initial = {}
    trainer = _fit(Indexed(), callback, data=TensorDataset(x[:24], y[:24], torch.arange(24)),
                   callbacks=[_Snapshot(callback, initial)])
    name = "crcd_feature.memory_student.weight"
    bank, before = callback.state_dict()["crcd"][name], initial[name]
    assert bank.shape[0] == 32 and torch.equal(bank[24:], before[24:])  # rows of samples never seen
    assert all(not torch.equal(bank[i], before[i]) for i in range(24))
    assert float(trainer.callback_metrics["crcd_feature_loss"]) > 0


def test_validation_is_untouched_and_moves_no_crcd_state():
    torch.manual_seed(0)
    callback = CRCDCallback(_teacher(), student_classifier="model.fc", config=_config())
    module = _Classifier()
    trainer = _fit(module, callback, limit_val_batches=2)
    state = _crcd_state(callback)
    metrics = trainer.validate(module, DataLoader(_data(seed=1), batch_size=8), verbose=False)[0]
    x, y = _data(seed=1).tensors
    with torch.no_grad():
        plain = (nn.functional.cross_entropy(module.model(x[:8]), y[:8]) + nn.functional.cross_entropy(
            module.model(x[8:16]), y[8:16])) / 2
    assert metrics["val_loss"] == pytest.approx(float(plain), rel=1e-6)
    assert all(torch.equal(state[k], v) for k, v in callback.state_dict()["crcd"].items())


def test_checkpoint_holds_the_student_and_the_crcd_state_but_no_teacher(tmp_path):
    teacher = _teacher()
    callback = CRCDCallback(teacher, student_classifier="model.fc", config=_config())
    trainer = _fit(_Classifier(), callback)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert set(checkpoint["state_dict"]) == {f"model.{k}" for k in _Net(8).state_dict()}
    crcd = checkpoint["callbacks"][callback.state_key]["crcd"]
    for name in ("crcd_feature.embed_student.proj.weight", "crcd_feature.memory_student.weight",
                 "crcd_gradient.log_z", "warmup_progress"):
        assert name in crcd

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for value in obj.values():
                yield from tensors(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                yield from tensors(value)

    saved = list(tensors(checkpoint))
    for name, weight in teacher.state_dict().items():
        if weight.numel() > 1:
            assert not any(t.shape == weight.shape and torch.equal(t, weight) for t in saved), name


def test_fit_with_ckpt_path_resumes_the_crcd_state_bit_for_bit(tmp_path):
    config = _config(schedule="linear", schedule_until=1.0)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1)
    torch.manual_seed(0)
    straight = CRCDCallback(_teacher(), student_classifier="model.fc", config=config)
    module = _Classifier()
    _fit(module, straight, max_epochs=4, batch_size=16, callbacks=[checkpoints], enable_checkpointing=True)
    expected, expected_student = _crcd_state(straight), copy.deepcopy(module.state_dict())

    torch.manual_seed(1)  # another initialisation: everything must come from the checkpoint
    resumed = CRCDCallback(_teacher(), student_classifier="model.fc", config=config)
    module = _Classifier()
    _fit(module, resumed, max_epochs=4, batch_size=16, ckpt_path=tmp_path / "epoch=1-step=4.ckpt")
    assert expected.keys() == resumed.state_dict()["crcd"].keys()
    for name, value in resumed.state_dict()["crcd"].items():
        assert torch.equal(expected[name], value), name
    assert all(torch.equal(expected_student[k], v) for k, v in module.state_dict().items())


def test_the_schedule_counts_optimizer_steps_under_gradient_accumulation():
    relation = RelationConfig(embed_dim=8, queue_size=64, symmetric=True)
    config = _config(schedule="step", schedule_until=0.5, relation=relation)
    callback = CRCDCallback(_teacher(), student_classifier="model.fc", config=config)
    trainer = _fit(_Classifier(), callback, accumulate_grad_batches=2)  # 4 micro-batches, 2 optimizer steps
    assert trainer.global_step == 2 and callback.distiller.schedule.total_steps == 2
    # Distillation ran for optimizer step 0 (2 micro-batches), then w = 0 and the queue stopped.
    assert int(callback.state_dict()["crcd"]["crcd_feature.memory_student.pointer"]) == 2 * 8


def test_gradient_accumulation_of_the_distillation_loss_equals_one_large_batch():
    config = _config(feature_weight=0.0, gradient_element=False)  # KD + CE: no per-micro-batch state

    def run(batch_size, accumulate):
        torch.manual_seed(0)
        module = _Classifier()
        _fit(module, CRCDCallback(_teacher(), student_classifier="model.fc", config=config), batch_size=batch_size,
             accumulate_grad_batches=accumulate)
        return module.state_dict()

    large, accumulated = run(16, 1), run(8, 2)
    assert all(torch.allclose(large[k], accumulated[k], atol=1e-6) for k in large)


def test_bf16_mixed_precision_runs_on_cpu():
    torch.manual_seed(0)
    callback = CRCDCallback(_teacher(), student_classifier="model.fc", config=_config())
    trainer = _fit(_Classifier(), callback, precision="bf16-mixed", max_epochs=2)
    assert all(torch.isfinite(trainer.callback_metrics[name]) for name in COMPONENTS)
    assert all(torch.isfinite(v.float()).all() for v in callback.state_dict()["crcd"].values())


def test_batches_the_default_cannot_read_take_a_batch_fn():
    class DictBatches(_Classifier):
        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.model(batch["x"]), batch["y"])

    data = [{"x": x, "y": y} for x, y in zip(*_data().tensors)]
    with pytest.raises(TypeError, match="batch_fn"):
        _fit(DictBatches(), CRCDCallback(_teacher(), student_classifier="model.fc", config=_config()), data=data)
    callback = CRCDCallback(_teacher(), student_classifier="model.fc", config=_config(),
                            batch_fn=lambda batch: (batch["x"], batch["y"], None))
    trainer = _fit(DictBatches(), callback, data=data)
    assert float(trainer.callback_metrics["crcd_feature_loss"]) > 0


def test_a_wrong_head_path_names_the_module_path_convention():
    with pytest.raises(ValueError, match="model.fc"):
        _fit(_Classifier(), CRCDCallback(_teacher(), student_classifier="fc", config=_config()))


def test_memory_bank_negatives_without_the_dataset_size_name_the_argument():
    config = _config(relation=RelationConfig(embed_dim=8, negatives="bank"))
    with pytest.raises(ValueError, match="num_samples= to CRCDCallback"):
        _fit(_Classifier(), CRCDCallback(_teacher(), student_classifier="model.fc", config=config))


def test_importing_crcd_plugin_does_not_import_lightning_and_a_missing_extra_names_the_install():
    code = "import sys, crcd_plugin; print('lightning' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
    code = "import sys; sys.modules['lightning'] = None; import crcd_plugin.integrations.lightning"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0 and 'pip install "crcd-plugin[lightning]"' in result.stderr


_DDP_SCRIPT = """
import sys, torch, lightning as L
sys.path.insert(0, {tests!r})
from test_lightning import _Classifier, _config, _data, _teacher
from torch.utils.data import DataLoader
from crcd_plugin.integrations.lightning import CRCDCallback

L.seed_everything(0)
callback = CRCDCallback(_teacher(), student_classifier="model.fc", config=_config())
trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", callbacks=[callback],
                    enable_progress_bar=False, enable_model_summary=False, logger=False, enable_checkpointing=False)
module = _Classifier()
torch.manual_seed(trainer.global_rank)  # ranks start from different random states: the CRCD state must not care
trainer.fit(module, DataLoader(_data(64, seed=trainer.global_rank), batch_size=8))
crcd = {{k: id(v) for k, v in callback.distiller.named_buffers() if not k.startswith(("student.", "teacher."))}}
ddp_buffers = {{id(b) for b in trainer.strategy.model.buffers()}}
assert not set(crcd.values()) & ddp_buffers, "a CRCD buffer is inside the DDP module"
state = {{"crcd": callback.state_dict()["crcd"], "student": module.state_dict()}}
torch.save(state, {out!r} + f"/rank{{trainer.global_rank}}.pt")
"""


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_keeps_the_crcd_state_identical_on_both_ranks(tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(textwrap.dedent(_DDP_SCRIPT.format(tests=str(ROOT / "tests"), out=str(tmp_path))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for part in ("crcd", "student"):
        for name, value in rank0[part].items():
            assert torch.equal(value, rank1[part][name]), f"{part}.{name}"
    assert rank0["crcd"]["crcd_feature.memory_student.weight"].abs().sum() > 0  # the queue holds both ranks' rows


def test_the_0_3_head_keywords_warn_map_onto_the_classifier_names_and_keep_the_state_key():
    teacher = _teacher()
    current = CRCDCallback(teacher, student_classifier="model.fc", teacher_classifier="fc", config=_config())
    with pytest.warns(DeprecationWarning, match=r"student_head=.*deprecated.*use student_classifier="):
        old = CRCDCallback(teacher, student_head="model.fc", teacher_classifier="fc", config=_config())
    assert old.student_classifier == "model.fc" and old.student_head == "model.fc"
    assert old.state_key == current.state_key  # checkpoints of 0.3 callbacks restore into renamed ones
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="not both"):
        CRCDCallback(teacher, student_classifier="model.fc", student_head="model.fc")
    with pytest.raises(TypeError, match="needs student_classifier="):
        CRCDCallback(teacher)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['student_path'\]"):
        CRCDCallback(teacher, student_classifier="model.fc", student_path="x")

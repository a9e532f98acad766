"""The CIFAR-100 example trains: teacher and CRCD distillation steps on random data, CPU, tiny batch."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Dict

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "examples" / "cifar100"


def _load(name: str) -> ModuleType:
    module_name = f"crcd_cifar100_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLE_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


train = _load("train")
models = _load("models")

BATCH = 4
DATASET_SIZE = 8


def _snapshot(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _changed(before: Dict[str, torch.Tensor], model: nn.Module) -> bool:
    return any(not torch.equal(before[name], p.detach()) for name, p in model.named_parameters())


def _loader() -> DataLoader:
    return DataLoader(train.RandomCifar(DATASET_SIZE), batch_size=BATCH, shuffle=True, drop_last=True)


def _two_steps(objective: nn.Module, recipe: "train.Recipe") -> list:
    optimizer = train.make_optimizer(objective, recipe)
    objective.train()
    return [train.train_step(objective, optimizer, batch, torch.device("cpu")) for batch in _loader()]


def test_dataset_yields_image_label_and_dataset_index() -> None:
    image, label, index = train.RandomCifar(DATASET_SIZE)[5]
    assert image.shape == (3, 32, 32)
    assert 0 <= label < 100
    assert index == 5


def test_teacher_steps_have_finite_loss_and_update_weights() -> None:
    torch.manual_seed(0)
    model = models.create_model("resnet8")
    before = _snapshot(model)
    losses = _two_steps(train.CrossEntropyObjective(model), train.Recipe())
    assert len(losses) == 2
    assert all(math.isfinite(step["loss"]) for step in losses)
    assert _changed(before, model)


def test_distill_steps_with_feature_and_gradient_elements_update_student_only() -> None:
    torch.manual_seed(0)
    student = models.create_model("resnet8")
    teacher = train.load_teacher("resnet8x4", checkpoint=None, device=torch.device("cpu"))
    recipe = train.Recipe(num_negatives=4, gradient_element=True)
    distiller = train.build_distiller(student, teacher, recipe, num_samples=DATASET_SIZE)
    distiller.set_progress(0)
    student_before, teacher_before = _snapshot(student), _snapshot(teacher)

    losses = _two_steps(distiller, recipe)

    assert len(losses) == 2
    for step in losses:
        for key in ("loss", "task_loss", "kd_loss", "crcd_feature_loss", "crcd_gradient_loss"):
            assert math.isfinite(step[key]), f"{key} is not finite: {step}"
        assert step["crcd_feature_loss"] != 0.0 and step["crcd_gradient_loss"] != 0.0
    assert _changed(student_before, student)
    assert not _changed(teacher_before, teacher)


@pytest.mark.slow
def test_smoke_cli_trains_a_teacher_then_distils_from_its_checkpoint(tmp_path: Path) -> None:
    common = ["--smoke", "--output-dir", str(tmp_path), "--device", "cpu", "--batch-size", "4"]
    teacher = train.main(["--mode", "teacher", "--model", "resnet8", *common])
    assert math.isfinite(teacher["losses"]["loss"])
    student = train.main(["--mode", "distill", "--model", "resnet8", "--teacher", "resnet8",
                          "--teacher-ckpt", teacher["checkpoint"], "--num-negatives", "4", *common])
    assert math.isfinite(student["losses"]["crcd_gradient_loss"])
    checkpoint = torch.load(student["checkpoint"], weights_only=True)
    models.create_model("resnet8").load_state_dict(checkpoint["model"])  # a bare student loads


def test_unknown_model_name_is_a_clear_value_error() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet9000'.*resnet8x4"):
        models.create_model("resnet9000")


@pytest.mark.parametrize(
    "name, millions",
    [("resnet20", 0.28), ("resnet56", 0.86), ("resnet8x4", 1.23), ("resnet32x4", 7.43),
     ("wrn_16_2", 0.70), ("wrn_40_2", 2.26)],
)
def test_parameter_counts_match_the_crd_benchmark(name: str, millions: float) -> None:
    model = models.create_model(name)
    assert isinstance(model.fc, nn.Linear)
    assert models.count_parameters(model) / 1e6 == pytest.approx(millions, abs=0.01)

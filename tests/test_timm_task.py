"""Specification of CRCDDistillationTask, CRCD as a timm training task (crcd_plugin.integrations.timm).

Tiny timm models built from their configs (pretrained=False, no network): a CNN pair whose
normalisations differ and a ViT pair that share one.
"""

import logging
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import V020_RELATION, V020_WEIGHTS, current_spelling
from torch import nn

timm = pytest.importorskip("timm")
from timm.loss import SoftTargetCrossEntropy  # noqa: E402
from timm.task import DistillationTeacher  # noqa: E402

from crcd_plugin import CRCDConfig, RelationConfig  # noqa: E402
from crcd_plugin.integrations.timm import CRCDDistillationTask, CRCDTrainableModule  # noqa: E402

NUM_CLASSES, BATCH, SIZE = 10, 8, 32
SMALL = {"queue_size": 32, "embed_dim": 16}
SMALL_CONFIG = CRCDConfig(feature_weight=0.3, gradient_element=True, relation=RelationConfig(**SMALL))
# 0.2.0's weights and relation options (tests/conftest.py), for the tests whose assertions were written against them:
# every sample an anchor (no random draw to align) and both sides' loss (both memories written, both heads trained).
# make_task's crcd_options and gradient_element apply on top of it.
V020_CONFIG = CRCDConfig(**V020_WEIGHTS, relation=RelationConfig(**V020_RELATION))
LOSS_KEYS = {"loss", "output", "task_loss", "kd_loss", "crcd_feature_loss", "crcd_gradient_loss"}
# (student name, teacher name, create_model kwargs): the CNN pair has ImageNet vs 0.5 normalisation.
PAIRS = {
    "cnn": ("test_efficientnet", "test_resnet", {}),
    "vit": ("test_vit", "test_vit2", {"img_size": SIZE}),
}


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def make_task(pair: str = "vit", seed: int = 0, **options) -> CRCDDistillationTask:
    student_name, teacher_name, kwargs = PAIRS[pair]
    torch.manual_seed(seed)
    student = timm.create_model(student_name, num_classes=NUM_CLASSES, **kwargs)
    teacher = timm.create_model(teacher_name, num_classes=NUM_CLASSES, **kwargs)
    options.setdefault("crcd_options", SMALL)
    options.setdefault("gradient_element", True)  # 0.3: the default is CRCDConfig's (False) here too
    return CRCDDistillationTask(student, teacher, verbose=False, **current_spelling(options))


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 3, SIZE, SIZE, generator=g), torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)


def train_steps(task: CRCDDistillationTask, steps: int = 2, lr: float = 0.05):
    optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=lr)
    task.train()
    for step in range(steps):
        out = task(*batch(step))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    return out


def clone_state(module: nn.Module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def pre_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


# --- one training step ---------------------------------------------------------------------------


@pytest.mark.parametrize("pair", ["cnn", "vit"])
def test_step_returns_every_loss_component_finite(pair):
    out = train_steps(make_task(pair), steps=1)
    assert set(out) == LOSS_KEYS
    assert out["output"].shape == (BATCH, NUM_CLASSES)
    for key in LOSS_KEYS - {"output"}:
        assert out[key].dim() == 0 and torch.isfinite(out[key]), key
    assert all(out[key] > 0 for key in ("kd_loss", "crcd_feature_loss", "crcd_gradient_loss"))


@pytest.mark.parametrize("pair", ["cnn", "vit"])
def test_training_steps_leave_the_teacher_bitwise_unchanged(pair):
    task = make_task(pair)
    before = clone_state(task.teacher)
    train_steps(task)
    after = task.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics included
    assert not any(p.requires_grad for p in task.teacher.parameters())
    assert not any(m.training for m in task.teacher.modules())


@pytest.mark.parametrize("pair", ["cnn", "vit"])
def test_training_steps_update_the_student_and_the_crcd_heads(pair):
    task = make_task(pair, config=V020_CONFIG)
    student_before = {k: v.clone() for k, v in task.student.named_parameters()}
    crcd_before = [p.detach().clone() for p in task.trainable_module.crcd_parameters()]
    train_steps(task)
    changed = [k for k, p in task.student.named_parameters() if not torch.equal(p, student_before[k])]
    assert len(changed) > len(student_before) // 2
    assert not torch.equal(task.student.get_classifier().weight, student_before[_classifier_name(task)])
    assert all(not torch.equal(p, q) for p, q in zip(task.trainable_module.crcd_parameters(), crcd_before))


def _classifier_name(task: CRCDDistillationTask) -> str:
    return task.distiller.student_classifier + ".weight"


def test_crcd_heads_are_trainable_parameters_of_the_task_and_of_its_trainable_module():
    task = make_task()
    heads = {id(p) for p in task.trainable_module.crcd_parameters()}
    assert len(heads) == 8  # student and teacher embedding heads (weight, bias) of both elements
    assert heads <= {id(p) for p in task.get_trainable_module().parameters()}  # what timm's optimizer takes
    assert heads <= {id(p) for p in task.parameters() if p.requires_grad}
    assert not heads & {id(p) for p in task.student.parameters()}


def test_soft_targets_from_mixup_train_with_timms_soft_target_criterion():
    task = make_task(criterion=SoftTargetCrossEntropy())
    x, y = batch()
    soft = torch.nn.functional.one_hot(y, NUM_CLASSES).float() * 0.8 + 0.02
    out = task(x, soft)
    out["loss"].backward()
    assert all(torch.isfinite(out[k]) for k in LOSS_KEYS - {"output"})


# --- features and normalisation ------------------------------------------------------------------


@pytest.mark.parametrize("pair", ["cnn", "vit"])
def test_distilled_features_are_the_pre_logits_features_of_both_models(pair):
    task = make_task(pair).eval()
    seen = {}
    task.distiller.crcd_feature.register_forward_pre_hook(lambda m, args: seen.setdefault("features", args[:2]))
    x, y = batch()
    task(x, y)
    student_feature, teacher_feature = seen["features"]
    with torch.no_grad():
        teacher_input = task.teacher.normalize_input(x, *_student_norm(task.student))
        torch.testing.assert_close(student_feature, pre_logits(task.student, x))
        torch.testing.assert_close(teacher_feature, pre_logits(task.teacher.model, teacher_input))


def _student_norm(student: nn.Module):
    cfg = student.pretrained_cfg
    return torch.tensor(cfg["mean"]).view(1, -1, 1, 1), torch.tensor(cfg["std"]).view(1, -1, 1, 1)


def test_teacher_sees_the_input_renormalised_as_timms_distillation_does():
    task = make_task("cnn")
    seen = {}
    task.teacher.model.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    x, y = batch()
    task(x, y)
    mean, std = _student_norm(task.student)
    assert not torch.equal(mean, task.teacher.mean_kd)  # the pair really differs
    torch.testing.assert_close(seen["x"], task.teacher.normalize_input(x, mean, std))
    assert not torch.allclose(seen["x"], x)


def test_teacher_with_the_students_normalisation_sees_the_input_unchanged():
    task = make_task("vit")
    seen = {}
    task.teacher.model.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    x, y = batch()
    task(x, y)
    assert task.distiller.teacher_transform is None
    assert torch.equal(seen["x"], x)


# --- teacher and model specs ---------------------------------------------------------------------


def test_teacher_given_by_timm_name_is_created_for_the_students_classes_without_weights(caplog):
    torch.manual_seed(0)
    student = timm.create_model("test_vit", num_classes=NUM_CLASSES, img_size=SIZE)
    with caplog.at_level(logging.WARNING):
        task = CRCDDistillationTask(
            student, "test_vit2", teacher_kwargs={"img_size": SIZE}, verbose=False,
            **current_spelling({"crcd_options": SMALL}),
        )
    assert type(task.teacher.model).__name__ == "VisionTransformer"
    assert task.teacher.model.num_classes == NUM_CLASSES
    assert "random weights" in caplog.text
    assert torch.isfinite(task(*batch())["loss"])


def test_a_distillation_teacher_is_used_as_given():
    torch.manual_seed(0)
    student = timm.create_model("test_vit", num_classes=NUM_CLASSES, img_size=SIZE)
    teacher = DistillationTeacher(timm.create_model("test_vit2", num_classes=NUM_CLASSES, img_size=SIZE))
    task = CRCDDistillationTask(student, teacher, config=SMALL_CONFIG, verbose=False)
    assert task.teacher is teacher


def test_a_model_without_get_classifier_works_through_its_head_path():
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.classifier = nn.Linear(8, NUM_CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.body(x))

    torch.manual_seed(0)
    teacher = timm.create_model("test_vit2", num_classes=NUM_CLASSES, img_size=SIZE)
    task = CRCDDistillationTask(Plain(), teacher, config=SMALL_CONFIG, student_classifier="classifier", verbose=False)
    out = train_steps(task, steps=1)
    assert torch.isfinite(out["crcd_gradient_loss"]) and out["crcd_gradient_loss"] > 0


def test_unknown_teacher_name_is_a_value_error_naming_close_models():
    student = timm.create_model("test_vit", num_classes=NUM_CLASSES, img_size=SIZE)
    with pytest.raises(ValueError, match=r"teacher_model 'test_vit9' is not a timm model name.*test_vit"):
        CRCDDistillationTask(student, "test_vit9", verbose=False)


def test_teacher_of_another_type_is_a_type_error():
    student = timm.create_model("test_vit", num_classes=NUM_CLASSES, img_size=SIZE)
    with pytest.raises(TypeError, match="teacher_model must be a timm model name"):
        CRCDDistillationTask(student, 42, verbose=False)


def test_student_given_by_name_is_a_type_error_that_says_to_create_it():
    with pytest.raises(TypeError, match="student_model.*timm.create_model"):
        CRCDDistillationTask("test_vit", "test_vit2", verbose=False)


def test_student_without_classifier_is_a_value_error_pointing_to_student_head():
    student = timm.create_model("test_vit", num_classes=0, img_size=SIZE)
    teacher = timm.create_model("test_vit2", num_classes=NUM_CLASSES, img_size=SIZE)
    with pytest.raises(ValueError, match="student_head="):
        CRCDDistillationTask(student, teacher, verbose=False)


def test_teacher_with_other_classes_is_a_value_error():
    student = timm.create_model("test_vit", num_classes=NUM_CLASSES, img_size=SIZE)
    teacher = timm.create_model("test_vit2", num_classes=NUM_CLASSES + 1, img_size=SIZE)
    with pytest.raises(ValueError, match="teacher_model has 11 classes but student_model has 10"):
        CRCDDistillationTask(student, teacher, verbose=False)


# --- state and checkpoints -----------------------------------------------------------------------


def test_checkpoint_holds_the_student_alone_and_the_crcd_state_beside_it():
    task = make_task()
    checkpoint = task.get_checkpoint_state()
    assert set(checkpoint["state_dict"]) == set(task.student.state_dict())
    crcd = checkpoint["task_state"]["crcd"]
    assert "schedule.progress" not in crcd  # no schedule was given
    assert {k.split(".")[0] for k in crcd} == {"crcd_feature", "crcd_gradient"}


def test_task_state_round_trips_into_a_fresh_task(tmp_path):
    task = make_task(seed=0, config=V020_CONFIG)
    train_steps(task, steps=3)
    torch.save(task.get_checkpoint_state(), tmp_path / "checkpoint.pth")

    # The same teacher: timm checkpoints leave it out, it is rebuilt from its source.
    fresh = make_task(seed=0, config=V020_CONFIG)
    assert not torch.equal(fresh.trainable_module.crcd_feature.memory_student.weight,
                           task.trainable_module.crcd_feature.memory_student.weight)
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    fresh.load_checkpoint_state(checkpoint["state_dict"], checkpoint["task_state"])
    for name, value in task.trainable_module.state_dict().items():
        assert torch.equal(value, fresh.trainable_module.state_dict()[name]), name
    x, y = batch(7)
    expected, restored = task(x, y), fresh(x, y)  # same memories, NCE constants and heads
    for key in LOSS_KEYS:
        torch.testing.assert_close(restored[key], expected[key])


def test_task_state_that_does_not_fit_raises_and_loads_nothing():
    task = make_task()
    state = task.get_task_state()
    other = make_task(crcd_options={"queue_size": 16, "embed_dim": 16})
    before = {k: v.clone() for k, v in other.trainable_module.crcd_state_dict().items()}
    message = r"crcd_feature.memory_teacher.weight. has shape \(32, 16\), this task expects \(16, 16\)"
    with pytest.raises(ValueError, match=message):
        other.load_task_state(state)
    assert all(torch.equal(v, before[k]) for k, v in other.trainable_module.crcd_state_dict().items())
    with pytest.raises(ValueError, match="missing"):
        make_task(gradient_element=False).load_task_state(state)


def test_ema_tracks_the_student_and_crcd_heads_and_evaluates_the_student():
    task = make_task()
    ema = task.setup_ema(decay=0.5)
    train_steps(task, steps=1)
    task.update_ema()
    assert task.get_eval_model(ema=True) is ema.module.student
    assert set(task.get_task_state(ema=True)["crcd"]) == set(task.get_task_state()["crcd"])


# --- compile and distributed ---------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_task_runs_with_compiled_backbones_and_an_eager_classifier():
    torch._dynamo.reset()
    task = make_task("vit")
    head = task.student.get_classifier()
    eval_model = task.compile(backend="aot_eager")  # AOTAutograd: a double backward would fail here
    assert eval_model is task.student
    assert hasattr(task.student.forward_features, "_torchdynamo_orig_callable")
    assert hasattr(task.teacher.model.forward_features, "_torchdynamo_orig_callable")
    assert not hasattr(head.forward, "_torchdynamo_orig_callable") and head._compiled_call_impl is None
    assert all(loss.backend == "compile" for loss in task.trainable_module.crcd_children().values())
    weight = head.weight.detach().clone()
    out = train_steps(task, steps=1)
    assert all(torch.isfinite(out[k]) for k in LOSS_KEYS - {"output"})
    assert not torch.equal(head.weight, weight)


def test_ema_copy_of_a_compiled_task_runs_the_compiled_backbone_on_its_own_weights():
    task = make_task("vit")
    task.compile(backend="aot_eager")
    ema_student = task.setup_ema(decay=0.5).module.student
    assert ema_student.forward_features.__func__ is task.student.forward_features.__func__  # the compiled one
    with torch.no_grad():
        for param in ema_student.parameters():
            param.add_(0.1)
        x = batch()[0]
        expected = ema_student.forward_head(type(ema_student).forward_features(ema_student, x))  # eager
        torch.testing.assert_close(ema_student(x), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ema_student(x), task.student.eval()(x))


WORLD = 2


def _ddp_worker(rank, init_file, out_dir):
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        task = make_task("vit").prepare_distributed()
        x, y = batch(seed=10 + rank)  # ranks see different data
        task(x, y)["loss"].backward()
        torch.save(
            {
                "crcd": [p.grad for p in task.trainable_module.crcd_parameters()],
                "student": [p.grad for p in task.student.parameters()],
                "student_is_ddp": isinstance(task.trainable_module.student, DDP),
                "teacher_has_ddp": any(isinstance(m, DDP) for m in task.teacher.modules()),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_prepare_distributed_wraps_the_student_alone_and_averages_the_crcd_head_gradients(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    assert ranks[0]["student_is_ddp"] and not ranks[0]["teacher_has_ddp"]
    for key in ("crcd", "student"):
        for g0, g1 in zip(ranks[0][key], ranks[1][key]):
            torch.testing.assert_close(g0, g1)
    # Without averaging the ranks' different batches would give different head gradients.
    local = make_task("vit")
    local(*batch(seed=10))["loss"].backward()
    assert not torch.allclose(next(local.trainable_module.crcd_parameters()).grad, ranks[0]["crcd"][0])


def test_trainable_module_is_what_timm_takes():
    task = make_task()
    assert isinstance(task.get_trainable_module(), CRCDTrainableModule)
    assert task.get_eval_model() is task.student


# --- 0.3 configuration -----------------------------------------------------------------------------


def test_defaults_come_from_crcd_config_and_timm_weight_names_are_aliases():
    student = timm.create_model("test_efficientnet", num_classes=NUM_CLASSES)
    task = CRCDDistillationTask(student, "test_resnet", verbose=False, crcd_loss_weight=0.5, task_loss_weight=2.0)
    assert task.config == CRCDConfig(feature_weight=0.5, task_weight=2.0)
    assert task.distiller.crcd_gradient is None  # gradient_element defaults to CRCDConfig's False
    assert task.distiller.config.task_weight == 0.0 and task.task_loss_weight == 2.0  # timm's criterion is added


def test_0_2_0_keywords_still_work_with_a_deprecation_warning():
    student = timm.create_model("test_efficientnet", num_classes=NUM_CLASSES)
    with pytest.deprecated_call() as warned:
        task = CRCDDistillationTask(student, "test_resnet", verbose=False, crcd_options=SMALL, gradient_element=True)
    assert any(re.search(r"crcd_options.*RelationConfig", str(w.message)) for w in warned)
    assert task.config.relation.queue_size == 32 and task.config.gradient_element

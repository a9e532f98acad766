"""Specification of CRCDDistiller and DistillSchedule (crcd_plugin.distiller)."""

import copy
import os
import re
import resource

import pytest
import torch
import torch.nn.functional as F
from conftest import V020_RELATION, V020_WEIGHTS, current_spelling
from torch import nn

from crcd_plugin import CRCDConfig, RelationConfig
from crcd_plugin.distiller import CRCDDistiller, DistillSchedule
from crcd_plugin.functional import kd_loss

IN_DIM, NUM_CLASSES, BATCH = 8, 3, 8
SMALL_QUEUE = {"queue_size": 32, "embed_dim": 16}


def v020_config(**relation) -> CRCDConfig:
    """0.2.0's weights and relation options (tests/conftest.py), with ``relation`` options on top, for the tests
    whose assertions were written against them; 0.2.0 keywords (crcd_options too) given beside it apply on top."""
    return CRCDConfig(**V020_WEIGHTS, relation=RelationConfig(**dict(V020_RELATION, **relation)))


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


class TinyNet(nn.Module):
    """An MLP with BatchNorm, so that train/eval mode and running buffers matter."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(IN_DIM, width), nn.BatchNorm1d(width), nn.ReLU())
        self.fc = nn.Linear(width, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class MLPHeadNet(nn.Module):
    """A model whose classifier head is not an nn.Linear, so dimensions cannot be read off it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(IN_DIM, width), nn.BatchNorm1d(width), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(width, 8), nn.Tanh(), nn.Linear(8, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def small_config(**changes) -> CRCDConfig:
    """The small relation options with the relation term on (the defaults leave it off)."""
    return CRCDConfig(**{"feature_weight": 0.3, "relation": SMALL_RELATION, **changes})


def make_distiller(**options) -> CRCDDistiller:
    torch.manual_seed(0)
    options.setdefault("crcd_options", SMALL_QUEUE)
    return CRCDDistiller(TinyNet(6), TinyNet(12), **current_spelling(options))


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, IN_DIM, generator=g), torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)


def test_forward_returns_named_scalar_losses_and_student_logits():
    distiller = make_distiller(gradient_element=True)
    x, y = batch()
    out = distiller(x, y)
    assert set(out) == {"loss", "task_loss", "kd_loss", "crcd_feature_loss", "crcd_gradient_loss", "logits"}
    assert out["logits"].shape == (BATCH, NUM_CLASSES)
    for key in ("loss", "task_loss", "kd_loss", "crcd_feature_loss", "crcd_gradient_loss"):
        assert out[key].shape == () and torch.isfinite(out[key]), key
        assert out[key] > 0, key


def test_step_under_bf16_autocast_keeps_the_losses_in_fp32_and_trains():
    distiller = make_distiller(gradient_element=True)
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = distiller(x, y)
    for key in ("loss", "crcd_feature_loss", "crcd_gradient_loss"):
        assert out[key].dtype == torch.float32 and torch.isfinite(out[key]), key
    out["loss"].backward()
    assert distiller.crcd_gradient.embed_student.proj.weight.grad.abs().sum() > 0


def test_disabled_components_are_zero_tensors_not_none():
    distiller = make_distiller(config=v020_config(), alpha=0.0, beta=0.0, gradient_element=False)
    out = distiller(*batch())
    for key in ("kd_loss", "crcd_feature_loss", "crcd_gradient_loss"):
        assert isinstance(out[key], torch.Tensor) and out[key] == 0 and out[key].device == out["logits"].device
    assert torch.equal(out["loss"], out["task_loss"])
    assert distiller.crcd_feature is None and distiller.crcd_gradient is None


def test_total_loss_is_the_weighted_sum_of_components():
    distiller = make_distiller(config=v020_config(), gamma=0.5, alpha=0.9, beta=2.0, gradient_element=True,
                               gradient_weight=3.0, label_smoothing=0.1)
    x, y = batch()
    out = distiller(x, y)
    expected = (0.5 * out["task_loss"] + 0.9 * out["kd_loss"] + 2.0 * out["crcd_feature_loss"]
                + 3.0 * out["crcd_gradient_loss"])
    assert torch.allclose(out["loss"], expected)
    assert torch.allclose(out["task_loss"], F.cross_entropy(out["logits"], y, label_smoothing=0.1))
    with torch.no_grad():
        teacher_logits = distiller.teacher(x)
    assert torch.allclose(out["kd_loss"], kd_loss(out["logits"], teacher_logits, 4.0))


def test_teacher_parameters_and_batchnorm_buffers_are_bitwise_unchanged_after_training_steps():
    distiller = make_distiller(gradient_element=True)
    before = copy.deepcopy(distiller.teacher.state_dict())
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    distiller.train()
    for step in range(5):
        optimizer.zero_grad()
        distiller(*batch(step))["loss"].backward()
        optimizer.step()
    after = distiller.teacher.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert after["body.1.num_batches_tracked"] == before["body.1.num_batches_tracked"]


def test_gradients_reach_the_student_and_embedding_heads_and_never_the_teacher():
    distiller = make_distiller(config=v020_config(), gradient_element=True)
    distiller(*batch())["loss"].backward()
    for name, p in distiller.student.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for loss_name in ("crcd_feature", "crcd_gradient"):
        heads = getattr(distiller, loss_name)
        for name, p in heads.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{loss_name}.{name}"
    assert all(not p.requires_grad and p.grad is None for p in distiller.teacher.parameters())


def test_gradient_element_alone_trains_the_student_head_through_the_closed_form():
    distiller = make_distiller(gradient_element=True)
    distiller(*batch())["crcd_gradient_loss"].backward()
    assert distiller.student.fc.weight.grad.abs().sum() > 0
    assert distiller.student.body[0].weight.grad.abs().sum() > 0


def test_train_never_puts_the_teacher_in_train_mode():
    distiller = make_distiller()
    distiller.train()
    assert distiller.student.training and distiller.crcd_feature.training
    assert not any(m.training for m in distiller.teacher.modules())
    distiller.teacher.train()  # a user mistake: corrected on the next forward
    distiller(*batch())
    assert not distiller.teacher.training


def test_step_under_no_grad_runs_and_skips_the_gradient_element():
    distiller = make_distiller(gradient_element=True)
    x, y = batch()
    with torch.no_grad():
        out = distiller(x, y)
    assert out["crcd_gradient_loss"] == 0 and torch.isfinite(out["loss"])
    distiller.eval()
    with torch.inference_mode():
        out = distiller(x, y)
    assert out["crcd_gradient_loss"] == 0 and torch.isfinite(out["loss"])


def test_memory_bank_negatives_need_the_dataset_index():
    distiller = make_distiller(num_samples=100, crcd_options={"embed_dim": 16, "num_negatives": 20})
    assert distiller.crcd_feature.negatives == "bank"
    x, y = batch()
    with pytest.raises(ValueError, match="index"):
        distiller(x, y)
    out = distiller(x, y, index=torch.arange(BATCH))
    assert out["crcd_feature_loss"] > 0


def test_without_num_samples_the_losses_use_a_queue_and_no_index():
    distiller = make_distiller(gradient_element=True, crcd_options=None, queue_size=64)
    assert distiller.crcd_feature.negatives == "queue" and distiller.crcd_gradient.negatives == "queue"
    assert distiller.crcd_feature is not distiller.crcd_gradient
    assert distiller.crcd_feature.memory_teacher.size == 64


def test_step_schedule_turns_distillation_off_at_96_percent():
    schedule = DistillSchedule(total_steps=250, kind="step", until=0.96)
    assert schedule(0) == 1 and schedule(239) == 1 and schedule(240) == 0 and schedule(249) == 0
    distiller = make_distiller(config=v020_config(), schedule=DistillSchedule(100), gradient_element=True)
    x, y = batch()
    distiller.set_progress(95)
    assert distiller(x, y)["loss"] > distiller(x, y)["task_loss"]
    distiller.set_progress(96)
    out = distiller(x, y)
    assert torch.equal(out["loss"], out["task_loss"])  # gamma = 1


def test_once_the_weight_is_zero_for_good_the_teacher_and_crcd_terms_are_skipped():
    distiller = make_distiller(schedule=DistillSchedule(100), gradient_element=True)
    x, y = batch()
    distiller(x, y)  # builds the heads
    teacher_calls = []
    distiller.teacher.register_forward_hook(lambda *args: teacher_calls.append(1))
    distiller.set_progress(96)
    state = copy.deepcopy(distiller.crcd_state_dict())
    assert not distiller.schedule.distills()
    out = distiller(x, y)
    assert not teacher_calls
    assert out["kd_loss"] == 0 and out["crcd_feature_loss"] == 0 and out["crcd_gradient_loss"] == 0
    for name, value in distiller.crcd_state_dict().items():
        assert torch.equal(value, state[name]), name
    out["loss"].backward()
    assert distiller.student.fc.weight.grad is not None
    distiller.set_progress(95)  # back inside the distillation phase: the teacher runs again
    assert distiller(x, y)["kd_loss"] > 0 and teacher_calls


def test_linear_and_constant_schedules():
    linear = DistillSchedule(total_steps=100, kind="linear", start=0.5, until=0.9)
    assert [round(float(linear(t)), 4) for t in (0, 50, 70, 90, 99)] == [1.0, 1.0, 0.5, 0.0, 0.0]
    assert DistillSchedule(10, kind="constant")(10) == 1
    linear.set_progress(89)
    assert linear.distills()
    linear.set_progress(90)
    assert not linear.distills()
    constant = DistillSchedule(10, kind="constant")
    constant.set_progress(10)
    assert constant.distills()


def test_schedule_progress_resumes_from_a_checkpoint():
    distiller = make_distiller(schedule=DistillSchedule(100))
    distiller.set_progress(97)
    resumed = make_distiller(schedule=DistillSchedule(100))
    resumed.load_state_dict(distiller.state_dict())
    assert resumed.schedule.progress == 97 and resumed.schedule() == 0
    assert not resumed.schedule.distills()


def test_student_state_dict_is_only_the_student_and_crcd_state_is_separate():
    distiller = make_distiller(gradient_element=True)
    assert distiller.student_state_dict().keys() == TinyNet(6).state_dict().keys()
    crcd_keys = distiller.crcd_state_dict().keys()
    # The distiller's own warm-up counter is CRCD state too (it resumes with the heads and memories).
    assert crcd_keys and all(k.startswith(("crcd_feature.", "crcd_gradient.", "warmup_progress")) for k in crcd_keys)
    assert any("memory" in k for k in crcd_keys)


def test_linear_heads_build_the_losses_at_construction():
    distiller = make_distiller()
    assert distiller.built
    assert distiller.crcd_feature.student_dim == 6 and distiller.crcd_feature.teacher_dim == 12


def test_non_linear_heads_build_from_a_dry_run_without_touching_student_statistics():
    torch.manual_seed(0)
    student = MLPHeadNet(6)
    stats = copy.deepcopy(student.state_dict())
    distiller = CRCDDistiller(student, MLPHeadNet(12), "head", "head", **current_spelling(dict(
        gradient_element=True, crcd_options=SMALL_QUEUE, example_input=batch()[0])))
    assert distiller.built and distiller.crcd_gradient.student_dim == 6
    assert student.training
    assert all(torch.equal(stats[k], v) for k, v in student.state_dict().items())
    distiller(*batch())["loss"].backward()
    assert student.head[0].weight.grad.abs().sum() > 0


def test_non_linear_heads_without_example_input_build_on_the_first_forward(caplog):
    torch.manual_seed(0)
    distiller = CRCDDistiller(MLPHeadNet(6), MLPHeadNet(12), "head", "head", small_config())
    assert not distiller.built
    with caplog.at_level("WARNING"):
        out = distiller(*batch())
    assert distiller.built and out["crcd_feature_loss"] > 0
    assert "optimizer" in caplog.text


def test_student_wrapped_in_data_parallel_resolves_the_head():
    torch.manual_seed(0)
    student = nn.DataParallel(TinyNet(6))
    distiller = CRCDDistiller(student, TinyNet(12), config=small_config())
    assert distiller(*batch())["crcd_feature_loss"] > 0
    assert distiller.student_state_dict().keys() == TinyNet(6).state_dict().keys()


def _num_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_are_registered_once_and_keep_nothing_after_a_step_or_a_failing_forward():
    # 0.3: the hooks live as long as the distiller (registered at construction, never per step),
    # so a compiled student is not re-traced; what they capture is dropped after every forward.
    distiller = make_distiller(gradient_element=True)
    registered = (_num_hooks(distiller.student), _num_hooks(distiller.teacher))
    assert registered == (2, 2)
    for _ in range(3):
        distiller(*batch())
    assert (_num_hooks(distiller.student), _num_hooks(distiller.teacher)) == registered
    with pytest.raises(RuntimeError):
        distiller(torch.randn(BATCH, IN_DIM + 1), torch.zeros(BATCH, dtype=torch.long))
    assert (_num_hooks(distiller.student), _num_hooks(distiller.teacher)) == registered
    assert all(not capture.pop() for capture in (distiller._capture, distiller.teacher_side._capture))
    distiller.student(batch()[0])  # outside the distiller the hooks are disarmed: nothing is kept
    assert all(not capture.pop() for capture in (distiller._capture, distiller.teacher_side._capture))
    distiller.remove_hooks()
    assert _num_hooks(distiller.student) == 0 and _num_hooks(distiller.teacher) == 0


class DictOutputNet(TinyNet):
    def forward(self, x: torch.Tensor):
        return {"features": self.body(x), "logits": self.fc(self.body(x))}


def test_logits_come_from_dict_outputs_or_output_select():
    torch.manual_seed(0)
    distiller = CRCDDistiller(DictOutputNet(6), DictOutputNet(12), config=small_config())
    x, y = batch()
    out = distiller(x, y)
    assert torch.allclose(out["logits"], distiller.student.fc(distiller.student.body(x)))

    class TupleNet(TinyNet):
        def forward(self, x: torch.Tensor):
            return self.body(x), self.fc(self.body(x))

    with pytest.raises(TypeError, match="output_select"):
        CRCDDistiller(TupleNet(6), TupleNet(12), config=small_config())(x, y)
    selected = CRCDDistiller(TupleNet(6), TupleNet(12), config=small_config(), output_select=1)
    assert selected(x, y)["logits"].shape == (BATCH, NUM_CLASSES)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="fcc"):
        CRCDDistiller(TinyNet(6), TinyNet(12), "fcc")
    with pytest.raises(ValueError, match="alpha"), pytest.deprecated_call():
        CRCDDistiller(TinyNet(6), TinyNet(12), alpha=-1.0)  # the 0.2.0 keyword's own error
    with pytest.raises(TypeError, match="schedule"):
        CRCDDistiller(TinyNet(6), TinyNet(12), schedule=lambda step: 1.0)
    with pytest.raises(TypeError, match="student"):
        CRCDDistiller("resnet18", TinyNet(12))
    with pytest.raises(ValueError, match="different"):
        net = TinyNet(6)
        CRCDDistiller(net, net)
    with pytest.raises(ValueError, match="batch size"):
        make_distiller()(torch.randn(BATCH, IN_DIM), torch.zeros(BATCH + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="total_steps"):
        DistillSchedule(0)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_rss_does_not_grow_over_2000_training_steps():
    torch.manual_seed(0)
    distiller = make_distiller(gradient_element=True, crcd_options={"negatives": "batch", "embed_dim": 16})
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.01)
    x, y = batch()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        distiller(x, y)["loss"].backward()
        optimizer.step()

    for _ in range(100):
        step()
    start = _rss_mb()
    for _ in range(2000):
        step()
    growth = _rss_mb() - start
    assert growth < 8.0, f"RSS grew by {growth:.1f} MB over 2000 steps"


def test_teacher_transform_maps_the_input_the_teacher_sees_and_only_the_teachers():
    seen = {}
    distiller = make_distiller(teacher_transform=lambda x: x * 2.0 + 1.0)
    distiller.teacher.register_forward_pre_hook(lambda module, args: seen.setdefault("teacher", args[0]))
    distiller.student.register_forward_pre_hook(lambda module, args: seen.setdefault("student", args[0]))
    x, y = batch()
    distiller(x, y)
    assert torch.equal(seen["teacher"], x * 2.0 + 1.0)
    assert torch.equal(seen["student"], x)


def test_teacher_transform_that_is_a_module_moves_with_the_distiller():
    class Shift(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("shift", torch.ones(IN_DIM), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.shift

    distiller = make_distiller(teacher_transform=Shift()).to(torch.float64)
    assert distiller.teacher_transform.shift.dtype == torch.float64
    assert "teacher_transform.shift" not in distiller.crcd_state_dict()


def test_teacher_transform_that_is_not_callable_is_a_type_error():
    with pytest.raises(TypeError, match="teacher_transform"):
        make_distiller(teacher_transform="normalize")


# --- 0.3: configuration, one teacher path, compile, the integration contract ------------------------

from crcd_plugin.distiller import CRCDTrainableModule  # noqa: E402

SMALL_RELATION = RelationConfig(queue_size=32, embed_dim=16)


def new_distiller(config=None, **kwargs) -> CRCDDistiller:
    torch.manual_seed(0)
    config = config if config is not None else small_config()
    return CRCDDistiller(TinyNet(6), TinyNet(12), "fc", "fc", config, **kwargs)


def test_config_and_the_0_2_0_keywords_build_the_same_distiller_and_losses():
    with pytest.deprecated_call() as warned:
        torch.manual_seed(0)
        old = CRCDDistiller(TinyNet(6), TinyNet(12), alpha=0.5, gamma=2.0, gradient_element=True,
                            crcd_options=SMALL_QUEUE)
    assert any(re.search(r"alpha=\.\.\.\) is deprecated.*CRCDConfig\(kd_weight", str(w.message)) for w in warned)
    new = new_distiller(CRCDConfig(kd_weight=0.5, task_weight=2.0, gradient_element=True, relation=SMALL_RELATION))
    assert old.config == new.config
    x, y = batch()
    torch.manual_seed(1)
    expected = old(x, y)
    torch.manual_seed(1)
    got = new(x, y)
    for key in ("loss", "task_loss", "kd_loss", "crcd_feature_loss", "crcd_gradient_loss"):
        torch.testing.assert_close(got[key], expected[key])


@pytest.mark.parametrize(
    "keyword, value, field",
    [
        ("student_head", "fc", None), ("teacher_head", "fc", None), ("gamma", 1.0, "task_weight"),
        ("alpha", 0.9, "kd_weight"), ("beta", 1.0, "feature_weight"), ("kd_temperature", 4.0, "kd_temperature"),
        ("gradient_element", True, "gradient_element"), ("gradient_weight", 1.0, "gradient_weight"),
        ("label_smoothing", 0.1, "label_smoothing"), ("queue_size", 32, None), ("warmup_steps", 2, "warmup_steps"),
        ("crcd_options", {"head": "mlp", "teacher_head_grad": True}, None), ("preset", "reference", None),
        ("schedule", DistillSchedule(10), "schedule"),
    ],
)
def test_every_0_2_0_keyword_warns_naming_its_new_spelling(keyword, value, field):
    with pytest.warns(DeprecationWarning, match=rf"{keyword}.*deprecated.*use"):
        distiller = CRCDDistiller(TinyNet(6), TinyNet(12), **{keyword: value})
    if field is not None and keyword != "schedule":
        assert getattr(distiller.config, field) == value
    if keyword == "crcd_options":
        assert distiller.config.relation.embed_head == "mlp" and distiller.config.relation.train_teacher_embedding
    if keyword == "preset":
        assert distiller.config.relation == RelationConfig.reference()
    if keyword == "schedule":
        assert distiller.schedule is value and distiller.config.schedule == "step"


def test_schedule_kind_with_total_steps_replaces_a_distill_schedule():
    distiller = new_distiller(small_config(schedule="step", schedule_until=0.5), total_steps=4)
    distiller.set_progress(2)
    assert float(distiller.schedule()) == 0.0 and "schedule.progress" in distiller.crcd_state_dict()
    without_length = new_distiller(small_config(schedule="linear"))
    with pytest.raises(ValueError, match="total_steps"):
        without_length(*batch())
    without_length.set_total_steps(10)
    assert without_length(*batch())["loss"].isfinite()


class Shift(nn.Module):
    def forward(self, x):
        return x * 2.0 + 1.0


class DictNet(TinyNet):
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # keyword input, as transformers models take
        return super().forward(pixels)


@pytest.mark.parametrize("dict_batches", [False, True], ids=["tensor", "dict"])
def test_fill_memory_writes_the_teacher_rows_the_forward_path_writes(dict_batches):
    # 0.2.0 ran the teacher without teacher_transform here (rows off by up to 0.43) and rejected dicts.
    def make():
        torch.manual_seed(0)
        net = DictNet if dict_batches else TinyNet
        config = CRCDConfig(feature_weight=0.3, relation=RelationConfig(embed_dim=16, momentum=0.0),
                            gradient_element=True)
        transform = (lambda b: {"pixels": Shift()(b["pixels"])}) if dict_batches else Shift()
        return CRCDDistiller(net(6), net(12), "fc", "fc", config, num_samples=16, teacher_transform=transform).eval()

    x, y = batch()
    index = torch.arange(BATCH)
    inputs = {"pixels": x} if dict_batches else x
    filled, stepped = make(), make()
    filled.fill_memory([(inputs, y, index)])
    stepped.train()(inputs, y, index)  # a training step's first write of the same rows (momentum 0)
    for loss in ("crcd_feature", "crcd_gradient"):
        rows_filled = getattr(filled, loss).memory_teacher.weight[index]
        rows_stepped = getattr(stepped, loss).memory_teacher.weight[index]
        torch.testing.assert_close(rows_filled, rows_stepped)
    unshifted = make()
    unshifted.teacher_transform = None
    unshifted.fill_memory([(inputs if not dict_batches else {"pixels": x}, y, index)])
    assert not torch.allclose(unshifted.crcd_feature.memory_teacher.weight[index],
                              filled.crcd_feature.memory_teacher.weight[index])


def _counting_backend(calls):
    """A torch.compile backend that runs the graph eagerly and counts how often dynamo compiles."""
    torch._dynamo.reset()

    def backend(graph_module, example_inputs):
        calls.append(1)
        return graph_module.forward

    return backend


def test_a_compiled_student_does_not_recompile_after_warm_up():
    # Hooks registered once: nothing changes between steps for dynamo to guard on. The classifier
    # is not compiled (the gradient element differentiates through it: no double backward on CPU).
    calls: list = []
    counting_backend = _counting_backend(calls)
    student = TinyNet(6)
    student.body = torch.compile(student.body, backend=counting_backend)
    distiller = CRCDDistiller(student, TinyNet(12), "fc", "fc", small_config())
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.01)
    for step in range(22):
        distiller(*batch(step))["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1:
            warm = len(calls)
    assert warm >= 1 and len(calls) == warm
    torch._dynamo.reset()


def test_a_compiled_whole_student_with_its_classifier_hooks_does_not_recompile():
    calls: list = []
    counting_backend = _counting_backend(calls)
    compiled = torch.compile(TinyNet(6), backend=counting_backend)
    distiller = CRCDDistiller(compiled, TinyNet(12), "fc", "fc", small_config())
    for step in range(22):
        distiller(*batch(step))["loss"].backward()
        if step == 1:
            warm = len(calls)
    assert len(calls) == warm
    torch._dynamo.reset()


def test_trainable_module_holds_the_student_and_crcd_state_and_keeps_the_crcd_state_away_from_ddp():
    distiller = new_distiller(small_config(gradient_element=True))
    trainable = distiller.trainable_module
    assert isinstance(trainable, CRCDTrainableModule) and distiller.trainable_module is trainable
    assert set(trainable.crcd_state_dict()) == set(distiller.crcd_state_dict()) - {"warmup_progress"}
    names = {n for n, _ in trainable.named_parameters()} | {n for n, _ in trainable.named_buffers()}
    crcd = {n for n in names if not n.startswith("student.")}
    assert crcd and set(trainable._ddp_params_and_buffers_to_ignore) == crcd
    assert {id(p) for p in trainable.parameters()} == {id(p) for p in distiller.parameters() if p.requires_grad}


def test_crcd_parameters_are_built_late_into_the_trainable_module_too():
    torch.manual_seed(0)
    distiller = CRCDDistiller(MLPHeadNet(6), MLPHeadNet(12), "head", "head", small_config())
    trainable = distiller.trainable_module
    assert not trainable.crcd_children()
    distiller(*batch())
    assert "crcd_feature" in trainable.crcd_children()


def test_load_crcd_state_dict_checks_shapes_and_keys_before_loading_anything():
    distiller = new_distiller()
    distiller(*batch())
    state = distiller.crcd_state_dict()
    other = new_distiller(CRCDConfig(feature_weight=0.3, relation=SMALL_RELATION.replace(queue_size=16)))
    before = copy.deepcopy(other.crcd_state_dict())
    with pytest.raises(ValueError, match=r"'crcd_feature.memory_teacher.weight' has shape \(32, 16\), .*\(16, 16\)"):
        other.load_crcd_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in other.crcd_state_dict().items())
    with pytest.raises(ValueError, match="missing"):
        new_distiller(small_config(gradient_element=True)).load_crcd_state_dict(state)
    with pytest.raises(ValueError, match="model weights"):
        distiller.load_crcd_state_dict(distiller.state_dict())
    partial = {k: v for k, v in state.items() if not k.startswith("crcd_feature.memory")}
    fresh = new_distiller()
    fresh.load_crcd_state_dict(partial, strict=False)
    torch.testing.assert_close(fresh.crcd_feature.embed_student.proj.weight,
                               distiller.crcd_feature.embed_student.proj.weight)


def test_sync_gradients_and_no_sync_are_no_ops_without_a_process_group():
    distiller = new_distiller(v020_config(**SMALL_QUEUE)).sync_gradients_in_backward()
    distiller(*batch())["loss"].backward()
    before = [p.grad.clone() for _, p in distiller.crcd_named_parameters()]
    distiller.sync_gradients()
    with distiller.no_sync():
        pass
    assert all(torch.equal(a, p.grad) for a, (_, p) in zip(before, distiller.crcd_named_parameters()))


def test_capture_student_arms_the_distillers_own_hooks_for_a_forward_run_elsewhere():
    distiller = new_distiller()
    x, y = batch()
    hooks = _num_hooks(distiller.student)
    with distiller.capture_student() as captured:
        logits = distiller.student(x)
        feature, head_logits = captured["feature"], captured["head_logits"]
    assert _num_hooks(distiller.student) == hooks  # no hook added for it
    assert torch.equal(head_logits, logits) and feature.shape == (BATCH, 6)
    distiller.student(x)
    with distiller.capture_student() as captured:
        assert not captured  # disarmed outside the block: nothing kept
    terms = distiller.distill(feature, head_logits, logits, x, y, student_synced=True)
    terms["distill_loss"].backward()
    student = {id(p) for p in distiller.student.parameters()}
    heads = {id(p) for _, p in distiller.crcd_named_parameters()}
    # What sync_gradients averages: the heads only, the student's being its trainer's DDP to sync.
    assert {id(p) for p in distiller._unsynced_parameters()} == heads and not heads & student
    distiller.distill(feature.detach(), head_logits.detach(), logits.detach(), x, y)
    assert student <= {id(p) for p in distiller._unsynced_parameters()}


def test_set_backend_switches_built_losses_and_the_config_and_refuses_unknown_names():
    distiller = make_distiller(gradient_element=True)
    x, y = batch()
    eager = copy.deepcopy(distiller)
    distiller.set_backend("naive")
    assert distiller.crcd_feature.backend == distiller.crcd_gradient.backend == "naive"
    assert distiller.config.relation.backend == "naive"
    torch.manual_seed(1)
    expected = eager(x, y)["loss"].detach()
    torch.manual_seed(1)
    torch.testing.assert_close(distiller(x, y)["loss"].detach(), expected)  # same loss, another kernel
    with pytest.raises(ValueError, match="backend must be one of"):
        distiller.set_backend("fused")
    assert distiller.crcd_feature.backend == "naive"  # a refused name changes nothing

    lazy = CRCDDistiller(MLPHeadNet(6), MLPHeadNet(12), "head", "head", small_config())
    assert not lazy.built
    lazy.set_backend("naive")  # before the losses exist: the build takes it from the config
    lazy(x, y)
    assert lazy.crcd_feature.backend == "naive"

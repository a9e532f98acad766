"""Every row of docs/reliability.md's bad-input table: a clear error (or the documented behaviour),
and stored state (memories, queue, NCE constant, warm-up, schedule) unchanged after it."""

import pytest
import torch
from conftest import V020_RELATION
from torch import nn

from crcd_plugin import CRCDConfig, CRCDDistiller, CRCDLoss, RelationConfig

B, DS, DT, EMBED, N, CLASSES = 6, 5, 7, 8, 40, 3


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


class Net(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, width), nn.ReLU())
        self.fc = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class DictOutputNet(Net):
    """Returns a dict without a ``logits`` entry."""

    def forward(self, x: torch.Tensor) -> dict:
        return {"scores": super().forward(x)}


def features(batch: int = B, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, DS, generator=g), torch.randn(batch, DT, generator=g)


def trained_loss(negatives: str, **options) -> CRCDLoss:
    """A loss that has taken one training step, so memories, queue and Z hold real values."""
    torch.manual_seed(0)
    sizes = {"bank": {"num_negatives": 9}, "queue": {"queue_size": 12}, "batch": {}}[negatives]
    v020 = dict(V020_RELATION, embed_dim=EMBED)  # 0.2.0's settings: both sides' memories written
    config = RelationConfig(**v020, objective="nce", **sizes, **options)
    loss = CRCDLoss(DS, DT, config, negatives=negatives, num_samples=N if negatives == "bank" else None)
    loss(*features(seed=1), torch.arange(B) if negatives == "bank" else None)
    return loss


def trained_distiller(**options) -> CRCDDistiller:
    torch.manual_seed(0)
    config = CRCDConfig(gradient_element=True, warmup_steps=5, schedule="step",
                        relation=RelationConfig(embed_dim=EMBED, num_negatives=9))
    distiller = CRCDDistiller(Net(6), Net(10), num_samples=N, config=config, total_steps=10, **options)
    distiller.set_progress(3)
    distiller(torch.randn(B, 4), torch.randint(0, CLASSES, (B,)), torch.arange(B))
    return distiller


def snapshot(module: nn.Module) -> dict:
    return {key: value.clone() for key, value in module.state_dict().items()}


def assert_unchanged(module: nn.Module, before: dict) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed"


def assert_raises_and_keeps_state(module, error, match, call):
    before = snapshot(module)
    with pytest.raises(error, match=match):
        call()
    assert_unchanged(module, before)


# ---------------------------------------------------------------- CRCDLoss
@pytest.mark.parametrize("negatives", ["bank", "queue", "batch"])
@pytest.mark.parametrize(
    "student_shape, teacher_shape", [((B, DS + 1), (B, DT)), ((B, DS), (B, DT, 1)), ((B * DS,), (B, DT))]
)
def test_features_of_the_wrong_shape_raise_value_error(negatives, student_shape, teacher_shape):
    loss = trained_loss(negatives)
    index = torch.arange(B) if negatives == "bank" else None
    call = lambda: loss(torch.randn(student_shape), torch.randn(teacher_shape), index)  # noqa: E731
    assert_raises_and_keeps_state(loss, ValueError, r"must have shape \[B, ", call)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_features_that_are_not_floating_point_raise_type_error(dtype):
    loss = trained_loss("queue")
    student, teacher = features()
    call = lambda: loss(student.to(dtype), teacher)  # noqa: E731
    assert_raises_and_keeps_state(loss, TypeError, "student_feat must be a floating-point tensor", call)


def test_features_that_are_not_tensors_raise_type_error():
    loss = trained_loss("batch")
    student, teacher = features()
    call = lambda: loss(student, teacher.tolist())  # noqa: E731
    assert_raises_and_keeps_state(loss, TypeError, "teacher_feat must be a torch.Tensor", call)


def test_features_on_another_device_raise_value_error():
    loss = trained_loss("queue")
    student, teacher = features()
    call = lambda: loss(student.to("meta"), teacher)  # noqa: E731
    assert_raises_and_keeps_state(loss, ValueError, "student_feat is on meta but the loss is on cpu", call)


def test_index_on_another_device_raises_value_error():
    loss = trained_loss("bank")
    call = lambda: loss(*features(), torch.arange(B, device="meta"))  # noqa: E731
    assert_raises_and_keeps_state(loss, ValueError, "index is on meta", call)


@pytest.mark.parametrize("bad", [[0, 1, 2, 3, 4, N], [-1, 1, 2, 3, 4, 5]])
def test_bank_index_out_of_range_raises_value_error(bad):
    loss = trained_loss("bank")
    call = lambda: loss(*features(), torch.tensor(bad))  # noqa: E731
    assert_raises_and_keeps_state(loss, ValueError, rf"index must be in \[0, num_samples={N}\)", call)


def test_bank_without_index_raises_value_error():
    loss = trained_loss("bank")
    assert_raises_and_keeps_state(loss, ValueError, "needs index", lambda: loss(*features()))


def test_bank_index_of_float_dtype_raises_type_error():
    loss = trained_loss("bank")
    call = lambda: loss(*features(), torch.arange(B).float())  # noqa: E731
    assert_raises_and_keeps_state(loss, TypeError, "index must be an integer tensor", call)


def test_bank_index_of_the_wrong_length_raises_value_error():
    loss = trained_loss("bank")
    call = lambda: loss(*features(), torch.arange(B + 1))  # noqa: E731
    assert_raises_and_keeps_state(loss, ValueError, rf"index must have shape \[{B}\]", call)


@pytest.mark.parametrize("negatives", ["bank", "queue", "batch"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_features_raise_value_error_naming_the_rows(negatives, value):
    loss = trained_loss(negatives)
    student, teacher = features()
    student[2, 0] = value
    index = torch.arange(B) if negatives == "bank" else None
    call = lambda: loss(student, teacher, index)  # noqa: E731
    assert_raises_and_keeps_state(loss, ValueError, r"non-finite values .* rows \[2\]", call)


def test_non_finite_features_with_skip_leave_their_memory_rows_alone():
    loss = trained_loss("bank", on_nonfinite="skip")
    before = snapshot(loss)
    student, teacher = features()
    teacher[2] = float("nan")
    out = loss(student, teacher, torch.arange(B))
    assert not torch.isfinite(out)  # for GradScaler or the caller to skip
    for side in ("memory_student.weight", "memory_teacher.weight"):
        assert torch.equal(loss.state_dict()[side][2], before[side][2])
        assert not torch.equal(loss.state_dict()[side][3], before[side][3])  # finite rows are written


@pytest.mark.parametrize("negatives", ["bank", "queue", "batch"])
@pytest.mark.parametrize("batch", [0, 1])
def test_empty_batch_and_batch_of_one_raise_value_error(negatives, batch):
    loss = trained_loss(negatives)
    index = torch.arange(batch) if negatives == "bank" else None
    call = lambda: loss(*features(batch), index)  # noqa: E731
    assert_raises_and_keeps_state(loss, ValueError, f"at least two samples per batch, got a batch of {batch}", call)


def test_batch_larger_than_the_queue_raises_value_error():
    loss = trained_loss("queue")
    call = lambda: loss(*features(13))  # noqa: E731
    assert_raises_and_keeps_state(loss, ValueError, "does not fit a queue of queue_size=12", call)


def test_mismatched_student_and_teacher_batch_sizes_raise_value_error():
    loss = trained_loss("batch")
    student, _ = features(B)
    _, teacher = features(B - 1)
    assert_raises_and_keeps_state(loss, ValueError, "same batch size, got 6 and 5", lambda: loss(student, teacher))


def test_teacher_features_that_require_grad_are_treated_as_constants():
    loss = trained_loss("batch")
    student, teacher = features()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    loss(student, teacher).backward()
    assert student.grad is not None and teacher.grad is None


# ---------------------------------------------------------------- CRCDDistiller
def test_distiller_head_path_that_does_not_exist_raises_value_error():
    with pytest.raises(ValueError, match="fcc"):
        CRCDDistiller(Net(6), Net(10), student_classifier="fcc")


def test_distiller_model_output_without_logits_raises_type_error_naming_output_select():
    torch.manual_seed(0)
    distiller = CRCDDistiller(DictOutputNet(6), Net(10))
    call = lambda: distiller(torch.randn(B, 4), torch.randint(0, CLASSES, (B,)))  # noqa: E731
    assert_raises_and_keeps_state(distiller, TypeError, "without a .logits tensor; pass output_select=", call)


def test_distiller_target_of_another_batch_size_raises_value_error():
    distiller = trained_distiller()
    call = lambda: distiller(torch.randn(B, 4), torch.randint(0, CLASSES, (B + 1,)), torch.arange(B))  # noqa: E731
    assert_raises_and_keeps_state(distiller, ValueError, "target has batch size 7 but input has 6", call)


def test_distiller_bank_without_index_raises_value_error():
    distiller = trained_distiller()
    call = lambda: distiller(torch.randn(B, 4), torch.randint(0, CLASSES, (B,)))  # noqa: E731
    assert_raises_and_keeps_state(distiller, ValueError, "index .* is required with memory-bank negatives", call)


def test_distiller_bank_index_out_of_range_moves_neither_loss_nor_the_warmup():
    distiller = trained_distiller()
    call = lambda: distiller(torch.randn(B, 4), torch.randint(0, CLASSES, (B,)), torch.arange(B) + N)  # noqa: E731
    assert_raises_and_keeps_state(distiller, ValueError, "index must be in", call)


def test_distiller_non_finite_input_moves_neither_loss_nor_the_warmup():
    distiller = trained_distiller()
    x = torch.randn(B, 4)
    x[1] = float("nan")
    call = lambda: distiller(x, torch.randint(0, CLASSES, (B,)), torch.arange(B))  # noqa: E731
    crcd_before = {k: v.clone() for k, v in distiller.crcd_state_dict().items()}
    with pytest.raises(ValueError, match="non-finite"):
        call()
    after = distiller.crcd_state_dict()
    assert all(torch.equal(after[k], v) for k, v in crcd_before.items())


def test_distiller_batch_of_one_gives_ce_and_kd_only_and_moves_no_memory():
    distiller = trained_distiller()
    before = {k: v.clone() for k, v in distiller.crcd_state_dict().items()}
    out = distiller(torch.randn(1, 4), torch.randint(0, CLASSES, (1,)), torch.tensor([7]))
    assert out["crcd_feature_loss"] == 0 and out["crcd_gradient_loss"] == 0
    assert out["kd_loss"] > 0 and torch.isfinite(out["loss"])
    after = distiller.crcd_state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k != "warmup_progress")
    assert int(after["warmup_progress"]) == int(before["warmup_progress"]) + 1  # a step still counts


def test_distiller_input_on_another_device_raises_before_any_state_moves():
    distiller = trained_distiller()
    call = lambda: distiller(torch.randn(B, 4, device="meta"), torch.randint(0, CLASSES, (B,)), torch.arange(B))  # noqa: E731
    before = snapshot(distiller)
    with pytest.raises((RuntimeError, NotImplementedError, ValueError)):
        call()
    assert_unchanged(distiller, before)


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"preset": "paper"}, ValueError, "preset must be one of"),
        ({"config": CRCDConfig(relation=RelationConfig(negatives="queue"))}, ValueError, "needs queue_size"),
        ({"num_samples": 0}, ValueError, "num_samples must be a positive int"),
        ({"total_steps": -3}, ValueError, "total_steps must be a positive int"),
    ],
)
def test_distiller_bad_options_raise_at_construction(options, error, match):
    # 0.2.0's keywords (warmup_steps=, queue_size=, crcd_options=) are checked in test_deprecations.py.
    with pytest.raises(error, match=match):
        CRCDDistiller(Net(6), Net(10), **options)


def test_loss_unknown_preset_raises_value_error():
    with pytest.raises(ValueError, match="preset must be one of"):
        CRCDLoss(DS, DT, preset="paper")

"""CRCDDistiller.distill(): the distillation terms of a student forward that a trainer already ran.

Trainers that run the student themselves (Lightning's training_step) call it with the captured head
input and output; CRCDDistiller.forward is the student run, the task CE and the same call.
"""

import copy

import torch
import torch.nn.functional as F
from conftest import current_spelling
from torch import nn

from crcd_plugin import CRCDDistiller, DistillSchedule, FeatureCapture


class _Net(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, width), nn.ReLU())
        self.fc = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def _distiller(**kwargs) -> CRCDDistiller:
    torch.manual_seed(0)
    # 0.2.0's relation defaults (every sample an anchor: no random draw between the two runs compared).
    options = dict(gradient_element=True, queue_size=16,
                   crcd_options={"embed_dim": 8, "objective": "nce", "num_anchors": 500, "symmetric": True})
    options.update(kwargs)
    return CRCDDistiller(_Net(8), _Net(16), "fc", "fc", **current_spelling(options))


def _batches(steps: int = 3):
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(6, 12, generator=generator), torch.randint(0, 5, (6,), generator=generator)) for _ in range(steps)
    ]


def _run_distill(distiller: CRCDDistiller, x: torch.Tensor, y: torch.Tensor) -> dict:
    """What a trainer does: its own student forward under a capture, its own CE, then distill()."""
    with FeatureCapture(distiller.student) as capture:
        capture.add("fc", io="input", name="feature").add("fc", name="logits")
        logits = distiller.student(x)
        captured = capture.pop()
    task_loss = F.cross_entropy(logits, y)
    terms = distiller.distill(captured["feature"], captured["logits"], logits, x, y)
    return {"loss": distiller.config.task_weight * task_loss + terms["distill_loss"], "task_loss": task_loss, **terms}


def test_distill_after_the_trainers_own_student_forward_equals_forward_bitwise():
    reference, split = _distiller(), _distiller()
    for x, y in _batches():
        expected, got = reference(x, y), _run_distill(split, x, y)
        for name in ("loss", "task_loss", "kd_loss", "crcd_feature_loss", "crcd_gradient_loss"):
            assert torch.equal(expected[name], got[name]), name
        expected["loss"].backward()
        got["loss"].backward()
        for (name, a), b in zip(reference.named_parameters(), split.parameters()):
            assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.equal(a.grad, b.grad)), name
    for (name, a), b in zip(reference.crcd_state_dict().items(), split.crcd_state_dict().values()):
        assert torch.equal(a, b), name  # memories, NCE constants, progress moved alike


def test_distill_returns_the_weighted_sum_of_its_terms():
    distiller = _distiller(alpha=0.5, beta=2.0, gradient_weight=0.25, warmup_steps=0)
    x, y = _batches(1)[0]
    terms = _run_distill(distiller, x, y)
    expected = 0.5 * terms["kd_loss"] + 2.0 * terms["crcd_feature_loss"] + 0.25 * terms["crcd_gradient_loss"]
    assert sorted(terms) == ["crcd_feature_loss", "crcd_gradient_loss", "distill_loss", "kd_loss", "loss", "task_loss"]
    assert torch.allclose(terms["distill_loss"], expected)


def test_distill_skips_the_teacher_once_the_schedule_weight_is_zero_for_good():
    schedule = DistillSchedule(total_steps=10, kind="step", until=0.5)
    distiller = _distiller(schedule=schedule)
    calls = []
    distiller.teacher.register_forward_hook(lambda *args: calls.append(1))
    distiller.set_progress(5)
    before = copy.deepcopy(distiller.crcd_state_dict())
    x, y = _batches(1)[0]
    terms = _run_distill(distiller, x, y)
    assert calls == []
    assert all(float(terms[k]) == 0.0 for k in ("distill_loss", "kd_loss", "crcd_feature_loss", "crcd_gradient_loss"))
    assert all(torch.equal(before[k], v) for k, v in distiller.crcd_state_dict().items())

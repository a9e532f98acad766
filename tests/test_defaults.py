"""The defaults chosen by the defaults suite (benchmarks/defaults): what each promises, as behaviour."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crcd_plugin import CRCDDistiller, CRCDLoss
from crcd_plugin.config import CRCDConfig
from crcd_plugin.gradients import normalize_gradient_element


def _models(seed: int = 0):
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4))
    teacher = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
    return student, teacher


def test_default_kd_is_cross_entropy_against_the_mixed_target():
    """task_weight + kd_weight = 1 at T = 1: CE + KD has exactly the gradient of the CE against
    (1 - a) * onehot + a * p_teacher, so it can never take larger steps than CE alone."""
    config = CRCDConfig()
    assert config.kd_temperature == 1.0 and config.task_weight + config.kd_weight == pytest.approx(1.0)
    student, teacher = _models()
    distiller = CRCDDistiller(student, teacher, "2", "2", config=config.replace(feature_weight=0.0))
    x, y = torch.randn(8, 10), torch.randint(0, 4, (8,))
    distiller(x, y)["loss"].backward()
    got = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    with torch.no_grad():
        p_teacher = teacher(x).softmax(-1)
    mixed = config.task_weight * F.one_hot(y, 4).float() + config.kd_weight * p_teacher
    F.cross_entropy(student(x), mixed).backward()
    for a, p in zip(got, student.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_gradient_rows_of_a_confident_teacher_keep_their_directions():
    """dCE/df of a confident teacher has tiny norms; rescaled by the batch, rows of different
    samples stay apart after the embedding head instead of collapsing onto its bias."""
    torch.manual_seed(0)
    directions = F.normalize(torch.randn(16, 32), dim=-1)
    gradient = 1e-5 * directions * torch.rand(16, 1)  # norms of 1e-5 and below
    head = nn.Linear(32, 8)
    raw = F.normalize(head(gradient), dim=-1)
    scaled = F.normalize(head(normalize_gradient_element(gradient, "batch")), dim=-1)
    off_diagonal = ~torch.eye(16, dtype=torch.bool)
    assert (raw @ raw.T)[off_diagonal].min() > 0.999  # collapsed: every row is the bias direction
    assert (scaled @ scaled.T)[off_diagonal].min() < 0.9


def test_batch_rescaling_keeps_relative_norms_and_is_scale_free():
    g = torch.randn(6, 5)
    out = normalize_gradient_element(g, "batch")
    torch.testing.assert_close(out, normalize_gradient_element(1e-6 * g, "batch"))
    torch.testing.assert_close(out.norm(dim=-1) / out.norm(dim=-1)[0], g.norm(dim=-1) / g.norm(dim=-1)[0])
    assert out.pow(2).sum(-1).mean().item() == pytest.approx(1.0)
    torch.testing.assert_close(normalize_gradient_element(g, "none"), g)


def test_default_gradient_element_learns_below_chance():
    """On a toy problem the default gradient element's relation loss falls below its chance value,
    which the unscaled reference form never leaves (the suite measures the same on real data)."""
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    teacher = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
    y = teacher(x).argmax(-1)
    with torch.no_grad():
        teacher[2].weight.mul_(20.0)  # a confident teacher: gradient norms of 1e-5 and below

    def final_gradient_loss(normalization: str) -> float:
        torch.manual_seed(1)
        student = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4))
        config = CRCDConfig(gradient_element=True, gradient_normalization=normalization)
        distiller = CRCDDistiller(student, teacher, "2", "2", config=config)
        opt = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
        losses = []
        for _ in range(8):
            for idx in torch.randperm(256).split(64):
                out = distiller(x[idx], y[idx])
                opt.zero_grad()
                out["loss"].backward()
                opt.step()
                losses.append(float(out["crcd_gradient_loss"]))
        return sum(losses[-8:]) / 8

    sides = 2 if CRCDConfig().relation.symmetric else 1
    chance = sides * torch.log(torch.tensor(64.0)).item()  # in-batch InfoNCE over B = 64 candidates
    assert final_gradient_loss(CRCDConfig().gradient_normalization) < chance - 0.3
    assert final_gradient_loss("none") > chance - 0.05


def test_default_relation_work_grows_as_the_square_of_the_batch():
    """A fixed number of anchors: in-batch scores are B x A x B, never B x B x B."""
    anchors = CRCDConfig().relation.num_anchors
    assert anchors is not None and anchors <= 16
    calls = []
    loss = CRCDLoss(8, 8, CRCDConfig().relation)
    original = torch.randperm

    def recording(n, *args, **kwargs):
        calls.append(n)
        return original(n, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "randperm", recording)
        loss(torch.randn(128, 8), torch.randn(128, 8))
    assert calls == [128]  # one draw of A anchors among the B samples


def test_an_exploding_term_warns_once():
    student, teacher = _models()
    distiller = CRCDDistiller(student, teacher, "2", "2", config=CRCDConfig())
    distiller.monitor.check_every = 5
    x, y = torch.randn(16, 10), torch.randint(0, 4, (16,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(20):
            with torch.no_grad():
                if step == 1:
                    student[2].weight.mul_(1e4)  # logits far from the teacher's: KD explodes
            distiller(x, y)["loss"].backward()
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning) and "CRCD" in str(w.message)]
    assert len(runtime) >= 1
    assert len({str(w.message).split(" grew")[0] for w in runtime}) == len(runtime)  # once per term


def test_a_healthy_run_never_warns():
    student, teacher = _models()
    distiller = CRCDDistiller(student, teacher, "2", "2", config=CRCDConfig(gradient_element=True))
    distiller.monitor.check_every = 5
    opt = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=0.05)
    x, y = torch.randn(64, 10), torch.randint(0, 4, (64,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(30):
            out = distiller(x, y)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()

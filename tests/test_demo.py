"""The crcd-demo command, end to end on a tiny offline setting, plus the guarantees it relies on."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch

pytest.importorskip("mnist1d")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from crcd_plugin.demo.__main__ import main  # noqa: E402
from crcd_plugin.demo.data import DataConfig, load_dataset  # noqa: E402
from crcd_plugin.demo.models import TEACHER_ARCHS, build_teacher  # noqa: E402
from crcd_plugin.demo.train import (  # noqa: E402
    METHODS,
    MethodSettings,
    RunResult,
    TeacherOutputs,
    TrainConfig,
    train_student,
)
from crcd_plugin.demo.tune import _Search, format_tuning_table  # noqa: E402

TINY = ["--num-train", "400", "--num-test", "200", "--epochs", "2", "--seeds", "2", "--no-progress"]


@pytest.fixture(autouse=True)
def restore_denormals():
    """The demo flushes denormal floats (a process-wide setting, for speed); tests that run it in
    this process hand the process back as they found it (IEEE denormals), for the tests after."""
    yield
    torch.set_flush_denormal(False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data/teacher cache for the module: MNIST-1D generation takes seconds, so do it once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the demo must not open network connections")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_demo_writes_results_json_and_png_offline(tmp_path: Path, cache: Path, no_network: None) -> None:
    out = tmp_path / "out"
    assert main([*TINY, "--out", str(out), "--cache-dir", str(cache)]) == 0

    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "mnist1d"
    assert isinstance(results["teacher"]["arch"], str)
    assert 0.0 <= results["teacher"]["acc"] <= 1.0
    assert set(results["students"]) == set(METHODS)
    for row in results["students"].values():
        assert len(row["accs"]) == 2 and all(0.0 <= a <= 1.0 for a in row["accs"])
        assert row["mean"] == pytest.approx(sum(row["accs"]) / 2)
        assert row["std"] >= 0.0 and row["time_per_epoch_s"] > 0.0
    assert isinstance(results["config"], dict)
    assert {"crcd-crd", "crd-kd", "crcd-kd", "crcd_grad-kd"} <= set(results["paired_differences"])
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_teacher_is_cached_and_reused(tmp_path: Path, cache: Path) -> None:
    own = tmp_path / "cache"  # a teacher cache of its own; the generated data is copied over
    own.mkdir()
    for data in cache.glob("data-*.npz"):
        shutil.copy(data, own)
    cache = own
    args = [*TINY, "--methods", "ce", "--seeds", "1", "--cache-dir", str(cache)]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    teachers = sorted(cache.glob("teacher-*.pt"))
    assert len(teachers) == 1
    stamp = teachers[0].stat().st_mtime_ns
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert teachers[0].stat().st_mtime_ns == stamp
    acc = [json.loads((tmp_path / d / "results.json").read_text())["teacher"]["acc"] for d in "ab"]
    assert acc[0] == acc[1]


def test_methods_share_initialisation_and_data_order(cache: Path) -> None:
    # KD with weight 0 is CE: equal accuracy curves mean equal init and equal batches for a seed.
    data = load_dataset(DataConfig(num_train=300, num_test=100), cache)
    train = TrainConfig(epochs=2, batch_size=64)
    ce = train_student("ce", data, None, train, MethodSettings(), seed=3)
    fake = TeacherOutputs(torch.randn(300, 10), torch.randn(300, 8), torch.randn(10, 8), 0.0, "fake")
    kd = train_student("kd", data, fake, train, MethodSettings(alpha=0.0), seed=3)
    assert ce.curve == kd.curve


def test_unknown_method_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([*TINY, "--methods", "ce,dkd", "--out", str(tmp_path), "--no-cache"]) == 2
    assert "--methods" in capsys.readouterr().err


def test_strided_teacher_feature_is_the_flattened_conv_map() -> None:
    teacher = build_teacher("strided", input_dim=40, num_classes=10)
    assert teacher.features(torch.randn(3, 40)).shape == (3, 160)  # 32 channels x 5 positions
    assert 11_000 < sum(p.numel() for p in teacher.parameters()) < 13_000


def test_unknown_teacher_arch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="teacher arch"):
        build_teacher("resnet", input_dim=40, num_classes=10)
    assert "strided" in TEACHER_ARCHS and "maxpool" in TEACHER_ARCHS


def test_demo_runs_with_another_teacher(tmp_path: Path, cache: Path) -> None:
    out = tmp_path / "out"
    args = [*TINY, "--methods", "kd", "--seeds", "1", "--epochs", "1", "--teacher", "maxpool"]
    assert main([*args, "--out", str(out), "--cache-dir", str(cache)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert "maxpool" in results["teacher"]["arch"] and results["config"]["teacher"]["arch"] == "maxpool"


@pytest.fixture
def tiny_setup(cache: Path):
    data = load_dataset(DataConfig(num_train=300, num_test=100), cache)
    teacher = TeacherOutputs(torch.randn(300, 10), torch.randn(300, 8), torch.randn(10, 8), 0.0, "fake")
    return data, teacher


@pytest.mark.parametrize("negatives", ["bank", "queue", "batch"])
def test_relational_methods_train_with_each_negatives_mode(tiny_setup, negatives: str) -> None:
    data, teacher = tiny_setup
    settings = MethodSettings(negatives=negatives, num_negatives=16, queue_size=128)
    run = train_student("crcd_grad", data, teacher, TrainConfig(epochs=1, batch_size=64), settings, seed=0)
    assert 0.0 <= run.acc <= 1.0


def test_tuning_scores_are_stored_and_reused(tiny_setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, teacher = tiny_setup
    train, path = TrainConfig(epochs=1, batch_size=64), tmp_path / "scores.jsonl"
    first = _Search(data, teacher, train, (0, 1), progress=False, scores_path=path).score("s", "kd", MethodSettings())

    def refuse(*args, **kwargs):
        raise AssertionError("a stored score must not be trained again")

    monkeypatch.setattr("crcd_plugin.demo.train.train_student", refuse)
    search = _Search(data, teacher, train, (0, 1), progress=False, scores_path=path)
    assert search.score("s", "kd", MethodSettings()) == first
    assert "| s | kd | fake |" in format_tuning_table(search.log)


def test_tuning_leaves_out_candidates_over_the_time_budget(tiny_setup, monkeypatch: pytest.MonkeyPatch) -> None:
    data, teacher = tiny_setup
    search = _Search(data, teacher, TrainConfig(epochs=1, batch_size=64), (0,), progress=False)
    # The best-scoring candidate is over budget (beta 3: 2.5x crd); the others fit.
    ratios = {0.3: 1.5, 1.0: 1.9, 3.0: 2.5}
    monkeypatch.setattr(_Search, "cost_ratio", lambda self, settings, crd: ratios[settings.beta])
    scored = []

    def score(self, stage, method, settings, train=None):
        scored.append(settings.beta)
        return settings.beta

    monkeypatch.setattr(_Search, "score", score)
    candidates = [MethodSettings(beta=b) for b in ratios]
    winner = search.best("s", "crcd", candidates, budget=MethodSettings())
    assert winner.beta == 1.0 and 3.0 not in scored  # never trained
    assert "over the time budget: crcd_grad 2.50x crd" in format_tuning_table(search.log)
    assert search.best("s", "crcd", candidates).beta == 3.0  # without a budget it wins
    # Every candidate over budget: the cheapest is taken.
    ratios.update({0.3: 2.2, 1.0: 2.1})
    assert search.best("s", "crcd", candidates, budget=MethodSettings()).beta == 1.0


def test_cost_ratio_times_crcd_grad_against_crd(tiny_setup, monkeypatch: pytest.MonkeyPatch) -> None:
    data, teacher = tiny_setup
    search = _Search(data, teacher, TrainConfig(epochs=1, batch_size=64), (0,), progress=False)
    calls = []

    def fake_train(method, data, teacher, train, settings, seed):
        calls.append((method, train.epochs, settings.distill_until))
        seconds = {"crd": 1.0, "crcd_grad": 3.0}[method]
        return RunResult(method=method, seed=seed, acc=0.5, epoch_times=[seconds] * train.epochs)

    monkeypatch.setattr("crcd_plugin.demo.train.train_student", fake_train)
    ratio = search.cost_ratio(MethodSettings(distill_until=0.8), MethodSettings(distill_until=0.8))
    assert ratio == pytest.approx(3.0)
    assert {m for m, _, _ in calls} == {"crd", "crcd_grad"} and all(d == 1.0 for _, _, d in calls)
    before = len(calls)
    search.cost_ratio(MethodSettings(distill_until=0.8), MethodSettings(distill_until=0.8))
    assert len(calls) == before  # cached for the run

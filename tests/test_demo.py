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

from crcd_plugin.config import CRCDConfig, RelationConfig  # noqa: E402
from crcd_plugin.demo.__main__ import main  # noqa: E402
from crcd_plugin.demo.data import DataConfig, load_dataset  # noqa: E402
from crcd_plugin.demo.models import TEACHER_ARCHS, build_teacher  # noqa: E402
from crcd_plugin.demo.train import (  # noqa: E402
    METHODS,
    TeacherOutputs,
    TrainConfig,
    method_config,
    train_student,
)
from crcd_plugin.teacher import TensorTeacher  # noqa: E402

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
    ce = train_student("ce", data, None, train, CRCDConfig(), seed=3)
    kd = train_student("kd", data, _fake_teacher(300), train, CRCDConfig(kd_weight=0.0), seed=3)
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


def _fake_teacher(num_train: int) -> TeacherOutputs:
    head = torch.nn.Linear(8, 10).requires_grad_(False)
    features = torch.randn(num_train, 8)
    return TeacherOutputs(head(features), features, head, 0.0, "fake")


@pytest.fixture
def tiny_setup(cache: Path):
    data = load_dataset(DataConfig(num_train=300, num_test=100), cache)
    return data, _fake_teacher(300)


@pytest.mark.parametrize("negatives", ["bank", "queue", "batch"])
def test_relational_methods_train_with_each_negatives_mode(tiny_setup, negatives: str) -> None:
    data, teacher = tiny_setup
    relation = RelationConfig(negatives=negatives, num_negatives=None if negatives == "batch" else 16, queue_size=128)
    config = CRCDConfig(relation=relation)
    train = TrainConfig(epochs=1, batch_size=64)
    run = train_student("crcd_grad", data, teacher, train, config, seed=0, num_samples=negatives == "bank")
    assert 0.0 <= run.acc <= 1.0


def test_each_method_is_the_library_config_with_its_terms():
    base = CRCDConfig()
    assert method_config("ce", base) is None
    assert method_config("kd", base).feature_weight == 0.0 and not method_config("kd", base).gradient_element
    assert method_config("crd", base).relation.anchored is False
    assert method_config("crcd", base) == base.replace(gradient_element=False)
    assert method_config("crcd_grad", base).gradient_element is True
    with pytest.raises(ValueError, match="method"):
        method_config("dkd", base)


def test_the_demo_trains_through_the_distiller(tiny_setup, monkeypatch: pytest.MonkeyPatch) -> None:
    import crcd_plugin

    calls = []
    original = crcd_plugin.CRCDDistiller.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(crcd_plugin.CRCDDistiller, "forward", counting)
    data, teacher = tiny_setup
    train_student("crcd", data, teacher, TrainConfig(epochs=1, batch_size=100), CRCDConfig(), seed=0)
    assert len(calls) == 3  # one distiller step per batch of the epoch


def test_augment_gives_shifted_noisy_views_from_its_generator() -> None:
    from crcd_plugin.demo.data import augment

    x = torch.randn(16, 40)
    view = augment(x, torch.Generator().manual_seed(0), shift=2, noise=0.0)
    for row, original in zip(view, x):  # every row is the input rolled by at most 2 positions
        assert any(torch.equal(row, torch.roll(original, k)) for k in range(-2, 3))
    assert not torch.equal(view, x)
    noisy = augment(x, torch.Generator().manual_seed(0), noise=0.1)
    assert torch.equal(noisy, augment(x, torch.Generator().manual_seed(0), noise=0.1))  # seeded
    assert 0.05 < float((noisy - view).std()) < 0.15  # the same shifts, plus the noise


def test_augmented_runs_distil_from_the_live_teacher_on_each_view(tiny_setup, monkeypatch) -> None:
    from crcd_plugin.demo import train as demo_train

    data, teacher = tiny_setup

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.fc = torch.nn.Linear(40, 8), teacher.head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.body(x))

    teacher.model = Tiny()
    seen = []
    teacher.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    module, path = demo_train._teacher_for(teacher, TrainConfig(augment=True), None)
    assert module is teacher.model and path == "fc"
    module, path = demo_train._teacher_for(teacher, TrainConfig(augment=False), None)
    assert isinstance(module, TensorTeacher) and path is None

    views = []
    real_augment = demo_train.augment
    monkeypatch.setattr(demo_train, "augment", lambda x, g: views.append(real_augment(x, g)) or views[-1])
    run = train_student("kd", data, teacher, TrainConfig(epochs=1, batch_size=100, augment=True), CRCDConfig(),
                        seed=0)
    assert 0.0 <= run.acc <= 1.0 and len(views) == 3
    assert len(seen) == 3 and all(torch.equal(a, b) for a, b in zip(seen, views))  # the teacher saw each view


def test_teacher_cache_option_distils_from_a_cache_built_once(tmp_path: Path, cache: Path, monkeypatch) -> None:
    from crcd_plugin import TeacherCache
    from crcd_plugin.demo import config as demo_config
    from crcd_plugin.demo import experiment

    builds = []
    real_build = TeacherCache.build
    monkeypatch.setattr(TeacherCache, "build", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    runs = {}
    for name, extra in (("live", []), ("cached", ["--teacher-cache"]), ("again", ["--teacher-cache"])):
        out = tmp_path / name
        args = [*TINY, "--methods", "kd,crcd_grad", "--seeds", "1", *extra]
        assert main([*args, "--out", str(out), "--cache-dir", str(cache)]) == 0
        runs[name] = json.loads((out / "results.json").read_text())
    assert len(builds) == 1  # the second cached run opened the cache the first one built
    assert "TeacherCache" in runs["cached"]["config"]["teacher_outputs"]
    for method in ("kd", "crcd_grad"):  # un-augmented data: the cache is the teacher, up to float rounding
        assert runs["cached"]["students"][method]["accs"] == runs["again"]["students"][method]["accs"]
        live, cached = runs["live"]["students"][method]["accs"][0], runs["cached"]["students"][method]["accs"][0]
        assert abs(live - cached) <= 0.02

    data_cfg = DataConfig(num_train=400, num_test=200)
    data, teacher = experiment.prepare(data_cfg, demo_config.DEFAULT_TEACHER, cache, progress=False)
    feature, _, logits = experiment.teacher_cache(data, data_cfg, teacher, cache).rows(torch.arange(400))
    assert torch.allclose(feature, teacher.features, atol=1e-5) and torch.allclose(logits, teacher.logits, atol=1e-5)


def test_the_table_says_plainly_when_kd_does_not_beat_ce_or_crcd_does_not_beat_kd():
    from crcd_plugin.demo.report import verdict_lines

    students = {
        "ce": {"accs": [0.60, 0.62, 0.61], "seeds": [0, 1, 2]},
        "kd": {"accs": [0.58, 0.61, 0.60], "seeds": [0, 1, 2]},
        "crcd": {"accs": [0.63, 0.64, 0.62], "seeds": [0, 1, 2]},
    }
    lines = verdict_lines(students)
    assert lines[0].startswith("KD is NOT above CE (no teacher) in this run: -1.33")
    assert lines[1].startswith("KD + CRCD is above KD: +3.33")
    assert verdict_lines({"ce": students["ce"]}) == []  # nothing to compare

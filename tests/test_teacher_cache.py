"""Specification of TeacherCache (crcd_plugin.teacher_cache) and of CRCDDistiller reading one.

A distiller given a cache in the teacher's place gives the same losses and gradients as the live
teacher on deterministic inputs (teacher in eval mode, the same batches), never runs a teacher,
and refuses a cache that does not fit with an error before anything is written.
"""

import copy
import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import crcd_plugin.teacher_cache as teacher_cache_module
from crcd_plugin import CRCDConfig, CRCDDistiller, RelationConfig, TeacherCache

N, IN_DIM, CLASSES, BATCH = 24, 6, 3, 8


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


class Indexed(Dataset):
    """Fixed random inputs and labels, yielding ``(input, target, index)``."""

    def __init__(self, size: int = N, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, IN_DIM, generator=generator)
        self.y = torch.randint(0, CLASSES, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


class MLP(nn.Module):
    """An MLP with BatchNorm (eval mode matters) and an nn.Linear classifier ``fc``."""

    def __init__(self, width: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(IN_DIM, width), nn.BatchNorm1d(width), nn.ReLU())
        self.fc = nn.Linear(width, CLASSES)

    def forward(self, x):
        return self.fc(self.body(x))


class MLPHead(nn.Module):
    """A teacher whose classifier ``head`` is not an nn.Linear: the cache stores its gradient element."""

    def __init__(self, width: int = 10, seed: int = 2) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(IN_DIM, width), nn.Tanh())
        self.head = nn.Sequential(nn.Linear(width, 7), nn.Tanh(), nn.Linear(7, CLASSES))

    def forward(self, x):
        return self.head(self.body(x))


class ConvTeacher(nn.Module):
    """A CNN whose non-linear classifier sees a feature map [B, C, H, W] (pooled for the CRCD loss)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.Sequential(nn.Unflatten(1, (1, 2, 3)), nn.Conv2d(1, 4, 1), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Flatten(), nn.Linear(24, CLASSES))

    def forward(self, x):
        return self.head(self.body(x))


def trained(model: nn.Module) -> nn.Module:
    """Give BatchNorm non-trivial running statistics, then freeze the model in eval mode."""
    if any(isinstance(m, nn.BatchNorm1d) for m in model.modules()):
        model.train()
        with torch.no_grad():
            model(torch.randn(64, IN_DIM) * 2 + 1)
    return model.eval()


def loader(data=None, batch_size=BATCH, shuffle=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(data or Indexed(), batch_size=batch_size, shuffle=shuffle, generator=generator)


def config(negatives="bank", gradient_element=True, **changes) -> CRCDConfig:
    relation = RelationConfig(negatives=negatives, embed_dim=16, num_negatives=8 if negatives == "bank" else None)
    return CRCDConfig(**{"feature_weight": 0.3, "gradient_element": gradient_element, "relation": relation, **changes})


def build(tmp_path, teacher, classifier="fc", name="cache", **kwargs) -> TeacherCache:
    kwargs.setdefault("num_samples", N)
    return TeacherCache.build(tmp_path / name, teacher, loader(), classifier, **kwargs)


def distillers(teacher, cache, classifier="fc", negatives="bank", **kwargs):
    """A live and a cached distiller with identical students and CRCD heads."""
    cfg = kwargs.pop("cfg", None) or config(negatives)
    num_samples = N if negatives == "bank" else None
    student = MLP(8, seed=1)
    torch.manual_seed(5)
    live = CRCDDistiller(copy.deepcopy(student), teacher, "fc", classifier, cfg, num_samples=num_samples, **kwargs)
    torch.manual_seed(5)
    cached = CRCDDistiller(copy.deepcopy(student), cache, "fc", None, cfg, num_samples=num_samples, **kwargs)
    return live, cached


def run_steps(distiller, batches, steps=3):
    """A few SGD steps with a fixed RNG per step; returns each step's losses and gradients."""
    optimizer = torch.optim.SGD(distiller.trainable_module.parameters(), lr=0.1)
    trace = []
    for step, (x, y, index) in enumerate(batches[:steps]):
        torch.manual_seed(100 + step)  # the same negative draws on both paths
        out = distiller(x, y, index)
        optimizer.zero_grad()
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in distiller.trainable_module.named_parameters() if p.grad is not None}
        trace.append(({k: v.detach().clone() for k, v in out.items()}, grads))
        optimizer.step()
    return trace


def assert_traces(live, cached, exact=True):
    for (out_l, grad_l), (out_c, grad_c) in zip(live, cached):
        assert out_l.keys() == out_c.keys() and grad_l.keys() == grad_c.keys()
        for name in (*out_l, *grad_l):
            a, b = (out_l[name], out_c[name]) if name in out_l else (grad_l[name], grad_c[name])
            if exact:
                assert torch.equal(a, b), name
            else:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def state(distiller) -> dict:
    return {k: v.clone() for k, v in distiller.crcd_state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------- the cache itself
def test_fp32_rows_are_bitwise_what_the_live_teacher_gave(tmp_path):
    teacher = trained(MLP(12, seed=0))
    cache = build(tmp_path, teacher)
    x, y, index = next(iter(loader()))
    with torch.no_grad():
        feature = teacher.body(x)
        logits = teacher(x)
    rows = cache.rows(index)
    assert torch.equal(rows[0], feature) and torch.equal(rows[1], logits) and torch.equal(rows[2], logits)
    assert torch.equal(cache.targets(index), y)
    assert (len(cache), cache.feature_dim, cache.num_classes, cache.classifier) == (N, 12, CLASSES, "fc")
    assert cache.dtype == torch.float32 and cache.fingerprint == TeacherCache.fingerprint_of(teacher)
    assert cache.metadata["gradient"] == "linear" and cache.metadata["library_version"]


def test_build_restores_the_teachers_mode_and_reads_dict_batches(tmp_path):
    teacher = trained(MLP(12, seed=0)).train()
    data = Indexed()
    batches = [{"x": data.x[i:i + 8], "labels": data.y[i:i + 8], "index": torch.arange(i, i + 8)}
               for i in range(0, N, 8)]

    class KeywordTeacher(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    cache = TeacherCache.build(tmp_path / "c", KeywordTeacher(teacher), batches, "inner.fc", num_samples=N)
    assert teacher.training  # restored
    reference = build(tmp_path, trained(MLP(12, seed=0)))
    assert torch.equal(cache.rows(torch.arange(N))[0], reference.rows(torch.arange(N))[0])


def test_reopened_cache_reads_the_same_rows_and_checks_what_the_caller_expects(tmp_path):
    teacher = trained(MLP(12, seed=0))
    build(tmp_path, teacher)
    cache = TeacherCache.open(tmp_path / "cache", teacher=teacher, num_samples=N, classifier="fc")
    assert torch.equal(cache.rows(torch.arange(N))[0], build(tmp_path, teacher, name="again").rows(torch.arange(N))[0])


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_storage_halves_the_files_and_reads_close_float32(tmp_path, dtype, tolerance):
    teacher = trained(MLP(12, seed=0))
    full, half = build(tmp_path, teacher), build(tmp_path, teacher, name="half", dtype=dtype)
    assert half.dtype == dtype
    assert (half.path / "feature.bin").stat().st_size * 2 == (full.path / "feature.bin").stat().st_size
    for a, b in zip(full.rows(torch.arange(N)), half.rows(torch.arange(N))):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=tolerance, atol=tolerance)


def test_a_copied_or_pickled_cache_maps_the_same_files_instead_of_carrying_the_rows(tmp_path):
    cache = build(tmp_path, trained(MLP(12, seed=0)))
    state = pickle.dumps(cache)
    assert len(state) < 2000  # the path and metadata, not N rows
    for other in (pickle.loads(state), copy.deepcopy(cache)):
        assert other.path == cache.path and torch.equal(other.rows(torch.arange(N))[2], cache.rows(torch.arange(N))[2])


def test_fingerprint_depends_on_every_value_and_not_on_the_object():
    a, b = MLP(12, seed=0), MLP(12, seed=0)
    assert TeacherCache.fingerprint_of(a) == TeacherCache.fingerprint_of(b)
    with torch.no_grad():
        b.fc.bias[0] += 1e-6
    assert TeacherCache.fingerprint_of(a) != TeacherCache.fingerprint_of(b)


# ---------------------------------------------------------------------------------- cached == live
@pytest.mark.parametrize("negatives", ["bank", "batch"])
def test_cached_losses_and_gradients_equal_the_live_teachers_bitwise(tmp_path, negatives):
    teacher = trained(MLP(12, seed=0))
    live, cached = distillers(teacher, build(tmp_path, teacher), negatives=negatives)
    batches = list(loader(shuffle=False))
    assert_traces(run_steps(live, batches), run_steps(cached, batches), exact=True)
    assert_same_state(state(live), state(cached))


def test_a_non_linear_classifiers_stored_gradient_element_matches_the_live_one(tmp_path):
    teacher = trained(MLPHead())
    cache = build(tmp_path, teacher, "head")
    assert cache.metadata["gradient"] == "stored" and not (cache.path / "classifier.pt").exists()
    batches = list(loader())
    live, cached = distillers(teacher, cache, "head", example_input=batches[0][0])
    assert_traces(run_steps(live, batches), run_steps(cached, batches), exact=False)


def test_a_pooled_feature_map_and_its_gradient_element_match_the_live_path(tmp_path):
    teacher = trained(ConvTeacher())
    cache = build(tmp_path, teacher, "head", feature_pool="avg")
    assert cache.feature_dim == 4
    batches = list(loader())
    live, cached = distillers(teacher, cache, "head", feature_pool="avg", example_input=batches[0][0])
    assert_traces(run_steps(live, batches), run_steps(cached, batches), exact=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_caches_give_close_losses(tmp_path, dtype):
    teacher = trained(MLP(12, seed=0))
    live, cached = distillers(teacher, build(tmp_path, teacher, dtype=dtype))
    batches = list(loader())
    for (out_l, _), (out_c, _) in zip(run_steps(live, batches), run_steps(cached, batches)):
        for name in ("loss", "kd_loss", "crcd_feature_loss", "crcd_gradient_loss"):
            torch.testing.assert_close(out_c[name], out_l[name], rtol=5e-2, atol=5e-3)


def test_the_cached_distiller_holds_no_teacher_weights_and_runs_no_teacher(tmp_path):
    teacher = trained(MLP(12, seed=0))
    live, cached = distillers(teacher, build(tmp_path, teacher))
    del teacher  # not needed any more
    assert not [p for p in cached.teacher.parameters() if p.requires_grad]
    assert cached.crcd_state_dict().keys() == live.crcd_state_dict().keys()
    assert not any(key.startswith("teacher.") for key in cached.crcd_state_dict())
    cached.train()
    assert not cached.teacher.training
    x, y, index = next(iter(loader()))
    cached(x, y, index)["loss"].backward()


# ---------------------------------------------------------------------------------- warm memory
def test_fill_memory_from_a_loader_equals_the_live_fill(tmp_path):
    teacher = trained(MLP(12, seed=0))
    live, cached = distillers(teacher, build(tmp_path, teacher))
    live.fill_memory(loader())
    cached.fill_memory(loader())
    assert_same_state(state(live), state(cached))


def test_fill_memory_from_the_cache_alone_warms_every_teacher_row(tmp_path):
    teacher = trained(MLP(12, seed=0))
    cache = build(tmp_path, teacher)
    symmetric = config()  # a student-side memory to leave alone
    symmetric = symmetric.replace(relation=symmetric.relation.replace(symmetric=True))
    live, cached = distillers(teacher, cache, cfg=symmetric)
    before = state(cached)
    cached.fill_memory(batch_size=BATCH)  # no data, no student
    live.fill_memory(loader())
    after, reference = state(cached), state(live)
    for loss in ("crcd_feature", "crcd_gradient"):
        assert bool(after[f"{loss}.memory_teacher.seen"].all())
        torch.testing.assert_close(after[f"{loss}.memory_teacher.weight"],
                                   reference[f"{loss}.memory_teacher.weight"], rtol=1e-5, atol=1e-6)
        # The student side is not the cache's to write.
        assert torch.equal(after[f"{loss}.memory_student.weight"], before[f"{loss}.memory_student.weight"])
    # Uneven chunks: every row still written; the feature rows do not depend on the chunking (the
    # gradient rows do: gradient_normalization="batch" rescales each chunk by its own RMS).
    _, uneven = distillers(teacher, cache)
    uneven.fill_memory(batch_size=5)
    rows = state(uneven)
    assert bool(rows["crcd_gradient.memory_teacher.seen"].all())
    torch.testing.assert_close(rows["crcd_feature.memory_teacher.weight"],
                               reference["crcd_feature.memory_teacher.weight"], rtol=1e-5, atol=1e-6)


def test_fill_memory_without_a_loader_needs_a_cache():
    teacher = trained(MLP(12, seed=0))
    distiller = CRCDDistiller(MLP(8, seed=1), teacher, "fc", "fc", config(), num_samples=N)
    with pytest.raises(ValueError, match="reads a TeacherCache"):
        distiller.fill_memory()


# ---------------------------------------------------------------------------------- bad inputs
def test_a_cache_of_another_teacher_is_refused(tmp_path):
    build(tmp_path, trained(MLP(12, seed=0)))
    with pytest.raises(ValueError, match="teacher: the cache .* another teacher"):
        TeacherCache.open(tmp_path / "cache", teacher=MLP(12, seed=9))


def test_a_cache_of_another_classifier_is_refused(tmp_path):
    cache = build(tmp_path, trained(MLP(12, seed=0)))
    with pytest.raises(ValueError, match="classifier='body.0'.*'fc'"):
        TeacherCache.open(cache.path, classifier="body.0")
    with pytest.raises(ValueError, match="teacher_classifier='head'.*'fc'"):
        CRCDDistiller(MLP(8, seed=1), cache, "fc", "head", config(), num_samples=N)


def test_a_cache_of_another_dataset_size_is_refused(tmp_path):
    cache = build(tmp_path, trained(MLP(12, seed=0)))
    with pytest.raises(ValueError, match="num_samples=25 .* 24 rows"):
        TeacherCache.open(cache.path, num_samples=25)
    with pytest.raises(ValueError, match="num_samples=25 .* 24 rows"):
        CRCDDistiller(MLP(8, seed=1), cache, "fc", None, config(), num_samples=25)


@pytest.mark.parametrize("field, value", [("library_version", "0.0.1"), ("format_version", 99)])
def test_a_cache_of_another_library_or_format_version_must_be_rebuilt(tmp_path, field, value):
    cache = build(tmp_path, trained(MLP(12, seed=0)))
    metadata = json.loads((cache.path / "metadata.json").read_text())
    (cache.path / "metadata.json").write_text(json.dumps(dict(metadata, **{field: value})))
    with pytest.raises(ValueError, match="rebuild it with TeacherCache.build"):
        TeacherCache.open(cache.path)


def test_missing_unfinished_and_truncated_caches_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing or its build did not finish"):
        TeacherCache.open(tmp_path / "nowhere")
    cache = build(tmp_path, trained(MLP(12, seed=0)))
    feature = cache.path / "feature.bin"
    feature.write_bytes(feature.read_bytes()[:-4])
    with pytest.raises(ValueError, match=r"feature.bin' has 1148 bytes, expected 1152 .*truncated"):
        TeacherCache.open(cache.path)
    feature.unlink()
    with pytest.raises(FileNotFoundError, match="feature.bin' is missing"):
        TeacherCache.open(cache.path)
    (cache.path / "metadata.json").unlink()
    with pytest.raises(FileNotFoundError, match="no metadata.json"):
        TeacherCache.open(cache.path)


def test_a_build_that_misses_rows_or_fails_leaves_no_metadata_even_over_an_old_cache(tmp_path):
    teacher = trained(MLP(12, seed=0))
    build(tmp_path, teacher)  # a complete cache, about to be replaced
    partial = [batch for i, batch in enumerate(loader()) if i != 1]
    with pytest.raises(ValueError, match="8 of num_samples=24 rows were never written"):
        TeacherCache.build(tmp_path / "cache", teacher, partial, "fc", num_samples=N)
    assert not (tmp_path / "cache" / "metadata.json").exists()

    def failing():
        yield next(iter(loader()))
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        TeacherCache.build(tmp_path / "cache", teacher, failing(), "fc", num_samples=N)
    assert not (tmp_path / "cache" / "metadata.json").exists()
    with pytest.raises(ValueError, match=r"index must hold dataset indices in \[0, num_samples=10\)"):
        TeacherCache.build(tmp_path / "small", teacher, loader(), "fc", num_samples=10)
    assert not (tmp_path / "small" / "metadata.json").exists()


@pytest.mark.parametrize("dtype", [torch.float64, "int8"])
def test_a_storage_dtype_outside_the_three_is_refused(tmp_path, dtype):
    with pytest.raises(ValueError, match="dtype must be one of torch.float32, torch.float16, torch.bfloat16"):
        build(tmp_path, trained(MLP(12, seed=0)), dtype=dtype)


def test_bfloat16_rows_are_refused_on_a_device_without_bfloat16(tmp_path, monkeypatch):
    cache = build(tmp_path, trained(MLP(12, seed=0)), dtype=torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    with pytest.raises(ValueError, match="device cuda does not support bfloat16"):
        cache.rows(torch.arange(4), device="cuda")
    assert cache.rows(torch.arange(4), device="cpu")[0].dtype == torch.float32


def test_a_bad_index_or_batch_raises_before_any_crcd_state_moves(tmp_path):
    teacher = trained(MLP(12, seed=0))
    _, cached = distillers(teacher, build(tmp_path, teacher), cfg=config(warmup_steps=5))
    x, y, index = next(iter(loader()))
    cached(x, y, index)  # the first write, so that the state under test is not the initial one
    before = state(cached)
    bad_calls = {
        "out of range": ((x, y, index + N), ValueError, r"index must hold dataset indices in \[0, 24\)"),
        "negative": ((x, y, index - 1), ValueError, r"got values from -1"),
        "wrong length": ((x, y, index[:-1]), ValueError, r"index must be \[B=8\]"),
        "missing": ((x, y, None), ValueError, "index .* is required when the distiller reads a TeacherCache"),
        "float index": ((x, y, index.float()), TypeError, "integer tensor"),
        "other targets": ((x, (y + 1) % CLASSES, index), ValueError, "target differs from the teacher cache"),
    }
    for args, error, message in bad_calls.values():
        with pytest.raises(error, match=message):
            cached(*args)
        assert_same_state(before, state(cached))


def test_the_index_is_required_even_with_in_batch_negatives(tmp_path):
    teacher = trained(MLP(12, seed=0))
    _, cached = distillers(teacher, build(tmp_path, teacher), negatives="batch")
    x, y, index = next(iter(loader()))
    with pytest.raises(ValueError, match="index .* is required"):
        cached(x, y)
    cached(x, y, index)


def test_a_distiller_reading_a_cache_refuses_a_teacher_transform_and_other_label_smoothing(tmp_path):
    cache = build(tmp_path, trained(MLPHead()), "head", label_smoothing=0.1)
    with pytest.raises(ValueError, match="teacher_transform applies when a cache is built"):
        CRCDDistiller(MLP(8, seed=1), cache, "fc", None, config(label_smoothing=0.1), num_samples=N,
                      teacher_transform=lambda x: x)
    with pytest.raises(ValueError, match="config.label_smoothing=0.0 .* label_smoothing=0.1"):
        CRCDDistiller(MLP(8, seed=1), cache, "fc", None, config(), num_samples=N)
    CRCDDistiller(MLP(8, seed=1), cache, "fc", None, config(label_smoothing=0.1), num_samples=N)


def test_probability_targets_need_a_live_teacher_for_a_stored_gradient_element(tmp_path):
    x, y, index = next(iter(loader()))
    _, cached = distillers(trained(MLPHead()), build(tmp_path, trained(MLPHead()), "head"), "head", example_input=x)
    soft = torch.nn.functional.one_hot(y, CLASSES).float()
    before = state(cached)
    with pytest.raises(ValueError, match="probability targets"):
        cached(x, soft, index)
    assert_same_state(before, state(cached))


def test_the_library_version_check_reads_the_installed_version(tmp_path, monkeypatch):
    cache = build(tmp_path, trained(MLP(12, seed=0)))
    monkeypatch.setattr(teacher_cache_module, "_library_version", lambda: "9.9.9")
    with pytest.raises(ValueError, match="built by crcd-plugin .* this is crcd-plugin 9.9.9"):
        TeacherCache.open(cache.path)


# ---------------------------------------------------------------------------------- edges
class Loud(MLP):
    """A teacher whose logits pass float16's largest value (65504): fine in fp32, inf in fp16."""

    def __init__(self) -> None:
        super().__init__(12, seed=0)
        with torch.no_grad():
            self.fc.weight.mul_(1e6)


def test_a_half_precision_cache_refuses_rows_beyond_its_range_and_names_the_fix(tmp_path):
    teacher = trained(Loud())
    fixes = r"beyond the largest float16 .* dtype=torch\.bfloat16 .* dtype=torch\.float32"
    with pytest.raises(ValueError, match=fixes):
        build(tmp_path, teacher, dtype=torch.float16)
    assert not (tmp_path / "cache" / "metadata.json").exists()  # nothing to open: the build failed
    for dtype in (torch.bfloat16, torch.float32):  # the two fixes the message names
        cache = build(tmp_path, teacher, name=str(dtype), dtype=dtype)
        assert torch.isfinite(cache.rows(torch.arange(N))[2]).all()


def test_a_cache_refuses_a_teacher_that_gives_non_finite_rows(tmp_path):
    teacher = trained(MLP(12, seed=0))
    with torch.no_grad():
        teacher.fc.bias[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite head_logits values"):
        build(tmp_path, teacher)


def test_a_cached_distillers_state_dict_carries_no_classifier_and_refuses_another_caches(tmp_path):
    teacher_a, teacher_b = trained(MLP(12, seed=0)), trained(MLP(12, seed=4))
    _, on_a = distillers(teacher_a, build(tmp_path, teacher_a, name="a"))
    _, on_b = distillers(teacher_b, build(tmp_path, teacher_b, name="b"))
    x, y, index = next(iter(loader()))
    on_a(x, y, index)
    saved = on_a.state_dict()
    assert not any(key.startswith("teacher.") for key in saved)  # the classifier is the cache's
    before = {k: v.clone() for k, v in on_b.state_dict().items()}
    on_b.load_state_dict(saved)  # heads and memories only: B's rows still meet B's classifier
    assert torch.equal(on_b.teacher.classifier.weight, teacher_b.fc.weight)
    # A 0.3 checkpoint carried teacher.classifier.*: A's is refused by B, whole, and B's own loads.
    old = dict(saved, **{f"teacher.classifier.{k}": v for k, v in teacher_a.fc.state_dict().items()})
    on_b.load_state_dict(before)
    with pytest.raises(ValueError, match="'teacher.classifier.weight' is not the classifier of the teacher cache"):
        on_b.load_state_dict(old)
    assert_same_state(before, {k: v.clone() for k, v in on_b.state_dict().items()})
    on_a.load_state_dict(old)  # its own classifier: accepted
    assert torch.equal(on_a.teacher.classifier.weight, teacher_a.fc.weight)


def test_the_classifier_rebuilt_from_a_cache_still_moves_with_the_distiller(tmp_path):
    teacher = trained(MLP(12, seed=0))
    _, cached = distillers(teacher, build(tmp_path, teacher))
    cached.double()
    assert cached.teacher.classifier.weight.dtype == torch.float64


def test_a_refused_batch_leaves_the_students_batchnorm_statistics_unmoved(tmp_path):
    teacher = trained(MLP(12, seed=0))
    _, cached = distillers(teacher, build(tmp_path, teacher))
    x, y, index = next(iter(loader()))
    norm = cached.student.body[1]
    before = (norm.running_mean.clone(), norm.running_var.clone(), int(norm.num_batches_tracked))
    soft = torch.nn.functional.one_hot(y, CLASSES).float()
    for args in ((x, (y + 1) % CLASSES, index), (x, y, index + N), (x, y, None)):
        with pytest.raises(ValueError):
            cached(*args)
        assert torch.equal(norm.running_mean, before[0]) and torch.equal(norm.running_var, before[1])
        assert int(norm.num_batches_tracked) == before[2]
    _, stored = distillers(trained(MLPHead()), build(tmp_path, trained(MLPHead()), "head", name="head"), "head",
                           example_input=x)
    norm = stored.student.body[1]
    before = norm.running_mean.clone()
    with pytest.raises(ValueError, match="probability targets"):
        stored(x, soft, index)
    assert torch.equal(norm.running_mean, before)


def test_the_error_table_says_which_caches_refuse_another_label_smoothing(tmp_path):
    page = (Path(__file__).resolve().parents[1] / "docs" / "teacher-cache.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("|") and "label_smoothing" in line]
    assert rows and all("non-linear" in row or "stores the gradient element" in row for row in rows), rows
    # What the row says: a linear classifier's cache takes another label_smoothing, a stored element does not.
    teacher = trained(MLP(12, seed=0))
    CRCDDistiller(MLP(8, seed=1), build(tmp_path, teacher), "fc", None, config(label_smoothing=0.2), num_samples=N)
    stored = build(tmp_path, trained(MLPHead()), "head", name="head")
    with pytest.raises(ValueError, match="label_smoothing"):
        CRCDDistiller(MLP(8, seed=1), stored, "fc", None, config(label_smoothing=0.2), num_samples=N)

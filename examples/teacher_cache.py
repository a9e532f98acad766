"""Distil from a teacher cache: run the teacher once, then train the student without it.

The tiny problem of the distributed examples (generated data, ``toy_problem.py``). Step 1 builds a
``TeacherCache`` (one pass of the teacher over the indexed training set); step 2 opens it, with the
teacher gone, and distils into a smaller student. CPU, seconds:

    python examples/teacher_cache.py

The same build runs sharded under torchrun (each rank passes its DistributedSampler's share);
docs/teacher-cache.md shows it. The cache-specific lines are marked ``# cache``.
"""

import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from toy_problem import accuracy, make_data, mlp, train_teacher  # next to this script

from crcd_plugin import CRCDConfig, CRCDDistiller, TeacherCache

EPOCHS = 8


def build_cache(path: Path) -> None:
    """Train the teacher and write its cache; the teacher goes out of scope with this function."""
    data = make_data()
    teacher = train_teacher(data, torch.device("cpu"))
    print(f"teacher accuracy {accuracy(teacher, data, torch.device('cpu')):.3f}")
    start = time.perf_counter()
    # Deterministic inputs (no augmentation) and the teacher in eval mode: the cache is exact.
    cache = TeacherCache.build(  # cache
        path, teacher, DataLoader(data, batch_size=256), classifier="4", num_samples=len(data),
    )
    size = sum(file.stat().st_size for file in path.iterdir())
    print(f"teacher cache: {len(cache)} rows, feature dim {cache.feature_dim}, {cache.dtype}, "
          f"{size / 1024:.0f} KiB, built in {time.perf_counter() - start:.2f}s")


def distil(path: Path) -> None:
    """Distil into a smaller student from the cache alone: no teacher is created or loaded."""
    data = make_data()
    cache = TeacherCache.open(path, num_samples=len(data))  # cache: checks metadata, files, N
    torch.manual_seed(1)
    student = mlp(16)
    distiller = CRCDDistiller(  # cache: in the teacher's place; its classifier path comes with it
        student, cache, "4", None, CRCDConfig(gradient_element=True), num_samples=len(data), total_steps=EPOCHS
    )
    distiller.fill_memory()  # cache: the teacher-side memories warm from every cached row
    optimizer = torch.optim.SGD(distiller.trainable_module.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(data, batch_size=64, shuffle=True, drop_last=True)
    start = time.perf_counter()
    for epoch in range(EPOCHS):
        distiller.train()
        distiller.set_progress(epoch)
        for x, y, index in loader:
            loss = distiller(x, y, index)["loss"]  # cache: the teacher's rows are read by index
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    student.eval()
    print(f"student (16) distilled from the cache: accuracy {accuracy(student, data, torch.device('cpu')):.3f} "
          f"({EPOCHS} epochs in {time.perf_counter() - start:.1f}s)")


def main() -> None:
    torch.set_num_threads(1)  # tiny models: extra threads only add overhead
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "teacher-cache"
        build_cache(path)
        distil(path)


if __name__ == "__main__":
    main()

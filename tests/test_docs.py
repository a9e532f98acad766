"""Every code block in README.md and docs/ runs, or is an excerpt of a file that a test runs.

Conventions for writers (also in docs/contributing.md):

- A ```python block runs as part of its page: the page's python blocks run top to bottom in one
  namespace (like a notebook), which starts with the names in ``_fixtures()`` (tiny models, a
  loader, features), so snippets may use ``student``, ``teacher``, ``loader`` ... as a reader would.
- A block directly preceded by ``<!-- excerpt: PATH -->`` is not run: each of its non-blank,
  non-comment lines must occur, in order, in the file at PATH (an example or source file that
  tests run).
- A ```bash block: every command line must be the README's setup/test line (run by CI), or occur
  verbatim in a test file under tests/ (which runs it), or be preceded by
  ``<!-- not-run: REASON -->`` (GPU-only or long benchmark commands), which this test lists.
- Blocks in other languages (``text``, unlabelled output) are output, not code, and are not run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!--\s*(excerpt|not-run):\s*(.*?)\s*-->\s*\n)?```(\w*)[^\n]*\n(.*?)```", re.S)


def _blocks(page: Path):
    text = page.read_text()
    for match in BLOCK.finditer(text):
        marker, argument, language, body = match.groups()
        line = text.count("\n", 0, match.start(3)) + 1
        yield line, marker, argument, language, body


class _Net(nn.Module):
    """A tiny classifier with an ``fc`` head, like torchvision's ResNets."""

    def __init__(self, width: int, in_dim: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_dim, width), nn.ReLU())
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def _fixtures() -> dict:
    torch.manual_seed(0)
    x, y = torch.randn(64, 16), torch.randint(0, 10, (64,))
    train_set = TensorDataset(x, y, torch.arange(64))
    return {
        "torch": torch,
        "nn": nn,
        "student": _Net(8),
        "teacher": _Net(32),
        "train_set": train_set,
        "loader": DataLoader(train_set, batch_size=16, shuffle=True),
        "epochs": 2,
        "x": x[:16],
        "y": y[:16],
        "index": torch.arange(16),
        "student_dim": 8,
        "teacher_dim": 32,
        "student_feat": torch.randn(16, 8, requires_grad=True),
        "teacher_feat": torch.randn(16, 32),
        "task_loss": torch.zeros((), requires_grad=True),
    }


def _readme_commands() -> set:
    commands = set()
    for line in (ROOT / ".ci" / "run").read_text().splitlines():
        commands.update(part.strip() for part in line.split("&&"))
    return commands


def _command_lines(body: str):
    for line in body.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            yield line


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_python_blocks_run_or_are_excerpts(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that save files write here
    namespace = _fixtures()
    for line, marker, argument, language, body in _blocks(page):
        if language != "python":
            continue
        if marker == "excerpt":
            source = (ROOT / argument).read_text()
            position = 0
            for code in body.splitlines():
                code = code.strip()
                if not code or code.startswith("#"):
                    continue
                found = source.find(code, position)
                assert found >= 0, f"{page.name}:{line}: {code!r} is not in {argument} (after the previous line)"
                position = found + len(code)
            continue
        assert marker is None, f"{page.name}:{line}: python blocks run or are excerpts; not-run is for bash"
        try:
            exec(compile(body, f"{page.name}:{line}", "exec"), namespace)
        except Exception as error:  # noqa: BLE001 - re-raised with the page and line
            raise AssertionError(f"{page.name}:{line}: block failed: {error!r}") from error


def test_bash_commands_are_run_by_ci_or_a_test():
    tests_source = "\n".join(p.read_text() for p in (ROOT / "tests").glob("*.py"))
    ci = _readme_commands()
    missing, not_run = [], []
    for page in PAGES:
        for line, marker, argument, language, body in _blocks(page):
            if language not in ("bash", "sh", "shell"):
                continue
            for command in _command_lines(body):
                if marker == "not-run":
                    not_run.append(f"{page.name}:{line}: {command} ({argument})")
                    continue
                parts = [part.strip() for part in command.split("&&")]
                if all(part in ci or part in tests_source for part in parts):
                    continue
                missing.append(f"{page.name}:{line}: {command}")
    assert not missing, "documented commands no test runs:\n" + "\n".join(missing)
    if os.environ.get("CRCD_LIST_NOT_RUN"):
        print("\n".join(not_run))


# 0.2.0's README and docs, as released (commit 61c9035): their python blocks must still run on this
# version, through the deprecated spellings (which warn). Excerpts quote 0.2.0's example files.
# demo.md is left out: its blocks drive the demo's own modules (crcd_plugin.demo.*), the command's
# implementation rather than library API, which 0.3 rebuilt on CRCDDistiller (its tuning module and
# per-method settings are gone: the demo runs the library's CRCDConfig; the CHANGELOG says so).
OLD_PAGES = [page for page in sorted((ROOT / "tests" / "data" / "docs-0.2.0").glob("*.md")) if page.name != "demo.md"]


@pytest.mark.parametrize("page", OLD_PAGES, ids=[p.name for p in OLD_PAGES])
def test_python_blocks_of_0_2_0_still_run(page, tmp_path, monkeypatch):
    import warnings

    monkeypatch.chdir(tmp_path)
    namespace = _fixtures()
    ran = 0
    for line, marker, _argument, language, body in _blocks(page):
        if language != "python" or marker == "excerpt":
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                exec(compile(body, f"0.2.0/{page.name}:{line}", "exec"), namespace)
        except Exception as error:  # noqa: BLE001 - re-raised with the page and line
            raise AssertionError(f"0.2.0 {page.name}:{line}: block failed: {error!r}") from error
        ran += 1
    assert ran

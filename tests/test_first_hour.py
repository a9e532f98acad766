"""The traps of a first hour with the library say so: an optimizer that misses the CRCD heads, the
demo without its extra, and one spelling of the optimizer across the docs."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from crcd_plugin import CRCDConfig, CRCDDistiller
from crcd_plugin._head_watch import WATCH_STEPS, HeadsNotTrainedWarning

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")


def _mlp(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 4))


def _train(distiller: CRCDDistiller, optimizer: torch.optim.Optimizer, steps: int) -> list:
    generator = torch.Generator().manual_seed(0)
    distiller.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            x, y = torch.randn(16, 8, generator=generator), torch.randint(0, 4, (16,), generator=generator)
            out = distiller(x, y)
            optimizer.zero_grad()
            out["loss"].backward()
            optimizer.step()
    return [w for w in caught if issubclass(w.category, HeadsNotTrainedWarning)]


def _distiller(config: CRCDConfig = None) -> CRCDDistiller:
    torch.manual_seed(0)
    # The relation term on, so that there are heads to miss (the defaults have none).
    return CRCDDistiller(_mlp(16), _mlp(32), "2", "2", config or CRCDConfig(feature_weight=0.3))


def test_an_optimizer_on_the_student_alone_warns_once_naming_distiller_parameters():
    distiller = _distiller()
    heads = [param.detach().clone() for _, param in distiller.crcd_named_parameters()]
    caught = _train(distiller, torch.optim.SGD(distiller.student.parameters(), lr=0.05), 2 * WATCH_STEPS + 5)
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert "distiller.parameters()" in str(caught[0].message)
    assert all(torch.equal(before, param) for before, (_, param) in zip(heads, distiller.crcd_named_parameters()))


def test_an_optimizer_on_distiller_parameters_never_warns():
    distiller = _distiller()
    assert _train(distiller, torch.optim.SGD(distiller.parameters(), lr=0.05), WATCH_STEPS + 5) == []


def test_the_warning_waits_for_the_watch_steps():
    distiller = _distiller()
    assert _train(distiller, torch.optim.SGD(distiller.student.parameters(), lr=0.05), WATCH_STEPS) == []


def test_frozen_heads_and_kd_alone_do_not_warn():
    distiller = _distiller()
    for _, param in distiller.crcd_named_parameters():
        param.requires_grad_(False)  # frozen on purpose: not a missed optimizer
    assert _train(distiller, torch.optim.SGD(distiller.student.parameters(), lr=0.05), WATCH_STEPS + 5) == []
    kd_only = _distiller(CRCDConfig(feature_weight=0.0))
    assert _train(kd_only, torch.optim.SGD(kd_only.student.parameters(), lr=0.05), WATCH_STEPS + 5) == []


def test_crcd_demo_without_its_extra_names_the_pip_install():
    # numpy is what the demo's data generator imports first; None in sys.modules makes it missing.
    code = ("import sys; sys.modules['numpy'] = None; from crcd_plugin.demo.__main__ import main; "
            "sys.exit(main(['--quick']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 2, result.stderr[-2000:]
    assert 'pip install "crcd-plugin[demo]"' in result.stderr, result.stderr[-2000:]
    assert "numpy" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# The plain-loop pages write the optimizer exactly so; excerpts of examples keep their own lr.
OPTIMIZER = "torch.optim.SGD(distiller.parameters(), lr=0.05, momentum=0.9)"
PLAIN_LOOP_PAGES = ("README.md", "index.md", "distiller.md", "reliability.md")


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_the_docs_spell_the_distillers_optimizer_one_way(page):
    for number, line in enumerate(page.read_text().splitlines(), 1):
        where = f"{page.name}:{number}: {line.strip()}"
        if re.search(r"optim\.\w+\(", line) and "distiller" in line:
            assert re.search(r"optim\.\w+\(distiller\.parameters\(\)", line), where
            if page.name in PLAIN_LOOP_PAGES:
                assert OPTIMIZER in line, f"{where}: write {OPTIMIZER}"
        assert not re.search(r"optim\.\w+\((self\.)?student\.parameters\(\)", line), f"{where}: heads untrained"


def test_the_glossary_is_linked_from_the_readme_before_its_terms_are_used():
    readme = (ROOT / "README.md").read_text()
    glossary = (ROOT / "docs" / "glossary.md").read_text().lower()
    link = readme.index("(docs/glossary.md")
    for term in ("anchor", "memory-bank negatives", "InfoNCE", "first write", "gradient element"):
        assert term.lower() in glossary, term
        assert readme.find(term) > link or readme.find(term) == -1, f"README uses {term!r} before the glossary link"


def test_the_quick_subset_leaves_out_the_slow_tests_and_keeps_the_unit_tests():
    # The README's quick command, collected only: the wheel, DDP and example tests are left out.
    command = 'python -m pytest -m "not slow"'
    result = subprocess.run([sys.executable, "-m", "pytest", "-m", "not slow", "--collect-only",
                             "tests/test_release.py", "tests/test_distributed.py", "tests/test_docs.py"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    collected = result.stdout
    assert "test_python_blocks_run_or_are_excerpts" in collected and "test_the_version_has_a_dated" in collected
    assert "fresh_environment" not in collected and "test_distributed.py" not in collected, collected
    assert command in (ROOT / "README.md").read_text()

"""Every code block in README.md and docs/ runs as written, or is an excerpt of a file that a test runs.

Conventions for writers:

- A ```python block runs as part of its page: the page's python blocks run top to bottom in one
  fresh namespace (like a notebook). It starts with the placeholders that ``tests/doc_fixtures.py``
  lists for that page (``student``, ``teacher``, ``loader`` ...: what a reader already has) and
  nothing else: a snippet imports ``torch``, ``nn`` and ``crcd_plugin`` itself.
- A block directly preceded by ``<!-- excerpt: PATH -->`` is not run: each of its non-blank,
  non-comment lines must occur, in order, in the file at PATH (an example or source file that
  tests run).
- A block preceded by ``<!-- defaults -->`` runs like any other, and every keyword of its
  ``CRCDConfig(...)`` / ``RelationConfig(...)`` call must be that field's default
  (tests/test_doc_defaults.py).
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
from doc_fixtures import PAGES as FIXTURE_PAGES
from doc_fixtures import namespace_for, placeholders
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!--\s*(excerpt|not-run|defaults):?\s*(.*?)\s*-->\s*\n)?```(\w*)[^\n]*\n(.*?)```", re.S)


def _blocks(page: Path):
    text = page.read_text()
    for match in BLOCK.finditer(text):
        marker, argument, language, body = match.groups()
        line = text.count("\n", 0, match.start(3)) + 1
        yield line, marker, argument, language, body


def _fixtures_0_2_0() -> dict:
    """0.2.0's docs test started every page with torch, nn and every placeholder; its pages, as
    released, rely on that."""
    return {"torch": torch, "nn": nn, **placeholders()}


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
    namespace = namespace_for(page.name)
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
        assert marker != "not-run", f"{page.name}:{line}: python blocks run or are excerpts; not-run is for bash"
        try:
            exec(compile(body, f"{page.name}:{line}", "exec"), namespace)
        except Exception as error:  # noqa: BLE001 - re-raised with the page and line
            raise AssertionError(f"{page.name}:{line}: block failed: {error!r}") from error


def test_placeholders_are_a_readers_objects_never_modules_or_library_names():
    import types

    import crcd_plugin

    # The public names (a submodule such as crcd_plugin.teacher is not one: `teacher` stays a placeholder).
    library = set(crcd_plugin.__all__)
    for name, value in placeholders().items():
        assert not isinstance(value, types.ModuleType), name
        assert name not in library and name not in ("torch", "nn", "F"), name
        assert not type(value).__module__.startswith("crcd_plugin"), name
    pages = {page.name for page in PAGES}
    assert set(FIXTURE_PAGES) <= pages, set(FIXTURE_PAGES) - pages
    for page, names in FIXTURE_PAGES.items():
        assert set(names) <= set(placeholders()), (page, set(names) - set(placeholders()))


def test_a_snippet_sees_no_name_it_did_not_define_or_import(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("```python\nx = torch.zeros(1)\n```\n")
    with pytest.raises(AssertionError, match="NameError"):
        test_python_blocks_run_or_are_excerpts(page, tmp_path, monkeypatch)


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
    namespace = _fixtures_0_2_0()
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

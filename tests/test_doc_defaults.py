"""Every default that README.md or docs/ states is the code's default.

The expected values are read from the code on each run (the dataclass fields of ``CRCDConfig`` and
``RelationConfig``, the signatures of the public callables), never written here, so the pages
follow whatever defaults the code has. What counts as a stated default:

- a call in a ```text (or unlabelled) block, where the pages write signatures: each keyword
  of ``CRCDConfig(...)``, ``DistillSchedule(...)``, ``CRCDDistiller(...)`` ... is that parameter's
  default, and names a parameter that exists;
- a signature in inline code (``MemoryBank(num_samples, dim, momentum=0.5)``: positional arguments
  written as the parameters' own names, then keywords);
- a block marked ``<!-- defaults -->``, or a python call that lists most (3/4) of the fields of
  ``CRCDConfig`` / ``RelationConfig``: it lists every field, each at its default (a listing that
  sets options on purpose writes only those);
- a code line whose comment says ``# the defaults`` (or ``# default``);
- prose that writes ``default `name=value` ``, ``default (`name=value`)``, ``name=value` (default``,
  ```name=value` by default`` or ```name=value` is the default`` for a field of ``CRCDConfig`` or
  ``RelationConfig``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Tuple

import pytest
import torch

import crcd_plugin
from crcd_plugin import CRCDConfig, RelationConfig, functional
from crcd_plugin.teacher_cache import TeacherCache

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!--\s*(excerpt|not-run|defaults):?\s*(.*?)\s*-->\s*\n)?```(\w*)[^\n]*\n(.*?)```", re.S)
CONFIGS = {"CRCDConfig": CRCDConfig, "RelationConfig": RelationConfig}
MISSING = object()


def _documented_callables() -> Dict[str, Callable]:
    """Names the pages write signatures of -> the callable whose defaults they must show."""
    names: Dict[str, Callable] = {name: getattr(crcd_plugin, name) for name in crcd_plugin.__all__
                                  if callable(getattr(crcd_plugin, name)) and not name.startswith("_")}
    names.update({name: getattr(functional, name) for name in dir(functional)
                  if not name.startswith("_") and inspect.isfunction(getattr(functional, name))
                  and getattr(functional, name).__module__ == functional.__name__})
    names.update({"TeacherCache.build": TeacherCache.build, "TeacherCache.open": TeacherCache.open})
    return names


def defaults_of(target: Callable) -> Dict[str, Any]:
    """Parameter -> default (``MISSING`` for a required one), from the code."""
    if dataclasses.is_dataclass(target):
        values = {}
        for field in dataclasses.fields(target):
            if field.default is not dataclasses.MISSING:
                values[field.name] = field.default
            elif field.default_factory is not dataclasses.MISSING:
                values[field.name] = field.default_factory()
            else:
                values[field.name] = MISSING
        return values
    return {
        name: MISSING if parameter.default is inspect.Parameter.empty else parameter.default
        for name, parameter in inspect.signature(target).parameters.items()
        if parameter.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        and name not in ("self", "cls")
    }


CALLABLES = _documented_callables()
CALL_NAMES = sorted(CALLABLES, key=len, reverse=True)
CALL_START = re.compile(r"(?<![\w.])(" + "|".join(re.escape(name) for name in CALL_NAMES) + r")\(")
VALUE_NAMES = {**CONFIGS, "torch": torch, "None": None, "True": True, "False": False}


def _value(node: ast.expr) -> Any:
    return eval(compile(ast.Expression(node), "<doc>", "eval"), dict(VALUE_NAMES))  # noqa: S307 - page text


def _calls(text: str) -> Iterator[Tuple[str, int, ast.Call]]:
    """Each ``Known(...)`` call in ``text``, parsed (a signature's bare ``*`` and ``/`` removed)."""
    for match in CALL_START.finditer(text):
        depth, end = 0, None
        for position in range(match.end() - 1, len(text)):
            depth += {"(": 1, ")": -1}.get(text[position], 0)
            if depth == 0:
                end = position + 1
                break
        if end is None:
            continue
        source = re.sub(r"(?<=[(,])\s*[*/]\s*(,|(?=\)))", "", text[match.start():end]).replace(
            match.group(1), "_call", 1)
        source = re.sub(r"#[^\n]*", "", source)
        try:
            node = ast.parse(source, mode="eval").body
        except SyntaxError:
            continue
        if isinstance(node, ast.Call):
            yield match.group(1), match.start(), node


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _check_keywords(where: str, name: str, call: ast.Call, problems: list, *, complete: bool = False) -> None:
    expected = defaults_of(CALLABLES[name])
    given = set()
    for keyword in call.keywords:
        if keyword.arg is None:
            continue
        given.add(keyword.arg)
        if keyword.arg not in expected:
            problems.append(f"{where}: {name}({keyword.arg}=...) names no parameter of {name}")
            continue
        try:
            value = _value(keyword.value)
        except Exception:  # noqa: BLE001 - a placeholder such as `N`: not a stated value
            continue
        if expected[keyword.arg] is MISSING or value != expected[keyword.arg]:
            shown = "(required)" if expected[keyword.arg] is MISSING else repr(expected[keyword.arg])
            problems.append(f"{where}: {name}({keyword.arg}={ast.unparse(keyword.value)}), but the default is {shown}")
    if complete:
        missing = sorted(set(expected) - given)
        if missing:
            problems.append(f"{where}: {name}(...) is marked as the defaults but leaves out {missing}")


def _is_signature(name: str, call: ast.Call) -> bool:
    """Positional arguments that are the parameters' own names, in order, then keywords."""
    parameters = list(defaults_of(CALLABLES[name]))
    if not call.args or not call.keywords:
        return False
    names = [arg.id if isinstance(arg, ast.Name) else None for arg in call.args]
    return names == parameters[: len(names)]


def _prose(text: str) -> str:
    """The page without its code blocks (same length, so offsets give line numbers)."""
    return BLOCK.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


FIELD_OWNERS = {}
for _owner, _cls in CONFIGS.items():
    for _name in defaults_of(_cls):
        FIELD_OWNERS.setdefault(_name, []).append(_owner)
PROSE_DEFAULTS = [
    re.compile(r"[Dd]efault(?:s| is| of)?:?\s+\(?`(\w+)=([^`]+)`"),
    re.compile(r"`(\w+)=([^`]+)`\s+\((?:the\s+)?default\b"),
    re.compile(r"`(\w+)=([^`]+)`\s+(?:by default|is the default)\b"),
]
DEFAULT_COMMENT = re.compile(r"#\s*(?:the\s+|library's\s+)?defaults?\b")


def stated_default_problems(page: Path) -> list:
    text = page.read_text()
    problems: list = []
    for match in BLOCK.finditer(text):
        marker, _argument, language, body = match.groups()
        start = match.start(4)
        if marker == "defaults":
            found = False
            for name, offset, call in _calls(body):
                if name in CONFIGS:
                    found = True
                    _check_keywords(f"{page.name}:{_line(text, start + offset)}", name, call, problems, complete=True)
            if not found:
                problems.append(f"{page.name}:{_line(text, start)}: a defaults block without CRCDConfig/RelationConfig")
        elif language in ("", "text"):
            for name, offset, call in _calls(body):
                _check_keywords(f"{page.name}:{_line(text, start + offset)}", name, call, problems)
        elif language == "python":
            for name, offset, call in _calls(body):
                listed = {keyword.arg for keyword in call.keywords} & set(defaults_of(CALLABLES[name]))
                if name in CONFIGS and len(listed) >= 0.75 * len(defaults_of(CONFIGS[name])):
                    _check_keywords(f"{page.name}:{_line(text, start + offset)}: a listing of most fields", name, call,
                                    problems, complete=True)
            for number, code_line in enumerate(body.splitlines()):
                comment = code_line.partition("#")[2]
                if not comment or not DEFAULT_COMMENT.search("#" + comment):
                    continue
                for name, _offset, call in _calls(code_line):
                    if name in CONFIGS:
                        _check_keywords(f"{page.name}:{_line(text, start) + number}", name, call, problems)
    prose = _prose(text)
    for code in re.finditer(r"`([^`]+)`", prose):
        for name, _offset, call in _calls(code.group(1)):
            if _is_signature(name, call):
                _check_keywords(f"{page.name}:{_line(text, code.start())}", name, call, problems)
    flat = re.sub(r"\s+", " ", prose)
    for pattern in PROSE_DEFAULTS:
        for match in pattern.finditer(flat):
            field, written = match.groups()
            for owner in FIELD_OWNERS.get(field, []):
                try:
                    value = _value(ast.parse(written, mode="eval").body)
                except Exception:  # noqa: BLE001 - not a literal
                    continue
                expected = defaults_of(CONFIGS[owner])[field]
                if value != expected:
                    problems.append(f"{page.name}: '{match.group(0)}', but {owner}().{field} is {expected!r}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_default_a_page_states_is_the_codes_default(page):
    problems = stated_default_problems(page)
    assert not problems, "defaults the page states that the code does not have:\n" + "\n".join(problems)


def test_the_api_page_lists_every_relation_option_at_its_default():
    text = (ROOT / "docs" / "api.md").read_text()
    marked = [body for marker, _a, _l, body in BLOCK.findall(text) if marker == "defaults"]
    assert any("RelationConfig(" in body for body in marked)


def test_a_stale_default_in_a_page_is_caught(tmp_path):
    field = dataclasses.fields(CRCDConfig)[1]  # any field: the check must not depend on which
    stale = float(getattr(CRCDConfig(), field.name)) + 0.25
    page = tmp_path / "page.md"
    page.write_text(
        f"The default `{field.name}={stale}` is wrong.\n\n"
        f"```text\nCRCDConfig({field.name}={stale})\n```\n\n"
        f"<!-- defaults -->\n```python\nRelationConfig(embed_dim={RelationConfig().embed_dim + 1})\n```\n\n"
        "```python\nconfig = CRCDConfig(schedule=\"step\")    # the defaults\n```\n\n"
        "Inline: `DistillSchedule(total_steps, kind=\"linear\")`.\n"
    )
    problems = stated_default_problems(page)
    assert sum(f"{field.name}=" in p for p in problems) == 2, problems
    assert any("RelationConfig(embed_dim=" in p for p in problems), problems
    assert any("leaves out" in p for p in problems), problems
    assert any("CRCDConfig(schedule=" in p for p in problems), problems
    assert any("DistillSchedule(kind=" in p for p in problems), problems


def test_the_current_defaults_written_out_pass(tmp_path):
    relation = RelationConfig()
    listing = ", ".join(f"{f.name}={getattr(relation, f.name)!r}" for f in dataclasses.fields(RelationConfig))
    config = CRCDConfig()
    page = tmp_path / "page.md"
    page.write_text(
        f"<!-- defaults -->\n```python\nRelationConfig({listing})\n```\n\n"
        f"The default `kd_weight={config.kd_weight!r}` and `schedule={config.schedule!r}` (default).\n"
    )
    assert stated_default_problems(page) == []

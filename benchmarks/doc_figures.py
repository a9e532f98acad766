"""Rerun the examples whose accuracies the docs quote, and compare what they print with the pages.

    python benchmarks/doc_figures.py                 # every example below (a few minutes on CPU)
    python benchmarks/doc_figures.py lightning timm  # some of them

Each entry names the page, the command the page prints and how to read the figures from the page
and from the command's output. A figure is compared at the precision the page quotes it. Exit
status 1 if any page quotes a figure its command no longer prints. The Lightning example is cheap
enough (about 15 s) that tests/test_lightning_examples.py checks it on every test run too; the
others take minutes and are checked by running this script before a release.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, NamedTuple

ROOT = Path(__file__).resolve().parents[1]


def _flat(page: str) -> str:
    return " ".join((ROOT / "docs" / page).read_text().split())


def _hf_quoted(script: str) -> Callable[[], Dict[str, str]]:
    def read() -> Dict[str, str]:
        cells = r"` \|[^|]*\|([^|]*)\|([^|]*)\|([^|]*)\|"  # wall time, then teacher, CE, CRCD
        row = re.search(r"\| `" + re.escape(script) + cells, _flat("huggingface.md"))
        assert row, f"docs/huggingface.md has no table row for {script}"
        teacher, ce, crcd = (cell.strip(" *") for cell in row.groups())
        return {"teacher": teacher, "student CE": ce, "student CRCD": crcd}

    return read


def _hf_printed(stdout: str) -> Dict[str, str]:
    line = re.search(r"teacher accuracy (\S+) \| student CE (\S+) \| student CRCD (\S+)", stdout)
    assert line, stdout[-2000:]
    return dict(zip(("teacher", "student CE", "student CRCD"), line.groups()))


def _lightning_quoted() -> Dict[str, str]:
    names = r"(teacher|student \(CE alone\)|student \(CRCD\))"
    return dict(re.findall(names + r" accuracy (\d\.\d+)", _flat("lightning.md")))


def _lightning_printed(stdout: str) -> Dict[str, str]:
    return dict(re.findall(r"^(.+) accuracy (\d\.\d+)$", stdout, re.M))


def _timm_quoted() -> Dict[str, str]:
    match = re.search(r"teacher (\d\.\d+), student (\d\.\d+) validation accuracy", _flat("timm.md"))
    assert match, "docs/timm.md quotes no 'teacher X, student Y validation accuracy'"
    return {"teacher": match.group(1), "student": match.group(2)}


def _timm_printed(stdout: str) -> Dict[str, str]:
    teacher = re.search(r"^teacher \S+ val_acc=(\d\.\d+)", stdout, re.M)
    student = re.search(r"^student \S+ final val_acc=(\d\.\d+)", stdout, re.M)
    assert teacher and student, stdout[-2000:]
    return {"teacher": teacher.group(1), "student": student.group(1)}


class Figures(NamedTuple):
    page: str
    command: str
    quoted: Callable[[], Dict[str, str]]
    printed: Callable[[str], Dict[str, str]]


EXAMPLES = {
    "lightning": Figures("lightning.md", "python examples/lightning_train.py", _lightning_quoted, _lightning_printed),
    "timm": Figures("timm.md", "python examples/timm_train.py", _timm_quoted, _timm_printed),
    "hf-text": Figures("huggingface.md", "python examples/hf_text_classification.py",
                       _hf_quoted("hf_text_classification.py"), _hf_printed),
    "hf-image": Figures("huggingface.md", "python examples/hf_image_classification.py",
                        _hf_quoted("hf_image_classification.py"), _hf_printed),
}


def _same(quoted: str, printed: str) -> bool:
    decimals = len(quoted.partition(".")[2])
    return f"{float(printed):.{decimals}f}" == quoted


def check(name: str) -> bool:
    figures = EXAMPLES[name]
    quoted = figures.quoted()
    start = time.time()
    script, *flags = figures.command.split()[1:]
    with tempfile.TemporaryDirectory() as scratch:  # what the examples save goes here, not into the checkout
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        result = subprocess.run([sys.executable, str(ROOT / script), *flags], cwd=scratch, capture_output=True,
                                text=True, env=env)
    if result.returncode != 0:
        print(f"{name}: {figures.command} failed:\n{result.stderr[-3000:]}")
        return False
    printed = figures.printed(result.stdout)
    ok = set(quoted) == set(printed) and all(_same(quoted[key], printed[key]) for key in quoted)
    print(f"{name}: {figures.command} ({time.time() - start:.0f} s): docs/{figures.page} quotes {quoted}, "
          f"the command printed {printed}: {'same' if ok else 'DIFFERENT'}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"some of {', '.join(EXAMPLES)} (default: all)")
    names = parser.parse_args().names or list(EXAMPLES)
    unknown = sorted(set(names) - set(EXAMPLES))
    if unknown:
        parser.error(f"unknown examples {unknown}; expected some of {sorted(EXAMPLES)}")
    results = [check(name) for name in names]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())

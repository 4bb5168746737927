"""A lesson with a solutions notebook links to it and poses runnable exercises; its committed solutions pass.

strict nbval re-runs both notebooks; this test reads the committed outputs, so a solution that prints ❌ or a
lesson whose exercise cells are prose cannot be committed unnoticed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

LESSONS = Path(__file__).resolve().parent.parent / "lessons"
SOLUTIONS = sorted((LESSONS / "solutions").glob("*_solutions.ipynb"))


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _text(cell: dict) -> str:
    out = []
    for o in cell.get("outputs", []):
        if o["output_type"] == "stream":
            out.append("".join(o["text"]))
        elif "data" in o:
            out.append("".join(o["data"].get("text/plain", "")))
    return "".join(out)


def _lesson(solutions: Path) -> Path:
    number = solutions.name.split("_")[0]
    (lesson,) = LESSONS.glob(f"{number}_*.ipynb")
    return lesson


def test_there_are_solutions_notebooks():
    assert len(SOLUTIONS) >= 6


@pytest.mark.parametrize("solutions", SOLUTIONS, ids=lambda p: p.stem)
def test_solutions_pass_and_the_lesson_poses_runnable_exercises(solutions: Path):
    lesson = _lesson(solutions)
    cells = _cells(lesson)
    source = "".join("".join(c["source"]) for c in cells)
    assert f"solutions/{solutions.name}" in source  # the lesson links to its solutions
    # exercises are code cells that call a check and print its verdict (a first guess), not markdown blocks
    exercise_cells = [
        c for c in cells if c["cell_type"] == "code" and re.search(r"\bcheck_\w+\(", "".join(c["source"]))
    ]
    assert exercise_cells and all(re.search("[✅❌]", _text(c)) for c in exercise_cells)
    assert any("❌" in _text(c) for c in exercise_cells)  # at least one first guess is wrong, with a hint
    assert not any("```python\ncheck_" in "".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    # no solution left in the lesson: no hidden cell that prints a verdict
    hidden = [c for c in cells if c["metadata"].get("jupyter", {}).get("source_hidden")]
    assert not hidden
    # the solutions print only ✅, each verdict once (no second copy from a CheckResult repr)
    verdicts = [line for c in _cells(solutions) for line in _text(c).splitlines() if re.match("[✅❌]", line)]
    assert verdicts and all(v.startswith("✅") for v in verdicts)
    for c in _cells(solutions):
        lines = [ln for ln in _text(c).splitlines() if ln.startswith("✅")]
        assert len(lines) == len(set(lines))

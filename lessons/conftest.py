"""Keep each notebook's cells together and in order, whatever reorders the test items.

A notebook is one story: nbval runs its cells in one kernel, and a cell depends on the ones above it.
Plugins that shuffle tests to expose order dependence (pytest-randomly, in qlab's dev extra) must not
shuffle cells, nor interleave two notebooks: pytest tears a file's node down when the next item
belongs to another file, and nbval then stops that notebook's kernel, so the notebook's later cells
would run in a fresh kernel without their imports. This hook runs last and puts every notebook's
cells, in cell order, where its first cell landed; the order of notebooks among themselves and of
the other tests stays as the shuffle made it.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

# The cores' share per xdist worker, as tests/conftest.py sets it (see why there), for the notebook
# kernels, which inherit this environment: repeated here so that `pytest -n N lessons/` alone has it.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[Any]) -> None:
    notebooks: dict[Any, list[Any]] = {}
    for item in items:
        if hasattr(item, "cell_num"):  # an nbval cell
            notebooks.setdefault(item.parent, []).append(item)
    ordered: list[Any] = []
    for item in items:
        if not hasattr(item, "cell_num"):
            ordered.append(item)
        elif item.parent in notebooks:  # the notebook's first cell in the shuffled list: all of it here
            ordered.extend(sorted(notebooks.pop(item.parent), key=lambda c: c.cell_num))
    items[:] = ordered

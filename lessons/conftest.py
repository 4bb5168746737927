"""Keep each notebook's cells in order, whatever reorders the test items.

A notebook is one story: nbval runs its cells in one kernel, and a cell depends on the ones above it.
Plugins that shuffle tests to expose order dependence (pytest-randomly, in qlab's dev extra) must not
shuffle cells. This hook runs last and puts every notebook's cells back in cell order, in the slots
they occupy; the order of notebooks among the other tests is left as the shuffle made it.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

# Under xdist, give each worker's notebook kernels their share of the cores (the kernel inherits
# this environment when nbval starts it): N kernels each running OpenMP at full width oversubscribe
# the cores, and OpenMP's barriers then wait on descheduled threads (lesson 06: 392 s instead of
# 30 s with 2 workers on 2 cores). tests/conftest.py does the same for the workers themselves.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[Any]) -> None:
    slots: dict[Any, list[int]] = {}
    for i, item in enumerate(items):
        if hasattr(item, "cell_num"):  # an nbval cell
            slots.setdefault(item.parent, []).append(i)
    for positions in slots.values():
        cells = sorted((items[i] for i in positions), key=lambda c: c.cell_num)
        for i, cell in zip(positions, cells, strict=True):
            items[i] = cell

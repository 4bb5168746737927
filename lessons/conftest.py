"""Keep each notebook's cells in order, whatever reorders the test items.

A notebook is one story: nbval runs its cells in one kernel, and a cell depends on the ones above it.
Plugins that shuffle tests to expose order dependence (pytest-randomly, in qlab's dev extra) must not
shuffle cells. This hook runs last and puts every notebook's cells back in cell order, in the slots
they occupy; the order of notebooks among the other tests is left as the shuffle made it.
"""

from __future__ import annotations

from typing import Any

import pytest


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

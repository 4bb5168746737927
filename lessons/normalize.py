"""Normalize executed notebooks before committing them: python lessons/normalize.py lessons/*.ipynb

Executing a notebook (``jupyter nbconvert --execute --inplace``) leaves things that vary from run to run
and that nbval does not compare, but that make every re-execution a noisy diff:

* ``metadata.execution`` timestamps on each cell;
* a cell's printed lines split over several ``stream`` outputs, depending on when the kernel flushed;
* ``metadata.widgets`` (live widget state), which GitHub refuses to render when its state is missing.

This merges consecutive stream outputs of the same name, drops the timestamps and the widget state, and
writes the notebook back in nbformat's usual layout (one-space indent). Outputs are otherwise untouched.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def normalize(nb: dict[str, Any]) -> dict[str, Any]:
    nb.get("metadata", {}).pop("widgets", None)
    for cell in nb.get("cells", []):
        cell.get("metadata", {}).pop("execution", None)
        if cell.get("cell_type") != "code":
            continue
        merged: list[dict[str, Any]] = []
        for out in cell.get("outputs", []):
            prev = merged[-1] if merged else None
            if (
                prev is not None
                and out.get("output_type") == "stream"
                and prev.get("output_type") == "stream"
                and prev.get("name") == out.get("name")
            ):
                text = "".join(prev["text"]) + "".join(out["text"])
                prev["text"] = text.splitlines(keepends=True)
            else:
                merged.append(out)
        cell["outputs"] = merged
    return nb


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    for p in map(Path, paths):
        nb = normalize(json.loads(p.read_text()))
        p.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

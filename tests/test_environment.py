"""environment.yml (conda users) and pyproject.toml (pip users) must ask for the same things."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"torch": "pytorch"}  # pip name -> conda-forge name where they differ


def _split(req: str) -> tuple[str, str]:
    """'torch>=2.4; marker' -> ('torch', '>=2.4')."""
    req = req.split(";")[0].strip()
    m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*(.*)$", req)
    assert m, req
    return m.group(1).lower(), m.group(3).replace(" ", "")


def _pyproject_requirements() -> dict[str, str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = data["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    out = {}
    for r in reqs:
        name, spec = _split(r)
        if name != "qlab":  # self-references between extras
            out[name] = spec
    return out


def _environment() -> tuple[dict[str, str], dict[str, str], list[str]]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"], "use conda-forge only (the pytorch channel is deprecated)"
    conda, pip_reqs, pip_lines = {}, {}, []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip_lines = dep["pip"]
            for line in pip_lines:
                if not line.startswith("-e"):
                    name, spec = _split(line)
                    pip_reqs[name] = spec
        else:
            m = re.match(r"^([A-Za-z0-9_.\-]+)\s*(.*)$", dep)
            conda[m.group(1).lower()] = m.group(2).replace(" ", "")
    return conda, pip_reqs, pip_lines


def test_every_dependency_is_in_environment_yml_with_the_same_minimum():
    conda, pip_reqs, _ = _environment()
    for name, spec in _pyproject_requirements().items():
        conda_name = CONDA_NAMES.get(name, name)
        if conda_name in conda:
            assert conda[conda_name] == spec, (
                f"{name}: pyproject says {spec!r}, environment.yml {conda[conda_name]!r}"
            )
        else:
            assert name in pip_reqs, f"{name} is in pyproject.toml but not in environment.yml"
            assert pip_reqs[name] == spec, (
                f"{name}: pyproject says {spec!r}, environment.yml {pip_reqs[name]!r}"
            )


def test_environment_yml_installs_this_checkout_with_extras():
    conda, pip_reqs, pip_lines = _environment()
    assert "-e .[course,dev]" in pip_lines
    known = {CONDA_NAMES.get(n, n) for n in _pyproject_requirements()} | set(_pyproject_requirements())
    extra = (set(conda) | set(pip_reqs)) - known - {"python", "pip"}
    assert not extra, f"environment.yml lists packages pyproject.toml does not: {sorted(extra)}"
    assert conda["python"].startswith(">=3.10")

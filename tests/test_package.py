"""`import qlab` works without the optional stack, from any directory, and ships qlab.kernels."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK_OPTIONAL = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = {"triton", "matplotlib", "ipywidgets", "transformers", "gguf"}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} blocked for this test")
    sys.meta_path.insert(0, Block())
    """
)


def run(code: str, tmp_path) -> str:
    out = subprocess.run(
        [sys.executable, "-c", BLOCK_OPTIONAL + textwrap.dedent(code)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_core_imports_without_optional_dependencies(tmp_path):
    stdout = run(
        """
        import torch, qlab
        qt = qlab.quantize(torch.randn(8, 64), qlab.QuantSpec.per_group(4, 32))
        print(qt.bits_per_weight, qlab.quantize_nf4(torch.randn(2, 64)).bits_per_weight)
        import qlab.kernels
        print("kernels ok", "triton" in sys.modules)
        """,
        tmp_path,
    )
    assert stdout.split() == ["6.0", "4.5", "kernels", "ok", "False"]


def test_kernels_ship_inside_qlab_not_as_top_level_module():
    import importlib.util
    from pathlib import Path

    import qlab.kernels

    assert qlab.kernels.__name__ == "qlab.kernels"
    # transformers and bitsandbytes probe for Hugging Face's `kernels` package: our directory
    # must never be what that name finds (run pytest, not `python -m pytest`, from the repo root).
    spec = importlib.util.find_spec("kernels")
    ours = Path(qlab.kernels.__file__).resolve().parent
    assert spec is None or spec.origin is None or Path(spec.origin).resolve().parent != ours


def test_lazy_attributes_and_errors():
    import qlab

    assert "quantize_model" in dir(qlab)
    try:
        qlab.does_not_exist  # noqa: B018
    except AttributeError as e:
        assert "does_not_exist" in str(e)
    else:  # pragma: no cover
        raise AssertionError("expected AttributeError")

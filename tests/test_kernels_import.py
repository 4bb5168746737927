"""``import qlab.kernels`` where triton is missing: flags say so, kernels raise, the roofline still works."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_import_without_triton():
    script = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import qlab.kernels as K
        assert K.HAS_TRITON is False
        assert K.available() is False and K.available("cpu") is False
        try:
            K.dequant_matmul()
        except RuntimeError as err:
            assert "needs triton" in str(err)
        else:
            raise AssertionError("dequant_matmul should raise without triton")
        assert K.roofline.H100.ridge > 1
        import qlab.exercises.lesson07
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"

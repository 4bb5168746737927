"""``import qlab.kernels`` where triton is missing: flags say so, kernels raise, the roofline still works."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

# Other test modules set TRITON_INTERPRET=1 in this process; each script here starts without it.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=CLEAN_ENV
    )


def test_importing_qlab_kernels_does_not_import_triton():
    """Triton picks compile-or-interpret at its first import: qlab.kernels must leave that to the user."""
    script = "import sys, qlab.kernels, qlab.exercises.lesson07; print('triton' in sys.modules)"
    out = run(script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_import_without_triton():
    script = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import qlab.kernels as K
        assert K.HAS_TRITON is False
        assert K.available() is False and K.available("cpu") is False
        try:
            K.dequant_matmul
        except RuntimeError as err:
            assert "needs triton" in str(err)
        else:
            raise AssertionError("dequant_matmul should raise without triton")
        assert K.roofline.H100.ridge > 1
        import qlab.exercises.lesson07
        print("ok")
        """
    )
    out = run(script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_kernels_work_when_the_interpreter_is_chosen_after_import_qlab():
    script = textwrap.dedent(
        """
        import os, torch
        import qlab.kernels as K
        from qlab.nn import QuantLinear  # importing qlab's layers must not import triton either
        os.environ["TRITON_INTERPRET"] = "1"
        y = K.dequant_matmul(torch.eye(8), torch.full((2, 1), -1, dtype=torch.int32), torch.ones(2, 1),
                             torch.zeros(2, 1), bits=4, group_size=8, n=2, k=8)
        print(int(y.sum()))
        """
    )
    out = run(script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(15 * 16)


def test_cpu_tensors_after_triton_was_imported_in_compiled_mode_get_a_clear_error():
    script = textwrap.dedent(
        """
        import os, torch, triton
        os.environ["TRITON_INTERPRET"] = "1"  # too late: triton is already imported
        import qlab.kernels as K
        try:
            K.quantize_pack(torch.ones(2, 8), 4, 8)
        except RuntimeError as err:
            print("before TRITON_INTERPRET=1 was set" in str(err))
        """
    )
    out = run(script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"

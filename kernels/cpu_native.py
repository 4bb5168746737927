"""The int8-dot decode kernel as a C++ torch operator: ``torch.ops.qlab.gemv_int8dot_native``.

``torch.ops.qlab.gemv_int8dot`` (:mod:`qlab.kernels.cpu_ops`) checks its arguments and calls the C
library through ctypes in Python: about 10 µs a call, on a kernel of 10-20 µs at SmolLM2's sizes. In
eager or ``torch.compile``'d code that Python hides among the rest; in a step compiled ahead of time
(:mod:`qlab.aot`) it is all the Python left, so that step calls this operator instead: the same C
function (``qlab_gemv_i8`` from the library :mod:`qlab.kernels.cpu_library` built), the same checks,
written in C++ (``cpu_native.cpp``).

Only where asked: :func:`preferred` makes :func:`qlab.kernels.cpu.gemv_int8dot` call it within a
block (``qlab.aot`` exports its step there), so eager and ``torch.compile``'d code never change
operator because some other code loaded this one.

Built on demand, not at import: :func:`load` compiles ``cpu_native.cpp`` against torch's headers with
``torch.utils.cpp_extension`` (ninja and a C++ compiler; about 25 s the first time, into
``$QLAB_CACHE/kernels/native``, then only loaded). Where that fails, :func:`load` returns False,
:func:`status` says why, and callers keep the Python operator.
"""

from __future__ import annotations

import contextlib
import ctypes
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from qlab.kernels import cpu_library
from qlab.kernels.cpu_ops import _LIB, _gemv_int8dot_fake

SOURCE = Path(__file__).with_name("cpu_native.cpp")
#: The operator :func:`load` registers (same schema and results as ``torch.ops.qlab.gemv_int8dot``).
OP = "qlab::gemv_int8dot_native"

_loaded = False
_thread = threading.local()
_status = "not loaded yet (qlab.kernels.cpu_native.load builds it)"


def load() -> bool:
    """Build (or find) and load the operator, once per process; True when it runs here."""
    global _loaded, _status
    if _loaded or not _status.startswith("not loaded"):
        return _loaded
    cpu_library.load_default()
    lib = cpu_library.load()
    if lib is None:
        _status = f"unavailable: it calls qlab's C kernels, which are {cpu_library.status()}"
        return False
    try:
        from torch.utils import cpp_extension

        build_dir = cpu_library.cache_root() / "native"
        build_dir.mkdir(parents=True, exist_ok=True)
        path = cpp_extension.load(
            name=f"qlab_native_abi{cpu_library.ABI}",
            sources=[str(SOURCE)],
            extra_cflags=["-O2"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
        ctypes.CDLL(path).qlab_native_bind(ctypes.cast(lib.qlab_gemv_i8, ctypes.c_void_p))
        torch.library.register_fake(OP, _gemv_int8dot_fake, lib=_LIB)
    except (ImportError, OSError, RuntimeError, subprocess.CalledProcessError) as err:
        _status = f"unavailable: {str(err).strip()[-500:]}"
        return False
    _loaded, _status = True, "loaded"
    return True


def loaded() -> bool:
    """Whether :func:`load` has loaded the operator in this process (it never builds)."""
    return _loaded


@contextlib.contextmanager
def preferred() -> Iterator[bool]:
    """Within the block, in this thread, :func:`qlab.kernels.cpu.gemv_int8dot` runs the C++ operator
    (built and loaded first if need be); yields whether it could. Elsewhere the Python one runs."""
    ok = load()
    old = getattr(_thread, "on", False)
    _thread.on = ok
    try:
        yield ok
    finally:
        _thread.on = old


def active() -> bool:
    """Whether :func:`qlab.kernels.cpu.gemv_int8dot` runs the C++ operator here, now."""
    return _loaded and getattr(_thread, "on", False)


def status() -> str:
    """``"loaded"``, not loaded yet, or why it is unavailable."""
    return _status

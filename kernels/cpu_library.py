"""Building and loading ``kernels/cpu.c``: the shared library behind :mod:`qlab.kernels.cpu`.

The C source is compiled with the system C compiler (``$CC``, else ``cc``) at
``-O3 -march=native -fopenmp`` into ``$QLAB_CACHE/kernels`` (else ``~/.cache/qlab/kernels``), keyed
by a hash of the source and flags, when :mod:`qlab.kernels.cpu` is first imported; a later import only
loads it. ``QLAB_CPU_KERNELS=0`` turns it off; without a working compiler :func:`load` returns None and
:func:`status` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("cpu.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
ABI = 6  # must match QLAB_CPU_ABI in cpu.c

_lib: ctypes.CDLL | None = None
_status = "not loaded yet"
_features: tuple[str, ...] = ()
_P = ctypes.c_void_p
_L = ctypes.c_long


def cache_root() -> Path:
    """Where built kernels live: ``$QLAB_CACHE/kernels``, else ``~/.cache/qlab/kernels``."""
    env = os.environ.get("QLAB_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "qlab") / "kernels"


def build(out_dir: str | os.PathLike[str] | None = None, flags: tuple[str, ...] = FLAGS) -> Path:
    """Compile ``cpu.c`` with ``flags`` into ``out_dir`` (default: the cache) and return the library's path.

    The file name carries a hash of the source, flags and compiler, so a changed source rebuilds and
    concurrent builders (pytest workers) each write a temporary file and rename it into place.
    Raises RuntimeError with the compiler's message when it fails.
    """
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + repr((flags, cc)).encode()).hexdigest()[:16]
    root = Path(out_dir) if out_dir is not None else cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"qlab_cpu_{key}.so"
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=root)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed to build {SOURCE.name}: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _bind(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.qlab_cpu_abi() != ABI:
        raise RuntimeError(f"{path} has ABI {lib.qlab_cpu_abi()}, expected {ABI}")
    i32 = ctypes.c_int
    # (M, N, K, bits, g, then pointers, threads); see the C signatures
    lib.qlab_gemv.argtypes = [i32, _L, _L, i32, _L] + [_P] * 7 + [i32]
    lib.qlab_gemv_i8.argtypes = [i32, _L, _L, i32, _L, i32] + [_P] * 7 + [i32]
    lib.qlab_dequant_bf16.argtypes = [_L, _L, _L, i32, _L] + [_P] * 5 + [i32]
    lib.qlab_fp8_gemv.argtypes = [i32, _L, _L] + [_P] * 4 + [i32]
    lib.qlab_fp8_dequant_bf16.argtypes = [_L, _L, _L] + [_P] * 3 + [i32]
    for fn in (
        lib.qlab_gemv,
        lib.qlab_gemv_i8,
        lib.qlab_dequant_bf16,
        lib.qlab_fp8_gemv,
        lib.qlab_fp8_dequant_bf16,
    ):
        fn.restype = i32
    return lib


def load_default() -> None:
    """Build (or find in the cache) and bind the default library, once per process (later calls return
    at once). :mod:`qlab.kernels.cpu` calls it when imported.

    At import rather than on the first kernel call, so that ``torch.compile`` never traces into the
    build (a lock, a subprocess, file I/O): Dynamo cannot, and with ``fullgraph=True`` a QuantLinear
    compiled before its first eager call failed there.
    """
    global _lib, _status, _features
    if _status != "not loaded yet":
        return
    if os.environ.get("QLAB_CPU_KERNELS", "1") == "0":
        _status = "disabled by QLAB_CPU_KERNELS=0"
        return
    try:
        lib = _bind(build())
        feats = [
            f for f, on in (("avx512-bf16", lib.qlab_cpu_bf16()), ("avx512-vnni", lib.qlab_cpu_vnni())) if on
        ]
        _lib, _status, _features = lib, ", ".join(feats) or "portable C", tuple(feats)
    except (OSError, RuntimeError) as err:
        _status = f"unavailable: {err}"


def load(path: str | os.PathLike[str] | None = None) -> ctypes.CDLL | None:
    """The compiled kernels (built when this module is first imported), or None where they cannot be
    built or are disabled.

    With ``path``, load that library instead (tests use it for a portable, non-AVX-512 build).
    """
    if path is not None:
        return _bind(Path(path))
    return _lib


def features() -> tuple[str, ...]:
    """The vector extensions the loaded library was compiled with (``-march=native``: what this CPU has),
    among ``"avx512-bf16"`` and ``"avx512-vnni"``; empty for a portable build or no library."""
    return _features


def status() -> str:
    """How the CPU kernels stand: the vector extensions compiled in (``"avx512-bf16, avx512-vnni"``),
    ``"portable C"``, or why they are unavailable."""
    return _status

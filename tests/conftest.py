"""Session-wide test setup.

Triton decides between compiling kernels and interpreting them when it is *first imported*, and
several libraries (torch.compile, transformers, bitsandbytes) may import it before a kernel test
module runs. Setting ``TRITON_INTERPRET=1`` here, before any test module is imported in each
(xdist) worker, makes the kernel tests run in the interpreter on machines without CUDA whatever
order the files are collected in. On a GPU machine the kernels are compiled and run for real.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under xdist, N workers each running torch's (and qlab's C kernels') OpenMP pool at full width
# oversubscribe the cores, and OpenMP's barriers then wait on descheduled threads: on 2 cores with
# 2 workers, lesson 06 took 392 s instead of 30 s. Give each worker its share of the cores, and the
# same to every process it starts (notebook kernels, CLI subprocesses) through OMP_NUM_THREADS.
# An explicit OMP_NUM_THREADS is left alone.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# Real models, shared by the test files that need them. Module scope: a test that changes a model
# in place cannot leak into another file. Fetching is a no-op once the cache is warm.
@pytest.fixture(scope="module")
def fetched() -> None:
    from qlab import models

    models.fetch(progress=False)


@pytest.fixture(scope="module")
def smollm2(fetched):
    from qlab import models

    return models.load_smollm2()


@pytest.fixture(scope="module")
def minilm(fetched):
    from qlab import models

    return models.load_minilm()


@pytest.fixture(autouse=True)
def _seeded_torch(request: pytest.FixtureRequest) -> None:
    """Seed torch's global generator per test from the test's own id.

    A test that draws ``torch.randn`` without a generator then sees the same numbers whether it runs
    alone, first, last, in one process or under xdist, and in any random order (pytest-randomly
    reseeds ``random`` and numpy the same way, but not torch).
    """
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def c_kernel_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let ``select_path`` take qlab's C kernels even where they lack the vector instructions that make
    them fast (a portable build on an AVX2-only CPU, where it prefers torch's ops): tests of those
    paths then run on every machine with a C compiler."""
    from qlab.nn import dispatch

    monkeypatch.setattr(dispatch, "cpu_kernel_speedups", lambda: (True, True))

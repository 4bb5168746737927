"""Session-wide test setup.

Triton decides between compiling kernels and interpreting them when it is *first imported*, and
several libraries (torch.compile, transformers, bitsandbytes) may import it before a kernel test
module runs. Setting ``TRITON_INTERPRET=1`` here, before any test module is imported in each
(xdist) worker, makes the kernel tests run in the interpreter on machines without CUDA whatever
order the files are collected in. On a GPU machine the kernels are compiled and run for real.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

"""Where a kernel runs: compiled on a CUDA GPU, or in Triton's interpreter on CPU tensors.

``TRITON_INTERPRET=1`` makes ``@triton.jit`` build an interpreted function (numpy runs each
program in turn) instead of compiling for a GPU. Triton reads the variable when each decorator runs,
its own library included, so it must be set before triton is first imported.
"""

from __future__ import annotations

import functools
import os

import torch


def interpret_mode() -> bool:
    """True when ``TRITON_INTERPRET`` asks for the interpreter (``1``, ``true``, ``yes``, ``on``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def check_device(device: torch.device) -> None:
    """Raise a clear error when tensors on ``device`` cannot run a Triton kernel here."""
    if device.type == "cuda":
        return
    if device.type == "cpu" and interpret_mode():
        return
    raise RuntimeError(
        f"qlab.kernels runs on CUDA tensors, or on CPU tensors in Triton's interpreter: got a tensor "
        f"on {device}. Set TRITON_INTERPRET=1 to interpret (slow, for learning and tests), or use "
        f"the torch reference (qlab.kernels.dequant_matmul_reference)."
    )


def interpreted(kernel, device: torch.device):
    """``kernel`` after checking it can run on ``device``.

    Triton chooses between compiling and interpreting when ``triton`` is first imported (its own
    helpers such as ``tl.zeros`` are kernels too), so CPU tensors need ``TRITON_INTERPRET=1`` set
    before that import, not just before the call.
    """
    import triton.language as tl

    interpreting = type(kernel).__name__ == type(tl.zeros).__name__ == "InterpretedFunction"
    if device.type == "cpu" and not interpreting:
        raise RuntimeError(
            "triton was imported before TRITON_INTERPRET=1 was set, so its kernels are compiled for a GPU "
            "and cannot take CPU tensors. Set TRITON_INTERPRET=1 first (before anything imports triton: "
            "the first line of the script or notebook, or in the shell), then restart."
        )
    return kernel


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on a CUDA device (decode splits K until they are all busy)."""
    return torch.cuda.get_device_properties(device).multi_processor_count

"""Where a kernel runs: compiled on a CUDA GPU, or in Triton's interpreter on CPU tensors.

``TRITON_INTERPRET=1`` makes ``@triton.jit`` build an interpreted function (numpy runs each
program in turn) instead of compiling for a GPU. Triton reads the variable when the decorator
runs, that is when this package is imported; :func:`interpreted` also honours it when it was set
later, so CPU tensors work whatever imported ``qlab.kernels`` first.
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


@functools.cache
def _interpreted_copy(kernel):
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(kernel.fn)


def interpreted(kernel, device: torch.device):
    """The form of ``kernel`` that runs on ``device``: an interpreted copy for CPU tensors."""
    if device.type == "cpu" and type(kernel).__name__ != "InterpretedFunction":
        return _interpreted_copy(kernel)
    return kernel


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on a CUDA device (decode splits K until they are all busy)."""
    return torch.cuda.get_device_properties(device).multi_processor_count

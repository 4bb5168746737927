"""Where a kernel runs: compiled on a CUDA GPU, or in Triton's interpreter on CPU tensors.

``TRITON_INTERPRET=1`` makes ``@triton.jit`` build an interpreted function (numpy runs each
program in turn) instead of compiling for a GPU. Triton reads the variable when each decorator runs,
its own library included, so it must be set before triton is first imported.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

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


def register_op(name: str, fn: Callable[..., Any], fake: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (which launches Triton kernels through :func:`traceable`) as the operator ``qlab::<name>``.

    Compiled Triton (a GPU): ``torch.library.triton_op``, so ``torch.compile`` sees through the
    operator to the kernels it launches (Inductor can schedule them) and ``fn`` run on fake tensors
    is its own fake kernel. Triton's interpreter (``TRITON_INTERPRET=1``, CPU tests) cannot take
    that route: ``wrap_triton`` hands back the interpreted kernel itself, which would run numpy on
    fake tensors, so the operator is an opaque ``torch.library.custom_op`` whose fake kernel
    ``fake`` only allocates the outputs. Both take the same arguments and compute the same thing.
    """
    triton_op = getattr(torch.library, "triton_op", None)  # torch >= 2.6
    if triton_op is not None and not interpret_mode():
        return triton_op(f"qlab::{name}", mutates_args=())(fn)
    op = torch.library.custom_op(f"qlab::{name}", mutates_args=())(fn)
    op.register_fake(fake)
    return op


def traceable(kernel: Any) -> Any:
    """``kernel`` wrapped by ``torch.library.wrap_triton`` (torch >= 2.6), so that ``make_fx`` and
    ``torch.compile`` record its launch inside a ``triton_op``; in eager code it launches as it is."""
    wrap = getattr(torch.library, "wrap_triton", None)
    return kernel if wrap is None else wrap(kernel)

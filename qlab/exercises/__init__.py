"""Self-checking exercises for the lessons.

Each lesson's checks live in their own module (``qlab.exercises.lesson02`` ...). A check compares
the learner's answer with a reference computed by qlab, prints one line saying right or wrong,
and on a wrong answer gives a hint, never the answer. It returns a :class:`CheckResult` (truthy
when right) so tests can assert on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one exercise check."""

    ok: bool
    message: str

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:  # shown in notebooks when a check is the last line of a cell
        return self.message


def report(ok: bool, name: str, hint: str, *, quiet: bool = False) -> CheckResult:
    """Build (and print unless ``quiet``) the result of the exercise ``name``."""
    message = f"✅ {name}: correct." if ok else f"❌ {name}: not yet. Hint: {hint}"
    if not quiet:
        print(message)
    return CheckResult(ok, message)


def as_number(value: object, arg: str) -> float:
    """A learner's answer as a float: a Python number or a one-element tensor, else a clear error."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{arg} must be a single number, got a tensor of shape {tuple(value.shape)}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{arg} must be a number, got {type(value).__name__}")
    return float(value)

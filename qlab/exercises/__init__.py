"""Self-checking exercises for the lessons.

Each lesson's checks live in their own module (``qlab.exercises.lesson02`` ...). A check compares
the learner's answer with a reference computed by qlab, prints one line saying right or wrong,
and on a wrong answer gives a hint, never the answer. It returns a :class:`CheckResult` (truthy
when right) so tests can assert on it.

An answer of the wrong form (a string where a number belongs, ``...`` left in place, a function that
raises) is a wrong answer too: the check says what form it expects, as a hint, instead of a traceback.
Arguments that the lesson itself passes (a format name, a spec, a model) still raise when they are wrong.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one exercise check."""

    ok: bool
    message: str

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        return f"CheckResult(ok={self.ok})"

    def _ipython_display_(self) -> None:
        """The check already printed its line; a check that ends a notebook cell shows nothing more."""


class AnswerError(ValueError):
    """The learner's answer has the wrong form; :func:`answer_check` turns it into a hint."""


def report(ok: bool, name: str, hint: str, *, quiet: bool = False) -> CheckResult:
    """Build (and print unless ``quiet``) the result of the exercise ``name``."""
    message = f"✅ {name}: correct." if ok else f"❌ {name}: not yet. Hint: {hint}"
    if not quiet:
        print(message)
    return CheckResult(ok, message)


F = TypeVar("F", bound=Callable[..., CheckResult])


def answer_check(name: str) -> Callable[[F], F]:
    """Decorate a check so that an :class:`AnswerError` it raises becomes a wrong answer with that hint."""

    def wrap(check: F) -> F:
        @functools.wraps(check)
        def checked(*args: Any, **kwargs: Any) -> CheckResult:
            try:
                return check(*args, **kwargs)
            except AnswerError as err:
                return report(False, name, str(err), quiet=bool(kwargs.get("quiet", False)))

        return checked  # type: ignore[return-value]

    return wrap


def _placeholder(value: object, arg: str) -> None:
    if value is Ellipsis or value is None:
        raise AnswerError(f"replace the placeholder for {arg} with your answer.")


def as_number(value: object, arg: str) -> float:
    """A learner's answer as a float: a Python or numpy number, or a one-element tensor or array."""
    _placeholder(value, arg)
    if isinstance(value, torch.Tensor) or type(value).__module__ == "numpy":
        size = value.numel() if isinstance(value, torch.Tensor) else getattr(value, "size", 1)
        if size != 1:
            shape = tuple(getattr(value, "shape", ()))
            raise AnswerError(f"{arg} must be a single number, got a tensor of shape {shape}.")
        value = value.item()  # type: ignore[union-attr]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise AnswerError(f"{arg} must be a number, got {type(value).__name__} {value!r}.")
    return float(value)


def as_int(value: object, arg: str) -> int:
    """A learner's answer as an int: any number (Python, numpy, one-element tensor) holding a whole value."""
    x = as_number(value, arg)
    if x != x or x in (float("inf"), float("-inf")) or x != int(x):
        raise AnswerError(f"{arg} must be a whole number, got {x!r}.")
    return int(x)


def as_tensor(value: object, arg: str) -> torch.Tensor:
    """A learner's answer that must be a tensor."""
    _placeholder(value, arg)
    if not isinstance(value, torch.Tensor):
        raise AnswerError(f"{arg} must be a torch.Tensor, got {type(value).__name__}.")
    return value


def as_function(value: object, arg: str, signature: str) -> Callable[..., Any]:
    """A learner's answer that must be a function."""
    _placeholder(value, arg)
    if not callable(value):
        raise AnswerError(f"{arg} must be a function {signature}, got {type(value).__name__}.")
    return value


def call_answer(fn: Callable[..., Any], arg: str, *args: Any) -> Any:
    """Call the learner's function; if it raises, the error becomes the hint."""
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - any error in the learner's code is a hint, not a traceback
        raise AnswerError(f"your {arg} raised {type(err).__name__}: {err}") from err

"""Checks for lesson 08, end to end: model bytes for a setting, picking a setting for a budget, and a
save/reload round trip.

Each check recomputes the answer and says right or wrong; a wrong answer gets a hint, never the number.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from qlab.exercises import CheckResult, report


def expected_model_bytes(n_linear: int, n_rest: int, bits: int, group_size: int) -> int:
    """Bytes of a model whose ``n_linear`` linear weights are ``bits``-bit codes with one fp32 scale and one
    fp32 zero per ``group_size`` weights, and whose other ``n_rest`` parameters stay fp32."""
    return n_linear * bits // 8 + (n_linear // group_size) * 8 + 4 * n_rest


def check_model_bytes(
    n_linear: int, n_rest: int, bits: int, group_size: int, answer: float, *, quiet: bool = False
) -> CheckResult:
    """Exercise 1: bytes of a model at ``bits`` with asymmetric groups of ``group_size`` (fp32 scale, zero);
    within 0.1%."""
    for name, v in (("n_linear", n_linear), ("n_rest", n_rest), ("bits", bits), ("group_size", group_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    if isinstance(answer, bool) or not isinstance(answer, (int, float)):
        raise TypeError(f"answer must be a number of bytes, got {type(answer).__name__}")
    want = expected_model_bytes(n_linear, n_rest, bits, group_size)
    ok = abs(answer - want) <= 1e-3 * want
    if ok:
        hint = ""
    elif abs(answer - (n_linear * bits // 8 + 4 * n_rest)) <= 1e-3 * want:
        hint = "each group of weights also stores a float32 scale and a float32 zero-point (8 bytes)."
    elif abs(answer - want + 4 * n_rest) <= 1e-3 * want:
        hint = "the parameters that stay in float (embeddings, norms) count too, 4 bytes each."
    else:
        hint = (
            "codes: bits/8 bytes per linear weight; plus 8 bytes per group; plus 4 bytes per float parameter."
        )
    return report(ok, "model bytes", hint, quiet=quiet)


def best_setting(table: Sequence[Mapping[str, Any]], budget_mb: float, metric: str = "perplexity") -> str:
    """The ``setting`` of the row with the best ``metric`` (lowest perplexity, highest cosine) within
    ``budget_mb``."""
    fits = [r for r in table if r["mb"] <= budget_mb]
    if not fits:
        raise ValueError(f"no setting fits in {budget_mb} MB")
    pick = (
        min(fits, key=lambda r: r[metric]) if metric == "perplexity" else max(fits, key=lambda r: r[metric])
    )
    return str(pick["setting"])


def check_best_setting(
    table: Sequence[Mapping[str, Any]], budget_mb: float, answer: str, *, quiet: bool = False
) -> CheckResult:
    """Exercise 2: the setting with the lowest perplexity among rows ``{"setting", "mb", "perplexity"}`` whose
    ``mb`` fits ``budget_mb``."""
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a setting name (str), got {type(answer).__name__}")
    want = best_setting(table, budget_mb)
    names = {str(r["setting"]) for r in table}
    if answer == want:
        hint = ""
    elif answer not in names:
        hint = f"answer with one of the settings in the table: {sorted(names)}."
    elif next(r for r in table if r["setting"] == answer)["mb"] > budget_mb:
        hint = "that one does not fit: its model MB is over the budget."
    else:
        hint = "it fits, but another setting that fits has a lower perplexity."
    return report(answer == want, f"best setting for {budget_mb:g} MB", hint, quiet=quiet)


def check_round_trip(original: nn.Module, reloaded: nn.Module, *, quiet: bool = False) -> CheckResult:
    """Exercise 3: ``reloaded`` holds exactly ``original``'s tensors (same names, dtypes, bytes)."""
    for name, m in (("original", original), ("reloaded", reloaded)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{name} must be an nn.Module, got {type(m).__name__}")
    a, b = original.state_dict(), reloaded.state_dict()
    if a.keys() != b.keys():
        missing = sorted(set(a) - set(b))[:2]
        return report(
            False, "save/reload round trip", f"the tensor names differ (e.g. {missing}).", quiet=quiet
        )
    for k in a:
        if b[k].device.type == "meta":
            return report(
                False, "save/reload round trip", "some tensors were never loaded (meta).", quiet=quiet
            )
        if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k].cpu(), b[k].cpu()):
            hint = f"{k} differs: load the file you saved, with qlab.io.load_quantized."
            return report(False, "save/reload round trip", hint, quiet=quiet)
    return report(True, "save/reload round trip", "", quiet=quiet)

"""Checks for lesson 08, end to end: model bytes for a setting, picking a setting for a budget, a
save/reload round trip, and per-channel quantization of cached keys.

Each check recomputes the answer and says right or wrong; a wrong answer gets a hint, never the number.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from qlab.exercises import AnswerError, CheckResult, answer_check, as_function, call_answer, report


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


def _pick_cases(table: Sequence[Mapping[str, Any]]) -> list[tuple[list[dict[str, Any]], float]]:
    """Tables and budgets a picking function must get right: the lesson's table at budgets between and
    around its sizes, the same rows shuffled, and a synthetic table where the smallest fit is not the best."""
    rows = [dict(r) for r in table]
    sizes = sorted(float(r["mb"]) for r in rows)
    budgets = [s + 0.5 for s in sizes] + [s - 0.5 for s in sizes[1:]]
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    synthetic = [
        {"setting": "a", "mb": 100.0, "perplexity": 30.0},
        {"setting": "b", "mb": 120.0, "perplexity": 20.0},
        {"setting": "c", "mb": 90.0, "perplexity": 90.0},
        {"setting": "e", "mb": 140.0, "perplexity": 50.0},
        {"setting": "d", "mb": 300.0, "perplexity": 10.0},
    ]
    cases = [(rows, b) for b in budgets] + [(shuffled, b) for b in budgets]
    return cases + [(synthetic, b) for b in (95.0, 110.0, 150.0, 400.0)]


@answer_check("pick the best setting for a budget")
def check_best_setting(
    table: Sequence[Mapping[str, Any]], pick: object, *, quiet: bool = False
) -> CheckResult:
    """Exercise 2: ``pick(table, budget_mb)`` returns the ``setting`` with the lowest perplexity among the
    rows ``{"setting", "mb", "perplexity"}`` whose ``mb`` fits ``budget_mb``. Tried on the lesson's ``table``
    at several budgets, on the same rows shuffled and on a synthetic table (not a single lookup)."""
    fn = as_function(pick, "pick", "(table, budget_mb) -> setting name")
    for rows, budget in _pick_cases(table):
        want = best_setting(rows, budget)
        got = call_answer(fn, "pick", [dict(r) for r in rows], budget)
        if got == want:
            continue
        fits = {str(r["setting"]) for r in rows if r["mb"] <= budget}
        if not isinstance(got, str):
            hint = f"return the setting's name (a str), got {type(got).__name__} {got!r}."
        elif got not in fits:
            hint = (
                f"for a budget of {budget:g} MB you picked {got!r}: it does not fit, or is not in the table."
            )
        else:
            hint = (
                f"for a budget of {budget:g} MB {got!r} fits, but another setting that fits has a lower "
                "perplexity: keep the rows that fit, then take the lowest perplexity."
            )
        return report(False, "pick the best setting for a budget", hint, quiet=quiet)
    return report(True, "pick the best setting for a budget", "", quiet=quiet)


@answer_check("save/reload round trip")
def check_round_trip(
    original: nn.Module, reloaded: nn.Module, path: object, *, quiet: bool = False
) -> CheckResult:
    """Exercise 3: ``original`` was saved to ``path`` and ``reloaded`` was loaded from it into new memory.

    The file must exist and hold exactly ``original``'s tensors; ``reloaded`` must be a different module
    whose tensors are equal (names, dtypes, bytes) but share no memory with ``original``'s."""
    from safetensors.torch import load_file

    for name, m in (("original", original), ("reloaded", reloaded)):
        if not isinstance(m, nn.Module):
            raise AnswerError(f"{name} must be an nn.Module, got {type(m).__name__}.")
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise AnswerError(f"pass the path of the file you saved (save_quantized's output), got {path!r}.")
    if reloaded is original:
        raise AnswerError(
            "that is the same module twice: load the file into a new module with load_quantized."
        )
    a, b = original.state_dict(), reloaded.state_dict()
    try:
        saved = load_file(os.fspath(path))
    except Exception as err:  # noqa: BLE001 - a wrong file is a hint, not a traceback
        raise AnswerError(
            f"{path!r} is not a safetensors file ({type(err).__name__}): save with save_quantized."
        ) from err
    if set(saved) != set(a) or any(not torch.equal(saved[k], a[k].cpu()) for k in a):
        hint = (
            "the file does not hold the original's tensors: save the original (save_quantized), then reload."
        )
        return report(False, "save/reload round trip", hint, quiet=quiet)
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
        if a[k].numel() and a[k].untyped_storage().data_ptr() == b[k].untyped_storage().data_ptr():
            hint = (
                f"{k} shares memory with the original: reload from the file, not a reference to the module."
            )
            return report(False, "save/reload round trip", hint, quiet=quiet)
    return report(True, "save/reload round trip", "", quiet=quiet)


def _kv_cases() -> list[tuple[torch.Tensor, int, int]]:
    """Key-like states ``[batch, heads, tokens, head_dim]`` with outlier channels, and (bits, group)."""
    g = torch.Generator().manual_seed(8)
    cases = []
    for shape, bits, group in (((1, 3, 64, 64), 4, 32), ((2, 2, 48, 16), 2, 16), ((1, 1, 32, 8), 8, 8)):
        k = torch.randn(shape, generator=g)
        k[..., 1] = k[..., 1] * 30 + 5  # an outlier channel, off centre
        cases.append((k, bits, group))
    return cases


def _matches(got: torch.Tensor, k: torch.Tensor, spec: Any) -> bool:
    """Whether ``got`` is ``k`` through qlab's quantize/dequantize with ``spec``, within 1e-5 of k's range."""
    from qlab.kvcache import dequantize_kv, quantize_kv

    want = dequantize_kv(quantize_kv(k, spec))
    return bool(((got - want).abs() <= 1e-5 * (k.amax() - k.amin())).all())


@answer_check("per-channel key quantization")
def check_per_channel_keys(fake_quant: object, *, quiet: bool = False) -> CheckResult:
    """Exercise 4: ``fake_quant(k, bits, group)`` quantizes and dequantizes cached keys
    ``[batch, heads, tokens, head_dim]`` per channel: each channel's ``group`` consecutive tokens share
    an asymmetric min/max grid, ``x ≈ s q + min`` with ``s = (max - min) / (2^bits - 1)``. Compared with
    ``qlab.kvcache`` (fp32 scales) on three shapes and bit widths, within 1e-5 of each group's range."""
    from qlab.kvcache import KVQuantSpec

    fn = as_function(fake_quant, "fake_quant", "(k, bits, group) -> dequantized k")
    name = "per-channel key quantization"
    for k, bits, group in _kv_cases():
        got = call_answer(fn, "fake_quant", k.clone(), bits, group)
        if not isinstance(got, torch.Tensor) or got.shape != k.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise AnswerError(
                f"return the dequantized keys, the same shape as k {tuple(k.shape)}, got {shape}."
            )
        got = got.float()
        if not bool(torch.isfinite(got).all()):
            return report(False, name, "your result holds NaN or Inf: is a scale zero?", quiet=quiet)

        f32 = torch.float32
        if _matches(got, k, KVQuantSpec(bits, "channel", group, scale_dtype=f32)):
            continue
        token_groups = {None} | ({group} if k.shape[-1] % group == 0 else set())
        if any(_matches(got, k, KVQuantSpec(bits, "token", g, scale_dtype=f32)) for g in token_groups):
            hint = (
                "your groups run along the channels of one token (per-token). Per-channel groups run along "
                "the tokens: reduce over dim -2, in groups of `group` consecutive tokens."
            )
        elif bool(((got - k).abs() <= 1e-6).all()):
            hint = "that is k unchanged: round to 2^bits levels per group, then map the codes back."
        else:
            hint = (
                "per channel, for each run of `group` tokens: lo = min, s = (max - lo) / (2**bits - 1), "
                "q = round((k - lo) / s) clamped to [0, 2**bits - 1], then s * q + lo."
            )
        return report(False, name, hint, quiet=quiet)
    return report(True, name, "", quiet=quiet)

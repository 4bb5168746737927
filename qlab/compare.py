"""The methods table: several methods and bit widths on one real model, side by side.

:func:`compare_methods` is what ``qlab compare`` and ``benchmarks/methods_table.py`` call. For each
(method, scheme) it copies the float model, quantizes it with :func:`qlab.quantize_model` (timed),
and measures perplexity on the held-out evaluation plays; calibration windows come from the
disjoint calibration plays with a fixed seed.

SmolLM2-135M ships as a Q4_1 GGUF: its weights already sit on an int4 grid of 32 inputs, so int4
g32 would reconstruct them almost exactly. The default schemes (g128 and g64) do not line up with
that grid, so they measure the methods rather than the file format.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from qlab.config import QuantConfig
from qlab.driver import quantize_model, quantized_bits_per_weight
from qlab.registry import METHODS

#: (bits, group size) pairs of the issue's table.
DEFAULT_SCHEMES: tuple[tuple[int, int], ...] = ((4, 128), (3, 64), (2, 64))
DEFAULT_METHODS: tuple[str, ...] = ("rtn", "hqq", "hqq+scale", "gptq", "awq")
#: Table rows that run a method with non-default settings: ``label -> (method, method_kwargs)``.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"hqq+scale": ("hqq", {"optimize_scale": True})}


def fitting_group(in_features: int, group_size: int) -> int:
    """``group_size`` if it divides ``in_features``, else the smallest divisor of ``in_features`` above it."""
    if in_features % group_size == 0:
        return group_size
    return next(d for d in range(group_size + 1, in_features + 1) if in_features % d == 0)


def group_overrides(model: torch.nn.Module, group_size: int) -> dict[str, dict[str, Any]]:
    """``QuantConfig.overrides`` giving each linear whose width ``group_size`` does not divide the
    nearest group size that does (SmolLM2's 576-wide inputs take g144 for g128), so the table says so.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and m.in_features % group_size:
            out[name] = {"group_size": fitting_group(m.in_features, group_size)}
    return out


def compare_methods(
    methods: Sequence[str] = DEFAULT_METHODS,
    schemes: Sequence[tuple[int, int]] = DEFAULT_SCHEMES,
    *,
    nf4: bool = True,
    include_float: bool = True,
    n_samples: int = 32,
    seq_len: int = 256,
    eval_seq_len: int = 512,
    eval_windows: int | None = 16,
    seed: int = 0,
    method_kwargs: dict[str, dict[str, Any]] | None = None,
    loader: Callable[[], tuple[torch.nn.Module, Any]] | None = None,
    progress: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Perplexity, bits per weight and quantization time for each method at each scheme.

    Args:
        methods: weight-only method names of :data:`qlab.registry.METHODS` or
            :data:`VARIANTS` (``"hqq+scale"``: HQQ that also refits the scale).
        schemes: ``(bits, group_size)`` pairs, asymmetric integer codes.
        nf4: also add an NF4 (block 64) row.
        include_float: start with the float model's row.
        n_samples, seq_len: calibration windows for the data-driven methods.
        eval_seq_len, eval_windows: perplexity windows on the evaluation plays
            (see :func:`qlab.evaluate.perplexity`).
        method_kwargs: per-method (or variant) ``QuantConfig.method_kwargs``.
        loader: returns ``(model, tokenizer)``; default :func:`qlab.models.load_smollm2`.
        on_row: called with each row as soon as it is measured (for long runs).

    Perplexity runs every quantized layer through the fp32 reference path (dequantize, then
    ``F.linear``) so that the table compares weight quantization only, not the bf16 fast paths.

    Returns rows ``{"method", "scheme", "bits", "group_size", "bits_per_weight", "perplexity",
    "seconds", "cpu_seconds"}``, the float model first (``seconds`` 0).
    """
    from qlab import evaluate, models  # heavy (transformers); only needed here
    from qlab.nn import use_path

    weight_only = tuple(n for n, m in METHODS.items() if m.layer == "weight")
    for m in methods:
        if m not in VARIANTS and m not in weight_only:
            raise ValueError(
                f"methods: {m!r} is not a weight-only method of {weight_only} or a variant {list(VARIANTS)}"
            )
    method_kwargs = method_kwargs or {}
    model, tok = (loader or models.load_smollm2)()
    calibration = models.calibration_batches(tok, n_samples=n_samples, seq_len=seq_len, seed=seed)

    def ppl(m: torch.nn.Module) -> float:
        with use_path("reference"):
            return evaluate.perplexity(m, tok, seq_len=eval_seq_len, max_windows=eval_windows, progress=False)

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    rows: list[dict[str, Any]] = []
    if include_float:
        emit(
            {
                "method": "fp32",
                "scheme": "fp32",
                "bits": 32,
                "group_size": None,
                "bits_per_weight": 32.0,
                "perplexity": ppl(model),
                "seconds": 0.0,
                "cpu_seconds": 0.0,
            }
        )
    jobs: list[tuple[str, int, int]] = [(m, b, g) for b, g in schemes for m in methods]
    if nf4:
        jobs.append(("nf4", 4, 64))
    for label, bits, group in jobs:
        method, extra = VARIANTS.get(label, (label, {}))
        torch.manual_seed(seed)
        qmodel = copy.deepcopy(model)
        overrides = group_overrides(model, group)
        cfg = QuantConfig(
            method=method,
            bits=bits,
            group_size=group,
            overrides=overrides,
            method_kwargs={**extra, **method_kwargs.get(label, {})},
        )
        start, cpu_start = time.perf_counter(), time.process_time()
        quantize_model(qmodel, cfg, calibration if cfg.entry.calibrated else None, progress=progress)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        scheme = "nf4 b64" if method == "nf4" else f"int{bits} g{group}"
        used = sorted({o["group_size"] for o in overrides.values()})
        if used:
            scheme += " (g" + "/".join(map(str, used)) + " where it does not divide)"
        emit(
            {
                "method": label,
                "scheme": scheme,
                "bits": bits,
                "group_size": group,
                "bits_per_weight": quantized_bits_per_weight(qmodel),
                "perplexity": ppl(qmodel),
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
            }
        )
        del qmodel
    return rows


def format_table(rows: Sequence[dict[str, Any]], *, timings: bool = True) -> str:
    """Rows of :func:`compare_methods` as a Markdown table."""
    head = "| scheme | method | bits/weight | perplexity |" + (
        " time (s) | CPU time (s) |" if timings else ""
    )
    sep = "|---|---|---:|---:|" + ("---:|---:|" if timings else "")
    lines = [head, sep]
    for r in rows:
        line = f"| {r['scheme']} | {r['method']} | {r['bits_per_weight']:.3f} | {r['perplexity']:.2f} |"
        if timings:
            line += f" {r['seconds']:.1f} | {r.get('cpu_seconds', float('nan')):.1f} |"
        lines.append(line)
    return "\n".join(lines)

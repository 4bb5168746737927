"""Figures for the lessons and widgets: bit layouts, error histograms, memory bars, quality vs bits.

Every function returns a matplotlib :class:`~matplotlib.figure.Figure` created through pyplot, so a lesson
cell shows it with ``plt.show()``; none calls ``plt.show()`` itself. matplotlib is imported inside the
functions so that ``import qlab`` works without it. The numbers a figure annotates come from small pure
functions (:func:`describe_bits`, :func:`error_stats`) that tests and widgets also use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from qlab.formats import FloatFormat, Format, bits_of, format_bytes, get_format, round_to
from qlab.metrics import max_abs_error, sqnr
from qlab.quantize import QuantizedTensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: The formats the bit-layout explorer shows, widest first.
LAYOUT_FORMATS: tuple[str, ...] = ("fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2")

# One colour per bit field, used by the figure and the widgets alike.
SIGN_COLOR, EXPONENT_COLOR, MANTISSA_COLOR = "#e8a0a0", "#9cc3e6", "#b5dfa5"


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("qlab.plots needs matplotlib: pip install 'qlab[course]'") from e
    return plt


# ---------------------------------------------------------------------------------------------------------
# Bit layout


@dataclass(frozen=True)
class BitLayout:
    """A value rounded into a float format, with the fields of its bit pattern.

    ``stored = (-1)^sign * 2^(exponent - bias) * (1 + mantissa / 2^M)`` (normal codes); ``abs_error`` is
    ``|stored - value|`` and ``rel_error`` that over ``|value|`` (nan when value is 0 or not finite).
    """

    fmt: FloatFormat
    value: float
    stored: float
    sign: int
    exponent: int
    mantissa: int

    @property
    def bits(self) -> str:
        """The whole pattern as a string of 0/1, sign first."""
        E, M = self.fmt.exponent_bits, self.fmt.mantissa_bits
        return f"{self.sign}{self.exponent:0{E}b}" + (f"{self.mantissa:0{M}b}" if M else "")

    @property
    def abs_error(self) -> float:
        if not (math.isfinite(self.value) and math.isfinite(self.stored)):
            return math.nan
        return abs(self.stored - self.value)

    @property
    def rel_error(self) -> float:
        if self.value == 0 or not math.isfinite(self.abs_error):
            return math.nan
        return self.abs_error / abs(self.value)


def describe_bits(value: float, fmt: Format | str) -> BitLayout:
    """Round ``value`` into the float format ``fmt`` (ties to even) and split its bit pattern."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"value must be a Python number, got {type(value).__name__}")
    f = get_format(fmt)
    if not isinstance(f, FloatFormat):
        raise ValueError(f"fmt must be a float format (sign/exponent/mantissa), got {f.name}")
    fields = bits_of(float(value), f)
    stored = float(round_to(float(value), f))
    return BitLayout(f, float(value), stored, int(fields.sign), int(fields.exponent), int(fields.mantissa))


def _fmt_value(v: float) -> str:
    # repr: the shortest decimal that reads back as the same double, so stored values print in full.
    return repr(v) if math.isfinite(v) else str(v)


def plot_bit_layout(value: float, fmt: Format | str | Sequence[Format | str] = LAYOUT_FORMATS) -> Figure:
    """Boxes for the sign, exponent and mantissa bits of ``value`` in each format of ``fmt``.

    One row per format, labelled with the stored value and the rounding error ``|stored - value|``.
    """
    fmts = [fmt] if isinstance(fmt, (str, FloatFormat)) else list(fmt)
    if not fmts:
        raise ValueError("fmt must name at least one format")
    layouts = [describe_bits(value, f) for f in fmts]
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    width = max(lay.fmt.bits for lay in layouts)
    fig, ax = plt.subplots(figsize=(12, 0.75 * len(layouts) + 1.0))
    for row, lay in enumerate(layouts):
        y = len(layouts) - 1 - row
        E = lay.fmt.exponent_bits
        for i, bit in enumerate(lay.bits):
            color = SIGN_COLOR if i == 0 else EXPONENT_COLOR if i <= E else MANTISSA_COLOR
            ax.add_patch(
                Rectangle((i, y + 0.1), 0.95, 0.8, facecolor=color, edgecolor="black", linewidth=0.5)
            )
            ax.text(i + 0.475, y + 0.5, bit, ha="center", va="center", fontsize=9, family="monospace")
        ax.text(-0.5, y + 0.5, lay.fmt.name, ha="right", va="center", fontsize=10)
        err = "" if math.isnan(lay.abs_error) else f"   error {lay.abs_error:.3g}"
        ax.text(width + 0.5, y + 0.5, f"= {_fmt_value(lay.stored)}{err}", ha="left", va="center", fontsize=10)
    ax.set_xlim(-4, width + 14)
    ax.set_ylim(-0.2, len(layouts) + 0.2)
    ax.set_axis_off()
    handles = [
        Rectangle((0, 0), 1, 1, facecolor=c, edgecolor="black", label=n)
        for c, n in ((SIGN_COLOR, "sign"), (EXPONENT_COLOR, "exponent"), (MANTISSA_COLOR, "mantissa"))
    ]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, frameon=False)
    ax.set_title(f"bits of {_fmt_value(float(value))}")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------
# Error histogram


@dataclass(frozen=True)
class ErrorStats:
    """The numbers shown beside an error histogram. ``bits_per_weight`` is None for a bare reconstruction."""

    sqnr_db: float
    max_error: float
    bits_per_weight: float | None

    def labels(self) -> dict[str, str]:
        """Display strings, the same in figures, widgets and the browser test."""
        bpw = "n/a" if self.bits_per_weight is None else f"{self.bits_per_weight:.3f}"
        return {
            "sqnr": f"SQNR {self.sqnr_db:.2f} dB",
            "max_error": f"max error {self.max_error:.4g}",
            "bits_per_weight": f"bits per weight {bpw}",
        }


def _reconstruction(x: torch.Tensor, qt_or_xhat: QuantizedTensor | torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(qt_or_xhat, QuantizedTensor):
        xhat = qt_or_xhat.dequantize(torch.float32)
    elif isinstance(qt_or_xhat, torch.Tensor):
        xhat = qt_or_xhat
    else:
        raise TypeError(f"qt_or_xhat must be a QuantizedTensor or a tensor, got {type(qt_or_xhat).__name__}")
    if tuple(xhat.shape) != tuple(x.shape):
        raise ValueError(f"qt_or_xhat has shape {tuple(xhat.shape)}, x has {tuple(x.shape)}")
    return xhat


def error_stats(
    x: torch.Tensor, qt_or_xhat: QuantizedTensor | torch.Tensor, *, bits_per_weight: float | None = None
) -> ErrorStats:
    """SQNR (dB), max ``|x - x_hat|`` and storage bits per weight: ``bits_per_weight`` if given, else the
    QuantizedTensor's own (None for a bare reconstruction)."""
    xhat = _reconstruction(x, qt_or_xhat)
    if bits_per_weight is not None:
        if (
            isinstance(bits_per_weight, bool)
            or not isinstance(bits_per_weight, (int, float))
            or bits_per_weight <= 0
        ):
            raise ValueError(f"bits_per_weight must be a positive number, got {bits_per_weight!r}")
        bpw: float | None = float(bits_per_weight)
    else:
        bpw = qt_or_xhat.bits_per_weight if isinstance(qt_or_xhat, QuantizedTensor) else None
    return ErrorStats(sqnr(x, xhat), max_abs_error(x, xhat), bpw)


def _n_blocks(qt: QuantizedTensor) -> int:
    return math.prod(n // b for n, b in zip(qt.shape, qt.block_size, strict=True))


def quantization_grid(x: torch.Tensor, qt: QuantizedTensor, which: str = "max") -> tuple[torch.Tensor, str]:
    """The values one block of ``qt`` can represent, and which block.

    ``which="max"``: the block holding ``max |x|`` (an outlier's block); ``which="median"``: a typical block,
    the one whose scale is the median of all the blocks' scales. Every code ``q`` of that block maps to
    ``scale * (q - zero)`` (or ``scale * table[q]``). Per-tensor specs have a single block, so this is the
    whole grid.
    """
    if which not in ("max", "median"):
        raise ValueError(f"which must be 'max' or 'median', got {which!r}")
    spec, block = qt.spec, qt.block_size
    n_blocks = _n_blocks(qt)
    scales = qt.scales()
    if which == "max":
        # Which block holds the largest |x|: take the argmax position and divide by the block size per dim.
        pos = torch.unravel_index(x.detach().abs().argmax(), tuple(x.shape))
        idx = tuple(int(p) // b for p, b in zip(pos, block, strict=True))
    else:
        flat = scales.float().abs().reshape(-1)
        k = int((flat - flat.median()).abs().argmin())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(k), tuple(scales.shape)))
    scale = float(scales[idx]) if scales.dim() else float(scales)
    if qt.codebook is not None:
        grid = scale * qt.codebook.float().sort().values
    else:
        zero = 0.0 if qt.zero is None else float(qt.zero.float()[idx] if qt.zero.dim() else qt.zero)
        grid = scale * (torch.arange(spec.qmin, spec.qmax + 1, dtype=torch.float32) - zero)
    if n_blocks == 1:
        where = "the tensor's grid"
    elif which == "max":
        where = f"grid of the block holding max|x| (1 of {n_blocks})"
    else:
        where = f"grid of a typical block, median scale (1 of {n_blocks})"
    return grid, where


def _view(values: Any) -> tuple[float, float] | None:
    """An x-range that shows the bulk of ``values`` when a few outliers would squash it, else None."""
    lo, hi = (float(v) for v in np.quantile(values, [0.0005, 0.9995]))
    width = max(hi - lo, 1e-30)
    if values.max() - values.min() <= 4 * width:
        return None
    pad = 0.15 * width
    return lo - pad, hi + pad


def plot_error_histogram(
    x: torch.Tensor,
    qt_or_xhat: QuantizedTensor | torch.Tensor,
    *,
    title: str | None = None,
    bits_per_weight: float | None = None,
) -> Figure:
    """Left: histogram of ``x`` with the quantization grid drawn over it (for a QuantizedTensor). Right:
    histogram of the error ``x_hat - x``. SQNR, max error and bits per weight (see :func:`error_stats`) are
    written on the error panel.

    With one block (per-tensor) the red lines are the tensor's grid. With many blocks they are the grid of a
    typical block (median scale), which tightens as blocks shrink, and dashed grey lines are the grid of the
    block holding ``max |x|``. When a few outliers lie far from the bulk, the left panel zooms on the bulk
    (99.9% of the weights); the weights beyond are counted in its edge bars, and a note says how many.
    """
    xhat = _reconstruction(x, qt_or_xhat)
    stats = error_stats(x, qt_or_xhat, bits_per_weight=bits_per_weight)
    values = x.detach().double().flatten().numpy()
    err = (xhat.detach().double() - x.detach().double()).flatten().numpy()
    plt = _pyplot()
    fig, (ax_w, ax_e) = plt.subplots(1, 2, figsize=(11, 3.6))

    view = _view(values)
    notes = []
    if view is None:
        ax_w.hist(values, bins=120, color="#4c72b0", alpha=0.8)
    else:
        beyond = int(((values < view[0]) | (values > view[1])).sum())
        ax_w.hist(np.clip(values, *view), bins=120, range=view, color="#4c72b0", alpha=0.8)
        ax_w.set_xlim(*view)
        notes.append(f"zoomed on the bulk: {beyond} weights beyond, in the edge bars")
    if isinstance(qt_or_xhat, QuantizedTensor):
        grid, where = quantization_grid(x, qt_or_xhat)
        lines = grid.tolist()
        if _n_blocks(qt_or_xhat) > 1:
            typical, _ = quantization_grid(x, qt_or_xhat, which="median")
            for g in lines:  # the outlier's block, thin and dashed behind the typical grid
                ax_w.axvline(g, color="#555555", linewidth=0.7, linestyle="--", alpha=0.6)
            n = _n_blocks(qt_or_xhat)
            notes[:0] = [
                f"red: grid of a typical block (median scale), {typical.numel()} levels",
                f"dashed: grid of the block holding max|x| (1 of {n})",
            ]
            lines = typical.tolist()
        else:
            notes.insert(0, f"red lines: {where}, {len(lines)} levels")
        # Past ~64 levels the lines merge into a grey band; draw them thinner so the histogram stays visible.
        lw = 0.8 if len(lines) <= 64 else 0.3
        for g in lines:
            ax_w.axvline(g, color="#dd5533", linewidth=lw, alpha=0.7)
    ax_w.set_xlabel("weight value")
    ax_w.set_ylabel("count")
    ax_w.set_title("\n".join(["weights", *notes]), fontsize=9 if len(notes) > 1 else 10)

    ax_e.hist(err, bins=120, color="#55a868", alpha=0.85)
    ax_e.set_xlabel("error (dequantized - original)")
    ax_e.set_ylabel("count")
    ax_e.set_title("quantization error", fontsize=10)
    labels = stats.labels()
    ax_e.text(
        0.98,
        0.95,
        "\n".join(labels.values()),
        transform=ax_e.transAxes,
        ha="right",
        va="top",
        fontsize=9,
        bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "#999999"},
    )
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------
# Memory


def _memory_row(row: object) -> tuple[str, int, int, int]:
    """(label, weights, scales+zeros, unquantized) from a MemoryEstimate-like object or a mapping."""
    if isinstance(row, Mapping):
        get = row.get
    else:

        def get(key: str, default: object = None) -> object:
            return getattr(row, key, default)

    label = get("label")
    weights = get("weight_bytes", get("bytes"))
    if not isinstance(label, str) or weights is None:
        raise ValueError(
            "each row needs a str 'label' and 'weight_bytes' (or 'bytes'), with optional 'overhead_bytes' "
            f"and 'other_bytes'; got {row!r}"
        )
    parts = (weights, get("overhead_bytes", 0) or 0, get("other_bytes", 0) or 0)
    for p in parts:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or p < 0:
            raise ValueError(f"byte counts must be non-negative numbers, got {p!r} in row {label!r}")
    return label, int(parts[0]), int(parts[1]), int(parts[2])


def plot_memory(rows: Sequence[object], *, gpu_bytes: int | None = None, title: str | None = None) -> Figure:
    """Horizontal bars of bytes per scheme: codes (or float weights), scale/zero overhead, and the
    parameters left unquantized, stacked; each bar is labelled with its total. ``gpu_bytes`` draws a
    memory limit line, or, when it lies beyond 3x the largest bar (a small model against a large GPU), a note
    instead, so the bars keep the width of the plot. The axis is in GB, or in MB below 1 GB.

    ``rows``: :class:`qlab.picker.MemoryEstimate` objects or mappings with ``label``, ``weight_bytes``
    (or ``bytes``), and optional ``overhead_bytes`` and ``other_bytes``.
    """
    parsed = [_memory_row(r) for r in rows]
    if not parsed:
        raise ValueError("rows is empty; give at least one scheme")
    if gpu_bytes is not None and (isinstance(gpu_bytes, bool) or not gpu_bytes > 0):
        raise ValueError(f"gpu_bytes must be a positive number of bytes, got {gpu_bytes!r}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(parsed) + 1.6))
    ys = list(range(len(parsed)))[::-1]
    labels = [p[0] for p in parsed]
    largest = max(sum(p[1:]) for p in parsed)
    # GB for models of a GB or more, MB below, so that a small model's bars are not a sliver.
    unit, scale = ("GB", 1e9) if largest >= 1e9 else ("MB", 1e6)
    w = [p[1] / scale for p in parsed]
    o = [p[2] / scale for p in parsed]
    r = [p[3] / scale for p in parsed]
    ax.barh(ys, w, color="#4c72b0", label="weights / codes")
    ax.barh(ys, o, left=w, color="#dd8452", label="scales + zeros")
    ax.barh(ys, r, left=[a + b for a, b in zip(w, o, strict=True)], color="#bbbbbb", label="not quantized")
    top = largest / scale
    for y, p in zip(ys, parsed, strict=True):
        ax.text(sum(p[1:]) / scale + top * 0.01, y, format_bytes(sum(p[1:])), va="center", fontsize=9)
    if gpu_bytes is not None:
        limit = f"memory {format_bytes(gpu_bytes)}"
        if gpu_bytes <= 3 * largest:  # close enough to the bars to draw on the same axis
            ax.axvline(gpu_bytes / scale, color="#c44e52", linestyle="--", label=limit)
            top = max(top, gpu_bytes / scale)
        else:  # far beyond: drawing it would squash every bar against the left edge
            ax.text(
                0.99,
                1.01,
                f"{limit}: {gpu_bytes / largest:,.0f}x the largest bar, off this scale (every scheme fits)",
                transform=ax.transAxes,
                ha="right",
                va="bottom",
                fontsize=8,
                color="#c44e52",
            )
    ax.set_xlim(0, top * 1.18)
    ax.set_yticks(ys, labels)
    ax.set_xlabel(f"{unit} (10^{9 if unit == 'GB' else 6} bytes)")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or "memory per scheme")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------
# Quality vs bits


def plot_quality_vs_bits(
    rows: Sequence[Mapping[str, Any]],
    *,
    metric: str = "sqnr_db",
    ylabel: str | None = None,
    title: str | None = None,
    log_y: bool = False,
) -> Figure:
    """One line per method: quality ``row[metric]`` against ``row["bits"]`` (bits per weight), each point
    annotated with its value.

    ``rows``: mappings with ``method`` (str), ``bits`` (number) and ``metric`` (number), e.g.
    ``{"method": "RTN", "bits": 4.25, "sqnr_db": 19.8}`` or a perplexity with ``metric="perplexity"``.
    """
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if not isinstance(row, Mapping) or not {"method", "bits", metric} <= set(row):
            raise ValueError(f"each row must be a mapping with 'method', 'bits' and {metric!r}; got {row!r}")
        series.setdefault(str(row["method"]), []).append((float(row["bits"]), float(row[metric])))
    if not series:
        raise ValueError("rows is empty")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, pts in series.items():
        pts.sort()
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, marker="o", label=method)
        for xv, yv in pts:
            ax.annotate(f"{yv:.3g}", (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("bits per weight")
    ax.set_ylabel(ylabel or metric)
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title(title or f"{ylabel or metric} vs bits")
    fig.tight_layout()
    return fig


def figure_png(fig: Figure, *, close: bool = True, dpi: int = 80) -> bytes:
    """PNG bytes of ``fig`` (what the widgets show); closes it so pyplot does not display it again."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    if close:
        _pyplot().close(fig)
    return buf.getvalue()


__all__ = [
    "LAYOUT_FORMATS",
    "BitLayout",
    "ErrorStats",
    "describe_bits",
    "error_stats",
    "quantization_grid",
    "plot_bit_layout",
    "plot_error_histogram",
    "plot_memory",
    "plot_quality_vs_bits",
    "figure_png",
]

"""qlab.plots: the numbers each figure annotates, checked against plain torch, and the figures' structure."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from qlab.codebooks import quantize_nf4  # noqa: E402
from qlab.formats import describe_bits, format_bytes  # noqa: E402
from qlab.plots import (  # noqa: E402
    error_stats,
    figure_png,
    plot_bit_layout,
    plot_error_histogram,
    plot_memory,
    plot_quality_vs_bits,
    quantization_grid,
)
from qlab.quantize import QuantSpec, quantize  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts] + [t.get_text() for t in fig.texts]


# Each torch dtype with the unsigned int of its width, to read its bit pattern independently of qlab.
_TORCH = {
    "fp32": (torch.float32, torch.int32),
    "fp16": (torch.float16, torch.int16),
    "bf16": (torch.bfloat16, torch.int16),
    "fp8_e4m3": (torch.float8_e4m3fn, torch.uint8),
    "fp8_e5m2": (torch.float8_e5m2, torch.uint8),
}


def _torch_bits(value: float, name: str) -> tuple[str, float]:
    dtype, itype = _TORCH[name]
    t = torch.tensor([value], dtype=torch.float32).to(dtype)
    width = torch.finfo(dtype).bits
    code = int(t.view(itype).item()) & (2**width - 1)
    return format(code, f"0{width}b"), float(t.float().item())


@pytest.mark.parametrize("name", list(_TORCH))
@pytest.mark.parametrize("value", [0.1, -2.5, 1.0, 3e-5, 65504.0, 0.0, -0.0, 1e-8])
def test_describe_bits_matches_torch_casts(name, value):
    lay = describe_bits(value, name)
    bits, stored = _torch_bits(value, name)
    assert lay.bits == bits
    assert lay.stored == stored or (math.isnan(stored) and math.isnan(lay.stored))
    if math.isfinite(stored):
        assert lay.abs_error == pytest.approx(abs(stored - value), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.floats(min_value=-400, max_value=400, allow_nan=False, width=32))
def test_describe_bits_property_fp8_and_bf16(value):
    for name in ("bf16", "fp8_e4m3"):
        assert describe_bits(value, name).bits == _torch_bits(value, name)[0]


def test_describe_bits_errors():
    assert math.isnan(describe_bits(0.0, "fp16").rel_error)
    assert describe_bits(0.1, "fp16").rel_error == pytest.approx(abs(0.0999755859375 - 0.1) / 0.1)
    with pytest.raises(TypeError, match="value"):
        describe_bits("0.1", "fp16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="float format"):
        describe_bits(0.1, "int8")
    with pytest.raises(ValueError, match="unknown format"):
        describe_bits(0.1, "fp12")


def test_plot_bit_layout_draws_every_bit_and_annotates_values():
    fig = plot_bit_layout(0.1, ["fp32", "fp16", "fp8_e4m3"])
    texts = _texts(fig)
    bit_texts = [t for t in texts if t in ("0", "1")]
    assert len(bit_texts) == 32 + 16 + 8
    assert len(fig.axes[0].patches) == 32 + 16 + 8
    for name in ("fp32", "fp16", "fp8_e4m3"):
        assert name in texts
    assert any(t.startswith("= 0.0999755859375") and "error 2.44e-05" in t for t in texts)
    assert any(t.startswith("= 0.1015625") for t in texts)
    assert fig.axes[0].get_title() == "bits of 0.1"
    # one format as a plain string works too
    assert len([t for t in _texts(plot_bit_layout(-1.5, "bf16")) if t in ("0", "1")]) == 16
    with pytest.raises(ValueError, match="at least one"):
        plot_bit_layout(0.1, [])


def _weights(seed: int = 0, shape=(32, 256)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "spec",
    [QuantSpec.per_tensor(8), QuantSpec.per_channel(4, symmetric=False), QuantSpec.per_group(3, 64)],
    ids=lambda s: s.describe(),
)
def test_error_stats_match_plain_torch(spec):
    x = _weights()
    qt = quantize(x, spec)
    xhat = qt.dequantize()
    e = xhat.double() - x.double()
    ref_sqnr = 10 * math.log10(x.double().pow(2).sum().item() / e.pow(2).sum().item())
    stats = error_stats(x, qt)
    assert stats.sqnr_db == pytest.approx(ref_sqnr, rel=1e-9)
    assert stats.max_error == pytest.approx(e.abs().max().item(), rel=1e-12)
    # storage: packed codes + fp32 scales (+ fp32 zeros when asymmetric)
    n_scales = qt.scale.numel()
    ref_bytes = math.ceil(x.numel() * spec.bits / 8) + 4 * n_scales * (1 if spec.symmetric else 2)
    assert stats.bits_per_weight == pytest.approx(8 * ref_bytes / x.numel())
    assert error_stats(x, xhat).bits_per_weight is None


def test_error_stats_labels_are_rounded_strings():
    x = _weights()
    labels = error_stats(x, quantize(x, QuantSpec.per_group(4, 64))).labels()
    assert labels["sqnr"].startswith("SQNR ") and labels["sqnr"].endswith(" dB")
    assert labels["bits_per_weight"] == "bits per weight 5.000"  # 4 + (32 + 32) / 64
    assert error_stats(x, x.clone() * 1.01).labels()["bits_per_weight"] == "bits per weight n/a"


def test_quantization_grid_per_tensor_is_every_code():
    x = _weights()
    qt = quantize(x, QuantSpec.per_tensor(8))
    grid, where = quantization_grid(x, qt)
    assert where == "the tensor's grid"
    scale = x.abs().max() / 127
    torch.testing.assert_close(grid, scale * torch.arange(-127, 128, dtype=torch.float32))
    # every reconstructed value lies on the grid
    assert torch.isin(qt.dequantize().unique(), grid).all()


def test_quantization_grid_is_that_of_the_block_holding_max():
    x = _weights() * 0.1
    x[5, 70] = 3.0  # row 5, group 1 (64..127) holds the max
    qt = quantize(x, QuantSpec.per_group(4, 64, symmetric=False))
    grid, where = quantization_grid(x, qt)
    assert "1 of 128" in where
    block = x[5, 64:128]
    lo, hi = min(block.min().item(), 0.0), block.max().item()
    scale = (hi - lo) / 15
    zero = round(-lo / scale)
    ref = scale * (torch.arange(16, dtype=torch.float32) - zero)
    torch.testing.assert_close(grid, ref, rtol=1e-5, atol=1e-6)
    assert torch.isin(qt.dequantize()[5, 64:128], grid).all()


def test_quantization_grid_of_nf4_is_scaled_table():
    x = _weights()
    qt = quantize_nf4(x, 64)
    grid, _ = quantization_grid(x, qt)
    assert grid.numel() == 16
    assert grid.max().item() == pytest.approx(x.abs().max().item(), rel=1e-6) or grid.min().item() == (
        pytest.approx(-x.abs().max().item(), rel=1e-6)
    )


def test_plot_error_histogram_structure_and_annotation():
    x = _weights()
    qt = quantize(x, QuantSpec.per_group(4, 64))
    fig = plot_error_histogram(x, qt, title="int4 g64")
    ax_w, ax_e = fig.axes
    assert ax_w.get_xlabel() == "weight value" and ax_e.get_xlabel().startswith("error")
    assert len(ax_w.patches) == 120 and len(ax_e.patches) == 120  # histogram bars
    # one red line per int4 level of a typical block, and one dashed line per level of the max block
    assert len(ax_w.lines) == 32
    red = [ln for ln in ax_w.lines if ln.get_linestyle() == "-"]
    assert len(red) == 16 and "16 levels" in ax_w.get_title()
    note = "\n".join(t.get_text() for t in ax_e.texts)
    for text in error_stats(x, qt).labels().values():
        assert text in note
    assert fig._suptitle is not None and fig._suptitle.get_text() == "int4 g64"
    # the histogram counts every weight
    assert sum(p.get_height() for p in ax_w.patches) == x.numel()


def test_quantization_grid_median_block_is_a_typical_one():
    x = _weights() * 0.1
    x[5, 70] = 3.0
    qt = quantize(x, QuantSpec.per_group(4, 64, symmetric=True))
    typical, where = quantization_grid(x, qt, which="median")
    assert "median" in where
    step = (typical[1] - typical[0]).item()
    assert step == pytest.approx(qt.scales().median().item(), rel=0.05)  # near the median step...
    outlier, _ = quantization_grid(x, qt)
    assert (outlier[1] - outlier[0]).item() > 5 * step  # ...far finer than the outlier block's
    with pytest.raises(ValueError, match="which"):
        quantization_grid(x, qt, which="min")


def _red_step(fig) -> float:
    red = sorted(ln.get_xdata()[0] for ln in fig.axes[0].lines if ln.get_linestyle() == "-")
    return red[1] - red[0]


def test_plot_error_histogram_changes_with_group_size_around_an_outlier():
    # lesson 03: with one outlier, g64 and g16 must not draw the same picture (the outlier's block grid)
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(4)) * 0.05
    x[10, 100] = 8.0
    figs = {g: plot_error_histogram(x, quantize(x, QuantSpec.per_group(4, g))) for g in (16, 64, 256)}
    steps = {g: _red_step(f) for g, f in figs.items()}
    assert steps[16] < steps[64] < steps[256]  # a typical block's grid tightens as groups shrink
    ax = figs[64].axes[0]
    lo, hi = ax.get_xlim()
    assert hi < 1.0  # zoomed on the bulk, not stretched to the outlier at 8
    beyond = int(((x < lo) | (x > hi)).sum())
    assert 1 <= beyond <= 0.002 * x.numel() and f"{beyond} weights beyond" in ax.get_title()
    assert sum(p.get_height() for p in ax.patches) == x.numel()  # still counts every weight
    per_tensor = plot_error_histogram(x, quantize(x, QuantSpec.per_tensor(4)))
    assert all(ln.get_linestyle() == "-" for ln in per_tensor.axes[0].lines)  # one block, one grid
    for f in (*figs.values(), per_tensor):
        plt.close(f)


def test_plot_error_histogram_with_plain_reconstruction_has_no_grid():
    x = _weights()
    fig = plot_error_histogram(x, x.half().float())
    assert len(fig.axes[0].lines) == 0
    assert "bits per weight n/a" in fig.axes[1].texts[0].get_text()


def test_bits_per_weight_override():
    x = _weights()
    xhat = x.half().float()
    assert error_stats(x, xhat, bits_per_weight=16).labels()["bits_per_weight"] == "bits per weight 16.000"
    fig = plot_error_histogram(x, xhat, bits_per_weight=16)
    assert "bits per weight 16.000" in fig.axes[1].texts[0].get_text()
    with pytest.raises(ValueError, match="bits_per_weight"):
        error_stats(x, xhat, bits_per_weight=0)


def test_plot_error_histogram_bad_inputs():
    x = _weights()
    with pytest.raises(ValueError, match="shape"):
        plot_error_histogram(x, x[:3])
    with pytest.raises(TypeError, match="qt_or_xhat"):
        plot_error_histogram(x, 1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="x must be"):
        plot_error_histogram([1.0], x)  # type: ignore[arg-type]


def test_plot_memory_stacks_parts_and_labels_totals():
    rows = [
        {"label": "bf16", "weight_bytes": 16 * 10**9},
        {"label": "int4 g128", "weight_bytes": 4 * 10**9, "overhead_bytes": 2.5e8, "other_bytes": 10**9},
    ]
    fig = plot_memory(rows, gpu_bytes=12 * 10**9, title="demo")
    ax = fig.axes[0]
    assert len(ax.patches) == 3 * len(rows)
    texts = _texts(fig)
    assert format_bytes(16 * 10**9) in texts and format_bytes(5_250_000_000) in texts
    widths = sorted(round(p.get_width(), 6) for p in ax.patches)
    assert widths == sorted([16.0, 0.0, 0.0, 4.0, 0.25, 1.0])
    ticks = {t.get_text(): y for t, y in zip(ax.get_yticklabels(), ax.get_yticks(), strict=True)}
    assert ticks["bf16"] > ticks["int4 g128"]  # the first row is drawn on top
    assert any(line.get_xdata()[0] == 12.0 for line in ax.lines)  # the GPU line, in GB
    assert ax.get_title() == "demo"


def test_plot_memory_keeps_a_small_models_bars_wide():
    # a 135M model against a 24 GB GPU: the line would squash every bar; the axis stays on the bars (in MB)
    rows = [{"label": "fp32", "weight_bytes": 538 * 10**6}, {"label": "int4", "weight_bytes": 70 * 10**6}]
    fig = plot_memory(rows, gpu_bytes=24 * 10**9)
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("MB")
    assert max(p.get_width() for p in ax.patches) == pytest.approx(538.0)
    assert ax.get_xlim()[1] < 538 * 1.5  # the largest bar spans most of the axis
    assert not ax.lines and any("off this scale" in t for t in _texts(fig))
    plt.close(fig)


def test_plot_memory_bad_rows():
    with pytest.raises(ValueError, match="empty"):
        plot_memory([])
    with pytest.raises(ValueError, match="label"):
        plot_memory([{"bytes": 3}])
    with pytest.raises(ValueError, match="non-negative"):
        plot_memory([{"label": "a", "bytes": -1}])
    with pytest.raises(ValueError, match="gpu_bytes"):
        plot_memory([{"label": "a", "bytes": 1}], gpu_bytes=0)


def test_plot_quality_vs_bits_lines_and_annotations():
    rows = [
        {"method": "RTN", "bits": 4, "sqnr_db": 19.5},
        {"method": "RTN", "bits": 2, "sqnr_db": 6.1},
        {"method": "HQQ", "bits": 2, "sqnr_db": 9.0},
    ]
    fig = plot_quality_vs_bits(rows, ylabel="SQNR (dB)")
    ax = fig.axes[0]
    assert len(ax.lines) == 2
    rtn = ax.lines[0]
    assert list(rtn.get_xdata()) == [2.0, 4.0]  # sorted by bits
    assert {"19.5", "6.1", "9"} <= set(_texts(fig))
    assert ax.get_ylabel() == "SQNR (dB)" and ax.get_xlabel() == "bits per weight"
    assert plot_quality_vs_bits(rows, metric="sqnr_db", log_y=True).axes[0].get_yscale() == "log"
    with pytest.raises(ValueError, match="perplexity"):
        plot_quality_vs_bits(rows, metric="perplexity")
    with pytest.raises(ValueError, match="empty"):
        plot_quality_vs_bits([])


def test_figure_png_closes_the_figure():
    fig = plot_quality_vs_bits([{"method": "a", "bits": 1, "sqnr_db": 1}])
    png = figure_png(fig)
    assert png.startswith(b"\x89PNG")
    assert not plt.fignum_exists(fig.number)


def test_grid_and_stats_of_a_block_scaled_tensor():
    from qlab.scaled_floats import quantize_mxfp4, quantize_nvfp4

    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    x[2, 40] = 9.0  # the largest |x|: block (2, 1); floor(log2 9) - 2 = 1, so X = 2
    mx = quantize_mxfp4(x)
    grid, where = quantization_grid(x, mx)
    e2m1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    assert torch.equal(grid.unique(), 2 * torch.cat([-e2m1.flip(0), e2m1]).unique())
    assert "1 of 16" in where
    stats = error_stats(x, mx)
    assert stats.bits_per_weight == 4.25
    nv = quantize_nvfp4(x)
    assert error_stats(x, nv).bits_per_weight == 4.5 + 32 / x.numel()

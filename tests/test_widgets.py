"""qlab.widgets: build each explorer, drive its controls programmatically, check labels and figure change."""

from __future__ import annotations

import pytest
import torch

ipywidgets = pytest.importorskip("ipywidgets")
matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from qlab.codebooks import quantize_nf4  # noqa: E402
from qlab.picker import Recommendation, estimate_memory  # noqa: E402
from qlab.plots import error_stats  # noqa: E402
from qlab.quantize import QuantSpec, quantize  # noqa: E402
from qlab.widgets import (  # noqa: E402
    LIVE_NOTE,
    available_methods,
    bit_layout_explorer,
    default_tensors,
    error_histogram_explorer,
    explorer_quantize,
    flip_bit,
    memory_calculator,
    method_picker,
    output_sqnr,
    reconstruct,
)
from qlab.widgets import _parse_count as parse_count  # noqa: E402


@pytest.fixture(autouse=True)
def _no_open_figures():
    yield
    # widgets render figures to PNG and must close them, or pyplot would show them again in a notebook
    assert plt.get_fignums() == [], "a widget left a pyplot figure open"
    plt.close("all")


def _plain(label) -> str:
    return label.value.replace("<b>", "").replace("</b>", "")


# ---- bit-layout explorer ---------------------------------------------------------------------------------


def _fp16_bits(v: float) -> str:
    return format(int(torch.tensor([v]).half().view(torch.int16).item()) & 0xFFFF, "016b")


def test_flip_bit_matches_flipping_the_torch_pattern():
    for value, index in [(0.1, 0), (0.1, 1), (1.0, 15), (-3.0, 5), (65504.0, 5)]:
        code = int(_fp16_bits(value), 2) ^ (1 << (15 - index))
        ref = torch.tensor([code], dtype=torch.int32).to(torch.int16).view(torch.float16).float().item()
        got = flip_bit(value, "fp16", index)
        assert got == ref or (ref != ref and got != got)  # NaN == NaN here
    with pytest.raises(ValueError, match="index"):
        flip_bit(0.1, "fp16", 16)
    with pytest.raises(ValueError, match="float format"):
        flip_bit(0.1, "int8", 0)


def test_bit_layout_explorer_shows_bits_and_flips_on_click():
    box = bit_layout_explorer(0.1)
    table = box.labels["bits"]
    assert _fp16_bits(0.1)[:6] in table.value.replace('</span><span style="background:#9cc3e6">', "")
    assert "0.0999755859375" in table.value  # fp16's stored value, printed in full
    for fmt in ("fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2"):
        assert f"qlab-bits-{fmt}" in table.value
    before = table.value
    box.controls["value"].value = "2.5"
    assert table.value != before and "2.5" in table.value
    # one button per bit of the format chosen for flipping (fp16 by default); clicking the sign bit negates
    buttons = box.controls["bits"].children
    assert [b.description for b in buttons] == list(_fp16_bits(2.5))
    buttons[0].click()
    assert float(box.controls["value"].value) == -2.5
    box.controls["format"].value = "fp8_e4m3"
    assert len(box.controls["bits"].children) == 8
    box.controls["value"].value = "not a number"
    assert "not a number" in box.labels["status"].value
    assert "-2.5" in table.value  # the last good value stays on screen


def test_bit_layout_explorer_picks_tensor_elements_and_static_figure():
    t = torch.tensor([0.5, -7.25, 3e-6])
    box = bit_layout_explorer(tensor=t)
    box.controls["element"].value = 1
    assert float(box.controls["value"].value) == -7.25
    fig = bit_layout_explorer(0.1, static=True)
    assert isinstance(fig, Figure)
    plt.close(fig)
    with pytest.raises(ValueError, match="float formats"):
        bit_layout_explorer(formats=("fp16", "int8"))


# ---- error-histogram explorer ----------------------------------------------------------------------------


def test_explorer_quantize_is_plain_quantize_for_rtn_and_nf4():
    x = default_tensors()["normal 256x512"]
    qt = explorer_quantize(x, "RTN", 3, True, "channel", 64)
    assert torch.equal(qt.dequantize(), quantize(x, QuantSpec.per_channel(3, symmetric=True)).dequantize())
    nf4 = explorer_quantize(x, "NF4", 7, True, "group", 128)  # bits and symmetric are ignored for NF4
    assert torch.equal(nf4.dequantize(), quantize_nf4(x, 128).dequantize())
    per_row = explorer_quantize(x, "NF4", 4, False, "channel", 64)
    assert torch.equal(per_row.dequantize(), quantize_nf4(x, 512).dequantize())
    with pytest.raises(ValueError, match="NF4 scales blocks"):
        explorer_quantize(x, "NF4", 4, False, "tensor", 64)
    with pytest.raises(ValueError, match="method"):
        explorer_quantize(x, "SpQR")
    assert {"RTN", "NF4", "FP4"} <= set(available_methods())


def test_error_histogram_explorer_labels_follow_the_controls():
    box = error_histogram_explorer(bits=2)
    c, labels = box.controls, box.labels
    x = default_tensors()["normal 256x512"]
    ref = error_stats(x, quantize(x, QuantSpec.per_group(2, 64, symmetric=False))).labels()
    assert _plain(labels["sqnr"]) == ref["sqnr"]
    assert _plain(labels["max_error"]) == ref["max_error"]
    assert _plain(labels["bits_per_weight"]) == ref["bits_per_weight"] == "bits per weight 3.000"
    png2 = bytes(box.image.value)  # ipywidgets hands the PNG back as a memoryview
    assert png2.startswith(b"\x89PNG")

    def db() -> float:
        return float(_plain(labels["sqnr"]).split()[1])

    sqnr2 = db()
    c["bits"].value = 8
    assert db() > sqnr2 + 30  # ~6 dB per bit
    assert bytes(box.image.value) != png2
    c["granularity"].value = "tensor"
    assert c["group_size"].disabled
    assert _plain(labels["bits_per_weight"]) == "bits per weight 8.000"
    c["method"].value = "NF4"
    assert c["bits"].disabled
    assert "NF4 scales blocks" in labels["status"].value  # impossible combination explained...
    # ...and nothing stale left on screen: no numbers, no picture of the previous setting
    assert all(_plain(labels[k]) == "" for k in ("sqnr", "max_error", "bits_per_weight"))
    assert bytes(box.image.value) == b""
    c["bits"].value = 3  # still impossible after a further change: still blank
    assert _plain(labels["sqnr"]) == "" and bytes(box.image.value) == b""
    c["granularity"].value = "group"
    assert _plain(labels["bits_per_weight"]) == "bits per weight 4.500"  # fp32 absmax per 64
    c["tensor"].value = "normal + outliers 256x512"
    assert "normal + outliers" not in labels["status"].value
    assert bytes(box.image.value) != png2


def test_error_histogram_explorer_on_named_tensors_with_custom_method_and_static():
    w = {"layer.0": torch.randn(8, 48, generator=torch.Generator().manual_seed(3))}
    mine = {"MINE": lambda x, spec: quantize(x, spec)}  # a custom quantizer is just a callable
    box = error_histogram_explorer(w, methods=mine)
    assert box.controls["group_size"].value == 16  # 64 does not divide 48
    box.controls["method"].value = "MINE"
    assert "int4 asym g16" in box.labels["status"].value
    fig = error_histogram_explorer(w, static=True)
    assert isinstance(fig, Figure) and "layer.0" in fig._suptitle.get_text()
    plt.close(fig)
    with pytest.raises(TypeError, match="layer"):
        error_histogram_explorer({"layer": torch.arange(4)})
    with pytest.raises(ValueError, match="empty"):
        error_histogram_explorer({})


def test_error_histogram_explorer_gptq_with_inputs_reports_output_sqnr():
    pytest.importorskip("qlab.methods.gptq")
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 128, generator=g)
    x = torch.randn(256, 128, generator=g) * torch.exp(torch.randn(128, generator=g))
    box = error_histogram_explorer({"w": w, "v": w.clone()}, inputs={"w": x}, bits=3)
    c, labels = box.controls, box.labels
    out_rtn = float(_plain(labels["output_sqnr"]).split()[2])
    qt = quantize(w, QuantSpec.per_group(3, 64, symmetric=False))
    assert out_rtn == pytest.approx(output_sqnr(w, qt.dequantize(), x), abs=0.006)
    ref = 10 * torch.log10(
        (x.double() @ w.double().T).pow(2).sum()
        / (x.double() @ (w - qt.dequantize()).double().T).pow(2).sum()
    )
    assert output_sqnr(w, qt.dequantize(), x) == pytest.approx(ref.item())
    c["method"].value = "GPTQ"
    out_gptq = float(_plain(labels["output_sqnr"]).split()[2])
    assert out_gptq > out_rtn  # GPTQ minimizes the output error
    c["tensor"].value = "v"
    assert "GPTQ needs layer inputs for v" in labels["status"].value
    if "AWQ" in c["method"].options:
        c["tensor"].value = "w"
        c["method"].value = "AWQ"
        assert float(_plain(labels["output_sqnr"]).split()[2]) > out_rtn
        # codes, fp32 scale + zero per 64, fp32 input scale s per column: 3 + 1 + 32 * 128 / (64 * 128)
        assert _plain(labels["bits_per_weight"]) == "bits per weight 4.500"
    with pytest.raises(ValueError, match="names no tensor"):
        error_histogram_explorer({"w": w}, inputs={"u": x})


# ---- memory calculator -----------------------------------------------------------------------------------


def test_parse_count():
    assert parse_count("7e9") == 7 * 10**9
    assert parse_count("135M") == 135 * 10**6
    assert parse_count(" 1,500,000 ") == 1_500_000
    assert parse_count("70b") == 70 * 10**9
    with pytest.raises(ValueError):
        parse_count("lots")
    with pytest.raises(ValueError, match="positive"):
        parse_count("0")


def test_memory_calculator_fits_label_and_custom_counts():
    box = memory_calculator()
    c, fits = box.controls, box.labels["fits"]
    total = estimate_memory("Llama-3-8B", "int4 asym g128").total
    assert _plain(fits) == f"int4 asym g128: {total / 1e9:.2f} GB, fits in 24.0 GB: yes"
    png = bytes(box.image.value)
    c["scheme"].value = "fp32"
    assert _plain(fits).endswith("fits in 24.0 GB: no")
    c["memory"].value = 80 * 10**9
    assert _plain(fits).endswith("fits in 80.0 GB: yes")
    assert bytes(box.image.value) != png
    assert c["params"].disabled
    c["model"].value = "custom"
    assert not c["params"].disabled
    c["params"].value = "70B"
    assert _plain(fits).startswith("fp32: 280 GB")
    c["params"].value = "many"
    assert "parameter count" in box.labels["status"].value
    assert _plain(fits) == "" and bytes(box.image.value) == b""  # no stale answer beside the error
    c["params"].value = "7B"
    assert _plain(fits).startswith("fp32: 28.0 GB") and box.labels["status"].value.startswith("custom")
    fig = memory_calculator(model="SmolLM2-135M", static=True)
    assert isinstance(fig, Figure) and len(fig.axes[0].patches) == 3 * 10
    plt.close(fig)
    with pytest.raises(ValueError, match="model"):
        memory_calculator(model="GPT-5")


# ---- method picker ---------------------------------------------------------------------------------------


def test_method_picker_updates_recommendation():
    box = method_picker()
    c, rec = box.controls, box.labels["recommendation"]
    assert "<code>awq</code>" in rec.value and "fits in 24.0 GB" in rec.value
    c["calibration"].value = False
    assert "<code>hqq</code>" in rec.value
    c["finetune"].value = True
    assert "<code>nf4</code>" in rec.value
    c["finetune"].value = False
    c["hardware"].value = "datacenter_gpu"
    c["target_bits"].value = 8
    assert c["memory"].value == 80 * 10**9
    assert "<code>fp8</code>" in rec.value and "fits in 80.0 GB" in rec.value
    c["model"].value = "Llama-3-70B"
    c["memory"].value = 40 * 10**9
    assert "does NOT fit" in rec.value
    static = method_picker(hardware="cpu", target_bits=2, calibration=False, static=True)
    # no data-free method held up at 2 bits in lesson 06
    assert isinstance(static, Recommendation) and static.method == "rtn"
    with pytest.raises(ValueError, match="hardware"):
        method_picker(hardware="abacus")


def test_default_tensors_are_seeded():
    a, b = default_tensors(0), default_tensors(0)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["normal 256x512"], default_tensors(1)["normal 256x512"])
    out = a["normal + outliers 256x512"]
    assert out.abs().max() > 5 * a["normal 256x512"].abs().max()


def test_reconstruct_undoes_awq_column_scales():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    s = torch.linspace(0.5, 2.0, 64)
    qt = quantize(x * s, QuantSpec.per_group(8, 32))
    xhat, grid_qt, bpw = reconstruct(x, (qt, s))
    torch.testing.assert_close(xhat, qt.dequantize() / s)
    assert grid_qt is None and bpw == pytest.approx(qt.bits_per_weight + 32 * 64 / x.numel())
    plain, same, plain_bpw = reconstruct(x, qt)
    assert same is qt and plain_bpw == qt.bits_per_weight and torch.equal(plain, qt.dequantize())


def test_error_histogram_explorer_counts_the_scale_dtype_it_shows():
    # lesson 03 counts fp16 scales and zeros: the explorer started with scale_dtype=fp16 must agree with
    # QuantizedTensor.bits_per_weight of the same spec (int4 asym g128: 4 + 32/128 = 4.25, not fp32's 4.5)
    w = {"w": torch.randn(64, 1536, generator=torch.Generator().manual_seed(0))}
    box = error_histogram_explorer(w, scale_dtype=torch.float16)
    c, labels = box.controls, box.labels
    c["group_size"].value = 128
    assert _plain(labels["bits_per_weight"]) == "bits per weight 4.250"
    assert "fp16 scales" in labels["status"].value
    c["group_size"].value = 16
    assert _plain(labels["bits_per_weight"]) == "bits per weight 6.000"
    c["granularity"].value = "channel"
    ref = quantize(w["w"], QuantSpec.per_channel(4, symmetric=False, scale_dtype=torch.float16))
    assert _plain(labels["bits_per_weight"]) == f"bits per weight {ref.bits_per_weight:.3f}"
    c["scale_dtype"].value = torch.float32  # the control switches the count back
    assert _plain(labels["bits_per_weight"]) == f"bits per weight {4 + 64 / 1536:.3f}"
    assert "fp32 scales" in labels["status"].value
    fig = error_histogram_explorer(w, scale_dtype=torch.float16, static=True)
    assert "fp16 scales" in fig._suptitle.get_text()
    plt.close(fig)
    with pytest.raises(ValueError, match="scale_dtype"):
        error_histogram_explorer(w, scale_dtype=torch.int8)


def test_error_histogram_explorer_blanks_hqq_symmetric_then_recovers():
    pytest.importorskip("qlab.methods.hqq")
    box = error_histogram_explorer({"w": torch.randn(32, 128, generator=torch.Generator().manual_seed(1))})
    c, labels = box.controls, box.labels
    c["method"].value = "HQQ"
    assert _plain(labels["sqnr"]).startswith("SQNR")
    c["symmetric"].value = True  # HQQ optimizes the zero-point: impossible
    assert "asymmetric" in labels["status"].value
    assert _plain(labels["sqnr"]) == "" and bytes(box.image.value) == b""
    c["symmetric"].value = False
    assert _plain(labels["sqnr"]).startswith("SQNR") and bytes(box.image.value).startswith(b"\x89PNG")


def test_live_widgets_show_one_line_of_plain_text():
    # GitHub and viewers without a kernel show text/plain: a one-line note, never `VBox(children=(...`
    for box in (bit_layout_explorer(0.1), error_histogram_explorer(), memory_calculator(), method_picker()):
        bundle = box._repr_mimebundle_()
        assert bundle["text/plain"] == LIVE_NOTE
        assert "application/vnd.jupyter.widget-view+json" in bundle
        assert isinstance(box, ipywidgets.VBox)


def test_error_histogram_explorer_offers_the_scaled_floats():
    from qlab.scaled_floats import quantize_fp8, quantize_mxfp4, quantize_nvfp4

    x = torch.randn(32, 128, generator=torch.Generator().manual_seed(2))
    box = error_histogram_explorer({"w": x})
    c, labels = box.controls, box.labels
    for method, ref in (("MXFP4", quantize_mxfp4(x)), ("NVFP4", quantize_nvfp4(x))):
        c["method"].value = method
        assert _plain(labels["sqnr"]) == error_stats(x, ref).labels()["sqnr"]
        assert _plain(labels["bits_per_weight"]) == f"bits per weight {ref.bits_per_weight:.3f}"
        assert c["granularity"].disabled and c["group_size"].disabled and c["bits"].disabled
    assert _plain(labels["bits_per_weight"]) == "bits per weight 4.508"  # 4.5 + 32 / 4096
    c["method"].value = "FP8"
    c["granularity"].value = "group"  # FP8 scales per tensor or per row only
    assert "per tensor or per row" in labels["status"].value and _plain(labels["sqnr"]) == ""
    c["granularity"].value = "channel"
    assert _plain(labels["sqnr"]) == error_stats(x, quantize_fp8(x, "row")).labels()["sqnr"]
    assert "fp8_e4m3_row, fp32 scales" in labels["status"].value

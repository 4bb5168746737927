"""Interactive explorers for the lessons: ipywidgets controls wired to :mod:`qlab.plots` and
:mod:`qlab.picker`.

Each function returns an ``ipywidgets.VBox``. The figure lives in one ``ipywidgets.Image`` whose PNG bytes are
replaced on every change, so the picture swaps in place without flicker; the numbers sit in ``HTML`` labels
with stable CSS classes (``qlab-sqnr``, ``qlab-max-error``, ``qlab-bpw``, ...) that the browser test reads;
each control carries ``qlab-control-<name>`` (``qlab-control-bits``, ``qlab-control-granularity``, ...).
For tests and curious readers the returned box carries three plain attributes:

* ``box.controls``: name -> control widget (set ``.value`` to drive it programmatically);
* ``box.labels``: name -> ``HTML`` label widget;
* ``box.image``: the ``Image`` widget (``None`` for the HTML-only explorers).

Sliders update on release (``continuous_update=False``) so a drag recomputes once, not fifty times.

``static=True`` returns what the widget shows at its default settings (a matplotlib figure; a
:class:`~qlab.picker.Recommendation` for the method picker) for notebooks viewed without a kernel (GitHub,
nbval). ipywidgets is imported inside the functions so ``import qlab`` works without it.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from qlab.explorer import (  # re-exported: the explorer's computations, without widgets
    Quantizer,
    available_methods,
    awq_method,
    data_methods,
    default_tensors,
    explorer_quantize,
    gptq_method,
    output_sqnr,
    reconstruct,
)
from qlab.formats import FloatFormat, describe_bits, format_bytes, from_code, get_format
from qlab.picker import (
    DEFAULT_MEMORY,
    HARDWARE,
    MODELS,
    SCHEMES,
    ModelEntry,
    estimate_memory,
    recommend,
)
from qlab.plots import (
    EXPONENT_COLOR,
    LAYOUT_FORMATS,
    MANTISSA_COLOR,
    SIGN_COLOR,
    error_stats,
    figure_png,
    plot_bit_layout,
    plot_error_histogram,
    plot_memory,
)
from qlab.quantize import QuantizedTensor
from qlab.scaled_floats import ScaledTensor, quantize_fp8, quantize_mxfp4, quantize_nvfp4
from qlab.tensor import QuantSpec


def _ipywidgets() -> Any:
    try:
        import ipywidgets
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("qlab.widgets needs ipywidgets: pip install 'qlab[course]'") from e
    return ipywidgets


def _label(w: Any, css: str, text: str = "") -> Any:
    lab = w.HTML(value=text)
    lab.add_class(css)
    return lab


LIVE_NOTE = "(a live qlab widget: it runs in Jupyter with a kernel; the static figure shows its default view)"
"""A live widget's plain-text form: what GitHub, nbconvert or any viewer without a widget manager shows."""


def _live_box_class(w: Any) -> type:
    class LiveBox(w.VBox):  # type: ignore[misc, name-defined]
        """A VBox whose plain text is one line for readers without a kernel, not ``VBox(children=...``."""

        def __repr__(self) -> str:
            return LIVE_NOTE

    return LiveBox


def _box(w: Any, children: list[Any], controls: dict[str, Any], labels: dict[str, Any], image: Any) -> Any:
    box = _live_box_class(w)(children)
    box.add_class("qlab-widget")
    for name, ctl in controls.items():
        ctl.add_class("qlab-control-" + name.replace("_", "-"))  # e.g. .qlab-control-bits, for browser tests
    box.controls, box.labels, box.image = controls, labels, image
    return box


# ---------------------------------------------------------------------------------------------------------
# Bit-layout explorer


def _bits_html(value: float, formats: Sequence[str]) -> str:
    """A table: format, coloured bit fields, stored value, absolute and relative error."""
    rows = []
    for name in formats:
        lay = describe_bits(value, name)
        E = lay.fmt.exponent_bits
        bits = lay.bits
        cells = (
            f'<span style="background:{SIGN_COLOR}">{bits[0]}</span>'
            f'<span style="background:{EXPONENT_COLOR}">{bits[1 : 1 + E]}</span>'
            f'<span style="background:{MANTISSA_COLOR}">{bits[1 + E :]}</span>'
        )
        abs_err = "" if math.isnan(lay.abs_error) else f"{lay.abs_error:.3g}"
        rel_err = "" if math.isnan(lay.rel_error) else f"{lay.rel_error:.3g}"
        rows.append(
            f'<tr class="qlab-bits-{html.escape(lay.fmt.name)}"><td>{lay.fmt.name}</td>'
            f'<td style="font-family:monospace">{cells}</td><td>{lay.stored!r}</td>'
            f"<td>{abs_err}</td><td>{rel_err}</td></tr>"
        )
    head = "<tr><th>format</th><th>sign | exponent | mantissa</th><th>stored value</th>"
    head += "<th>abs error</th><th>rel error</th></tr>"
    return f'<table class="qlab-bits-table">{head}{"".join(rows)}</table>'


def flip_bit(value: float, fmt: FloatFormat | str, index: int) -> float:
    """``value`` rounded into ``fmt`` with bit ``index`` flipped (0 = the sign bit, leftmost)."""
    f = get_format(fmt)
    if not isinstance(f, FloatFormat):
        raise ValueError(f"fmt must be a float format, got {f.name}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < f.bits:
        raise ValueError(f"index must be an int in 0..{f.bits - 1} for {f.name}, got {index!r}")
    code = int(describe_bits(value, f).bits, 2) ^ (1 << (f.bits - 1 - index))
    return float(from_code(code, f))


def bit_layout_explorer(
    value: float = 0.1,
    *,
    tensor: torch.Tensor | None = None,
    formats: Sequence[str] = LAYOUT_FORMATS,
    static: bool = False,
) -> Any:
    """Type a value (or pick an element of ``tensor``) and see its bits in each of ``formats``, the value
    each format stores and the rounding error; click a bit of the chosen format to flip it."""
    for name in formats:
        if not isinstance(get_format(name), FloatFormat):
            raise ValueError(f"formats must be float formats, got {name!r}")
    if tensor is not None and (not isinstance(tensor, torch.Tensor) or tensor.numel() == 0):
        raise TypeError("tensor must be a non-empty torch.Tensor or None")
    if static:
        return plot_bit_layout(value, formats)
    w = _ipywidgets()
    state = {"value": float(value)}
    text = w.Text(value=repr(float(value)), description="value", continuous_update=False)
    flip_fmt = w.ToggleButtons(options=list(formats), value=formats[min(1, len(formats) - 1)])
    bits_row = w.HBox([])
    table = _label(w, "qlab-bits", "")
    status = _label(w, "qlab-status", "")
    controls: dict[str, Any] = {"value": text, "format": flip_fmt}
    children: list[Any] = [text]
    if tensor is not None:
        flat = tensor.detach().float().flatten()
        element = w.IntSlider(0, 0, flat.numel() - 1, description="element", continuous_update=False)
        element.observe(lambda change: setattr(text, "value", repr(float(flat[change["new"]]))), "value")
        controls["element"] = element
        children.append(element)

    def make_bit_button(i: int, bit: str, E: int) -> Any:
        color = SIGN_COLOR if i == 0 else EXPONENT_COLOR if i <= E else MANTISSA_COLOR
        b = w.Button(description=bit, layout=w.Layout(width="26px", padding="0"), tooltip=f"flip bit {i}")
        b.style.button_color = color
        b.on_click(lambda _b: setattr(text, "value", repr(flip_bit(state["value"], flip_fmt.value, i))))
        return b

    def refresh(_change: object = None) -> None:
        try:
            v = float(text.value)
        except ValueError:
            status.value = f"not a number: {html.escape(text.value)!s}"
            return
        state["value"] = v
        status.value = ""
        table.value = _bits_html(v, formats)
        lay = describe_bits(v, flip_fmt.value)
        bits_row.children = [make_bit_button(i, b, lay.fmt.exponent_bits) for i, b in enumerate(lay.bits)]

    text.observe(refresh, "value")
    flip_fmt.observe(refresh, "value")
    refresh()
    controls["bits"] = bits_row
    children += [table, w.HTML("click a bit to flip it:"), flip_fmt, bits_row, status]
    return _box(w, children, controls, {"bits": table, "status": status}, None)


# ---------------------------------------------------------------------------------------------------------
# Error-histogram explorer


def _fp8(x: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    if spec.granularity == "group":
        raise ValueError("FP8 here has one fp32 scale per tensor or per row: choose 'tensor' or 'channel'")
    return quantize_fp8(x, "tensor" if spec.granularity == "tensor" else "row")


def scaled_float_methods() -> dict[str, Quantizer]:
    """The scaled-float formats of :mod:`qlab.scaled_floats` as explorer quantizers: MXFP4 and NVFP4 (their
    block and scale rule are fixed, so bits, granularity and group size do not apply) and FP8 e4m3 with a
    dynamic fp32 scale per tensor (granularity ``tensor``) or per row (``channel``)."""
    return {
        "MXFP4": lambda x, spec: quantize_mxfp4(x),
        "NVFP4": lambda x, spec: quantize_nvfp4(x),
        "FP8": _fp8,
    }


_SCALE_LABELS = {"e8m0": "e8m0 scales", "e4m3": "e4m3 scales x fp32 per tensor", "fp32": "fp32 scales"}


def error_histogram_explorer(
    tensors: Mapping[str, torch.Tensor] | None = None,
    *,
    inputs: Mapping[str, torch.Tensor] | None = None,
    methods: Mapping[str, Quantizer] | None = None,
    bits: int = 4,
    scale_dtype: torch.dtype = torch.float32,
    seed: int = 0,
    static: bool = False,
) -> Any:
    """Pick a tensor (random, or named layers of a real model passed as ``{name: weight}``), a method, bits,
    symmetric/asymmetric, granularity, group size and the dtype of the stored scales and zeros; see the
    weight histogram with the quantization grid, the error histogram, and SQNR, max error and bits per weight
    (scales and zeros counted in ``scale_dtype``, the starting value of the ``scales`` control).

    The formats include the scaled floats of :func:`scaled_float_methods` (MXFP4, NVFP4, FP8 per tensor or
    per row), with their stored scales counted in the bits per weight.

    An impossible combination (NF4 or FP4 per tensor, HQQ symmetric, ...) says why and blanks the numbers and
    the picture until the controls make sense again, so nothing stale stays on screen.

    ``inputs``: ``{tensor name: layer inputs [..., in]}`` for some tensors. For those, GPTQ and AWQ are
    offered and an extra label shows the SQNR of the layer *output* ``inputs @ W.T``, the quantity they
    optimize (GPTQ's weight SQNR can be far below RTN's while its output SQNR is higher).
    ``methods`` adds or replaces quantizers (``{name: (x, spec) -> QuantizedTensor}``) beyond
    :func:`available_methods`.
    """
    tensors = dict(default_tensors(seed) if tensors is None else tensors)
    if not tensors:
        raise ValueError("tensors is empty; pass {name: tensor} or None for random ones")
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() == 0:
            raise TypeError(f"tensors[{name!r}] must be a float tensor with at least one dim")
    inputs = dict(inputs or {})
    for name, a in inputs.items():
        if name not in tensors:
            raise ValueError(f"inputs[{name!r}] names no tensor; tensors are {list(tensors)}")
        if not isinstance(a, torch.Tensor) or a.shape[-1] != tensors[name].shape[-1]:
            raise ValueError(f"inputs[{name!r}] must be a tensor [..., {tensors[name].shape[-1]}]")
    all_methods: dict[str, Quantizer | None] = {
        **available_methods(),
        **scaled_float_methods(),
        **(methods or {}),
    }
    from_inputs = data_methods() if inputs else {}
    for method_name in from_inputs:
        all_methods.setdefault(method_name, None)  # built per tensor from its inputs, on first use
    data_cache: dict[tuple[str, str], Quantizer] = {}
    first = next(iter(tensors))
    if scale_dtype not in _SCALE_DTYPES.values():
        raise ValueError(f"scale_dtype must be one of {list(_SCALE_DTYPES.values())}, got {scale_dtype!r}")
    if static:
        x = tensors[first].detach().float()
        qt = explorer_quantize(
            x, "RTN", bits, False, "group", _group_default(x), all_methods, scale_dtype=scale_dtype
        )
        return plot_error_histogram(
            x, qt, title=f"{first}: {qt.spec.describe()}, {_dtype_name(scale_dtype)} scales"
        )

    w = _ipywidgets()
    c = {
        "tensor": w.Dropdown(options=list(tensors), value=first, description="tensor"),
        "method": w.Dropdown(options=list(all_methods), value="RTN", description="method"),
        "bits": w.IntSlider(value=bits, min=1, max=8, description="bits", continuous_update=False),
        "symmetric": w.ToggleButtons(options=[("asymmetric", False), ("symmetric", True)], value=False),
        "granularity": w.Dropdown(
            options=["tensor", "channel", "group"], value="group", description="granularity"
        ),
        "group_size": w.Dropdown(options=[16, 32, 64, 128, 256], value=64, description="group size"),
        "scale_dtype": w.Dropdown(
            options=list(_SCALE_DTYPES.items()), value=scale_dtype, description="scales"
        ),
    }
    c["group_size"].value = _group_default(tensors[first])
    labels = {
        "sqnr": _label(w, "qlab-sqnr"),
        "max_error": _label(w, "qlab-max-error"),
        "bits_per_weight": _label(w, "qlab-bpw"),
        "output_sqnr": _label(w, "qlab-output-sqnr"),
        "status": _label(w, "qlab-status"),
    }
    image = w.Image(format="png")
    image.add_class("qlab-figure")

    def refresh(_change: object = None) -> None:
        name = c["tensor"].value
        x = tensors[name].detach().float()
        method = c["method"].value
        codebook = method in ("NF4", "FP4", "MXFP4", "NVFP4", "FP8")  # no bits/symmetric/scale dtype
        fixed_block = method in ("MXFP4", "NVFP4")
        chosen = {k: v for k, v in all_methods.items() if v is not None}

        def impossible(why: str) -> None:  # say why, and blank what no longer matches the controls
            labels["status"].value = f"<span style='color:#b22'>{html.escape(why)}</span>"
            for key in ("sqnr", "max_error", "bits_per_weight", "output_sqnr"):
                labels[key].value = ""
            image.value = b""

        if all_methods[method] is None:
            if name not in inputs:
                impossible(f"{method} needs layer inputs for {name}")
                return
            if (method, name) not in data_cache:
                data_cache[method, name] = from_inputs[method](inputs[name])
            chosen[method] = data_cache[method, name]
        c["bits"].disabled = c["symmetric"].disabled = c["scale_dtype"].disabled = codebook
        c["group_size"].disabled = c["granularity"].value != "group" or fixed_block
        c["granularity"].disabled = fixed_block
        try:
            result = explorer_quantize(
                x,
                method,
                c["bits"].value,
                c["symmetric"].value,
                c["granularity"].value,
                c["group_size"].value,
                chosen,
                scale_dtype=c["scale_dtype"].value,
            )
        except ValueError as e:  # an impossible combination
            impossible(str(e))
            return
        # The picture first, the numbers last: widget messages arrive in order, so whoever sees the new
        # numbers (a learner, the browser test) already has the new picture.
        xhat, qt, bpw = reconstruct(x, result)
        spec = (result if isinstance(result, QuantizedTensor) else result[0]).spec
        shown = qt if qt is not None else xhat  # a QuantizedTensor brings its grid into the picture
        scales = "fp32 absmax" if codebook else f"{_dtype_name(spec.scale_dtype)} scales"
        described = spec.describe()
        if isinstance(result, ScaledTensor):
            scales, described = _SCALE_LABELS[result.fmt.scale], result.fmt.name
        fig = plot_error_histogram(
            x, shown, title=f"{name}: {method} {described}, {scales}", bits_per_weight=bpw
        )
        image.value = figure_png(fig)
        stats = error_stats(x, xhat, bits_per_weight=bpw)
        labels["output_sqnr"].value = (
            f"<b>output SQNR {output_sqnr(x, xhat, inputs[name]):.2f} dB</b>" if name in inputs else ""
        )
        labels["status"].value = html.escape(f"{described}, {scales}")
        for key, text in stats.labels().items():
            labels[key].value = f"<b>{html.escape(text)}</b>"

    for ctl in c.values():
        ctl.observe(refresh, "value")
    refresh()
    numbers = w.HBox([labels[k] for k in ("sqnr", "output_sqnr", "max_error", "bits_per_weight")])
    numbers.layout.justify_content = "space-around"
    children = [
        w.HBox([c["tensor"], c["method"]]),
        w.HBox([c["bits"], c["symmetric"]]),
        w.HBox([c["granularity"], c["group_size"], c["scale_dtype"]]),
        numbers,
        labels["status"],
        image,
    ]
    return _box(w, children, c, labels, image)


_SCALE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _dtype_name(dtype: torch.dtype) -> str:
    return next((k for k, v in _SCALE_DTYPES.items() if v == dtype), str(dtype))


def _group_default(x: torch.Tensor) -> int:
    """64 if it divides the last dim, else the largest offered group size that does (else the dim itself)."""
    n = x.shape[-1]
    for g in (64, 32, 128, 16, 256):
        if n % g == 0:
            return g
    return n


# ---------------------------------------------------------------------------------------------------------
# Memory calculator

_GPU_SIZES: tuple[tuple[str, int], ...] = tuple(
    (f"{gb} GB", gb * 10**9) for gb in (8, 12, 16, 24, 40, 48, 80, 141)
)


def _parse_count(text: str) -> int:
    """'7e9', '7B', '135M', '7,000,000' -> parameter count."""
    t = text.strip().replace(",", "").replace("_", "").upper()
    mult = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}.get(t[-1:], 1)
    if mult != 1:
        t = t[:-1]
    try:
        n = float(t) * mult
    except ValueError:
        raise ValueError(f"parameter count must be a number such as 7e9, 7B or 135M, got {text!r}") from None
    if not math.isfinite(n) or n < 1:
        raise ValueError(f"parameter count must be a positive number, got {text!r}")
    return int(round(n))


def memory_calculator(
    models: Mapping[str, ModelEntry] | None = None,
    *,
    model: str = "Llama-3-8B",
    memory_bytes: int = 24 * 10**9,
    static: bool = False,
) -> Any:
    """Pick a model (the course's offline models, well-known larger ones, extra :class:`ModelEntry`s passed
    in ``models``, or a typed-in parameter count) and see its bytes in every scheme, scales and zeros
    included, against a memory size; the chosen scheme says whether it fits."""
    entries = {**MODELS, **(models or {})}
    if model not in entries:
        raise ValueError(f"model must be one of {list(entries)}, got {model!r}")
    if static:
        rows = [estimate_memory(entries[model], s) for s in SCHEMES]
        return plot_memory(rows, gpu_bytes=memory_bytes, title=f"{model}: weight memory per scheme")
    w = _ipywidgets()
    gpu_options = list(_GPU_SIZES)
    if memory_bytes not in [v for _, v in gpu_options]:
        gpu_options.append((format_bytes(memory_bytes), memory_bytes))
    c = {
        "model": w.Dropdown(options=[*entries, "custom"], value=model, description="model"),
        "params": w.Text(value="7e9", description="parameters", continuous_update=False, disabled=True),
        "scheme": w.Dropdown(options=list(SCHEMES), value="int4 asym g128", description="scheme"),
        "memory": w.Dropdown(options=gpu_options, value=memory_bytes, description="memory"),
    }
    labels = {"fits": _label(w, "qlab-fits"), "status": _label(w, "qlab-status")}
    image = w.Image(format="png")
    image.add_class("qlab-figure")

    def refresh(_change: object = None) -> None:
        custom = c["model"].value == "custom"
        c["params"].disabled = not custom
        try:
            entry: ModelEntry | int = _parse_count(c["params"].value) if custom else entries[c["model"].value]
        except ValueError as e:
            labels["status"].value = html.escape(str(e))
            labels["fits"].value, image.value = "", b""  # no stale answer beside the error
            return
        labels["status"].value = "custom counts assume 97% of parameters in linear layers" if custom else ""
        rows = [estimate_memory(entry, s) for s in SCHEMES]
        chosen = estimate_memory(entry, c["scheme"].value)
        fits = chosen.total <= c["memory"].value
        name = c["params"].value + " params" if custom else c["model"].value
        image.value = figure_png(
            plot_memory(rows, gpu_bytes=c["memory"].value, title=f"{name}: weight memory")
        )
        labels["fits"].value = (
            f"<b>{html.escape(chosen.label)}: {format_bytes(chosen.total)}, "
            f"fits in {format_bytes(c['memory'].value)}: {'yes' if fits else 'no'}</b>"
        )

    for ctl in c.values():
        ctl.observe(refresh, "value")
    refresh()
    children = [w.HBox([c["model"], c["params"]]), w.HBox([c["scheme"], c["memory"]]), labels["fits"]]
    return _box(w, [*children, labels["status"], image], c, labels, image)


# ---------------------------------------------------------------------------------------------------------
# Method picker


def _recommendation_html(rec: Any) -> str:
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in rec.reasons)
    verdict = "fits" if rec.fits else "does NOT fit"
    return (
        f'<div class="qlab-recommendation"><b>method: <code>{rec.method}</code></b> '
        f"({html.escape(rec.settings)})"
        f"<ul>{reasons}</ul>"
        f"<code>QuantConfig(method={rec.config.method!r}, bits={rec.config.bits}, "
        f"group_size={rec.config.group_size})</code><br>"
        f"expected weight memory: <b>{format_bytes(rec.memory.total)}</b> ({verdict} in "
        f"{format_bytes(rec.memory_limit)})</div>"
    )


def method_picker(
    *,
    hardware: str = "consumer_gpu",
    target_bits: int = 4,
    calibration: bool = True,
    finetune: bool = False,
    model: str = "Llama-3-8B",
    static: bool = False,
) -> Any:
    """Hardware, target bits, calibration data yes/no, fine-tune yes/no and a model -> the qlab method and
    settings to use, with reasons and the expected memory (logic in :func:`qlab.picker.recommend`)."""
    if static:
        return recommend(hardware, target_bits, calibration, finetune, model)
    recommend(hardware, target_bits, calibration, finetune, model)  # validate the defaults early
    w = _ipywidgets()
    hw_labels = {"cpu": "CPU only", "consumer_gpu": "consumer GPU", "datacenter_gpu": "datacenter GPU"}
    c = {
        "hardware": w.ToggleButtons(options=[(hw_labels[h], h) for h in HARDWARE], value=hardware),
        "target_bits": w.ToggleButtons(options=[8, 4, 3, 2], value=target_bits, description="bits"),
        "calibration": w.Checkbox(value=calibration, description="calibration data available"),
        "finetune": w.Checkbox(value=finetune, description="need to fine-tune"),
        "model": w.Dropdown(options=list(MODELS), value=model, description="model"),
        "memory": w.Dropdown(options=list(_GPU_SIZES), value=DEFAULT_MEMORY[hardware], description="memory"),
    }
    out = _label(w, "qlab-recommendation-box")

    def on_hardware(change: dict[str, Any]) -> None:
        c["memory"].value = DEFAULT_MEMORY[change["new"]]  # a sensible size for that hardware; then refresh

    def refresh(_change: object = None) -> None:
        rec = recommend(
            c["hardware"].value,
            c["target_bits"].value,
            c["calibration"].value,
            c["finetune"].value,
            c["model"].value,
            c["memory"].value,
        )
        out.value = _recommendation_html(rec)

    c["hardware"].observe(on_hardware, "value")
    for ctl in c.values():
        ctl.observe(refresh, "value")
    refresh()
    children = [
        c["hardware"],
        c["target_bits"],
        w.HBox([c["calibration"], c["finetune"]]),
        w.HBox([c["model"], c["memory"]]),
        out,
    ]
    return _box(w, children, c, {"recommendation": out}, None)


__all__ = [
    "Quantizer",
    "available_methods",
    "bit_layout_explorer",
    "default_tensors",
    "error_histogram_explorer",
    "scaled_float_methods",
    "explorer_quantize",
    "flip_bit",
    "awq_method",
    "gptq_method",
    "reconstruct",
    "output_sqnr",
    "memory_calculator",
    "method_picker",
    "LIVE_NOTE",
]

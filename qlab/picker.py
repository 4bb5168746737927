"""Memory estimates for whole models, and a method picker: which qlab method fits a situation.

Memory of a model stored with a :class:`Scheme`: its *linear* weights (``n_linear`` parameters in rows of
``row`` inputs) become codes plus per-block scales (and zeros); everything else (embeddings, norms, an untied
head) stays in ``rest_bits`` floats, as ``QuantConfig``'s default ``skip`` keeps them::

    codes    = ceil(n_linear * bits / 8)
    overhead = (n_linear / block) * (scale_bytes + zero_bytes)          block = group size, or ``row``
    rest     = (n_params - n_linear) * rest_bits / 8

For a 2-D weight these are exactly the bytes :attr:`qlab.quantize.QuantizedTensor.nbytes` counts
(tests/test_picker.py checks it). For a model, layer-by-layer rounding is ignored (a few bytes per layer).

:func:`recommend` turns hardware, target bits, calibration data and the wish to fine-tune into a
:class:`~qlab.config.QuantConfig` with the reasons for it; it is plain Python so lessons and tests can call it
without widgets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from qlab.codebooks import DOUBLE_QUANT_BLOCK
from qlab.config import QuantConfig
from qlab.quantize import QuantSpec

Hardware = Literal["cpu", "consumer_gpu", "datacenter_gpu"]
HARDWARE: tuple[str, ...] = ("cpu", "consumer_gpu", "datacenter_gpu")
#: Default memory (bytes) a learner of each kind of hardware has for weights: a laptop's RAM, an RTX 4090,
#: an H100. Only used when :func:`recommend` is not told the memory size.
DEFAULT_MEMORY: dict[str, int] = {"cpu": 16 * 10**9, "consumer_gpu": 24 * 10**9, "datacenter_gpu": 80 * 10**9}


@dataclass(frozen=True)
class ModelEntry:
    """Parameter counts of a model: all parameters, those in quantizable linear layers, and the row length
    (input features) of a typical linear weight, which sets the per-channel scale count."""

    name: str
    n_params: int
    n_linear: int
    row: int

    def __post_init__(self) -> None:
        if not 0 <= self.n_linear <= self.n_params:
            raise ValueError(f"n_linear must lie in 0..n_params, got {self.n_linear} of {self.n_params}")
        if self.row < 1:
            raise ValueError(f"row must be a positive number of input features, got {self.row}")


def _llama(name: str, layers: int, hidden: int, kv: int, ffn: int, vocab: int, tied: bool) -> ModelEntry:
    """Counts of a Llama-shaped decoder: q,o (h x h), k,v (kv x h), gate/up/down (ffn x h), 2 norms/layer."""
    linear = layers * (2 * hidden * hidden + 2 * kv * hidden + 3 * ffn * hidden)
    embed = vocab * hidden * (1 if tied else 2)
    norms = (2 * layers + 1) * hidden
    return ModelEntry(name, linear + embed + norms, linear, hidden)


#: The course's offline models first (counts of the real checkpoints), then well-known larger models whose
#: counts follow from their published shapes (they match the model cards: 6.74B, 7.24B, 8.03B, 13.0B, 70.6B).
MODELS: dict[str, ModelEntry] = {
    m.name: m
    for m in (
        _llama("SmolLM2-135M", 30, 576, 192, 1536, 49152, tied=True),
        # all-MiniLM-L6-v2: 6 BERT layers (q,k,v,o 384x384; ffn 1536) and a 384x384 pooler; 30522 words.
        ModelEntry("all-MiniLM-L6-v2", 22_713_216, 6 * (4 * 384 * 384 + 2 * 384 * 1536) + 384 * 384, 384),
        _llama("Llama-2-7B", 32, 4096, 4096, 11008, 32000, tied=False),
        _llama("Mistral-7B", 32, 4096, 1024, 14336, 32000, tied=False),
        _llama("Llama-3-8B", 32, 4096, 1024, 14336, 128256, tied=False),
        _llama("Llama-2-13B", 40, 5120, 5120, 13824, 32000, tied=False),
        _llama("Llama-3-70B", 80, 8192, 1024, 28672, 128256, tied=False),
    )
}


def model_entry(model: torch.nn.Module, name: str) -> ModelEntry:
    """Count a loaded model's parameters: all of them (tied ones once), those in the ``nn.Linear`` weights
    that ``QuantConfig``'s default ``skip`` would quantize (not ``lm_head``), and the most common
    ``in_features`` as the row length."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    skip = QuantConfig()
    linears = [
        m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not skip.is_skipped(n)
    ]
    weights = {id(m.weight): m.weight for m in linears}
    n_linear = sum(w.numel() for w in weights.values())
    rows = [m.in_features for m in linears]
    row = max(set(rows), key=rows.count) if rows else 1
    return ModelEntry(name, total, n_linear, row)


@dataclass(frozen=True)
class Scheme:
    """How a model's linear weights are stored.

    ``block``: elements per scale: a group size, ``None`` for one scale per row (per channel), ``0`` for no
    scale at all (plain floats). ``double_quant``: the scales are themselves stored as int8 in blocks of 256
    with one fp32 scale each plus one fp32 offset (QLoRA). ``rest_bits``: width of the parameters that are
    not quantized.
    """

    name: str
    bits: int
    block: int | None = None
    scale_bytes: int = 2
    zero_bytes: int = 0
    double_quant: bool = False
    rest_bits: int = 16

    @classmethod
    def from_spec(cls, name: str, spec: QuantSpec, rest_bits: int = 16) -> Scheme:
        """The scheme that stores a weight the way ``quantize(w, spec)`` does (per-channel along axis 0)."""
        if spec.granularity == "tensor":
            raise ValueError("per-tensor specs have one scale per tensor; give a per-channel or group spec")
        if spec.granularity == "channel" and spec.axis != 0:
            raise ValueError(f"per-channel specs must use axis=0 (one scale per output row), got {spec.axis}")
        size = torch.finfo(spec.scale_dtype).bits // 8
        has_zero = not spec.symmetric and spec.codebook is None
        return cls(
            name,
            spec.bits,
            spec.group_size if spec.granularity == "group" else None,
            size,
            size if has_zero else 0,
            spec.double_quant,
            rest_bits,
        )

    @property
    def is_float(self) -> bool:
        return self.block == 0

    def linear_bytes(self, n_linear: int, row: int) -> tuple[int, int]:
        """(code bytes, scale + zero bytes) for ``n_linear`` weights in rows of ``row`` inputs."""
        codes = math.ceil(n_linear * self.bits / 8)
        if self.is_float:
            return codes, 0
        blocks = math.ceil(n_linear / (self.block or row))
        if self.double_quant:
            padded = math.ceil(blocks / DOUBLE_QUANT_BLOCK) * DOUBLE_QUANT_BLOCK
            return codes, padded + 4 * (padded // DOUBLE_QUANT_BLOCK) + 4
        return codes, blocks * (self.scale_bytes + self.zero_bytes)

    def bits_per_weight(self, row: int = 4096) -> float:
        """Average storage bits per linear weight, overhead included."""
        n = row * 256
        codes, overhead = self.linear_bytes(n, row)
        return 8 * (codes + overhead) / n


#: Schemes the memory calculator offers. Scales are fp16 as deployed int4 formats store them.
SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("fp32", 32, block=0, rest_bits=32),
        Scheme("bf16", 16, block=0),
        Scheme("fp8 e4m3 per-channel", 8, block=None, scale_bytes=4),
        Scheme("int8 sym per-channel", 8, block=None),
        Scheme("int4 asym g128", 4, block=128, zero_bytes=2),
        Scheme("int4 asym g32", 4, block=32, zero_bytes=2),
        Scheme("nf4 b64", 4, block=64, scale_bytes=4),
        Scheme("nf4 b64 double-quant", 4, block=64, double_quant=True),
        Scheme("int3 asym g64", 3, block=64, zero_bytes=2),
        Scheme("int2 asym g64", 2, block=64, zero_bytes=2),
    )
}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one model stored in one scheme, split the way :func:`qlab.plots.plot_memory` stacks them."""

    label: str
    weight_bytes: int
    overhead_bytes: int
    other_bytes: int

    @property
    def total(self) -> int:
        return self.weight_bytes + self.overhead_bytes + self.other_bytes


def _scheme(scheme: Scheme | str) -> Scheme:
    if isinstance(scheme, Scheme):
        return scheme
    if isinstance(scheme, str) and scheme in SCHEMES:
        return SCHEMES[scheme]
    raise ValueError(f"scheme must be a Scheme or one of {list(SCHEMES)}, got {scheme!r}")


def _model(model: ModelEntry | str | int) -> ModelEntry:
    if isinstance(model, ModelEntry):
        return model
    if isinstance(model, str):
        if model not in MODELS:
            raise ValueError(
                f"model must be a ModelEntry, a parameter count or one of {list(MODELS)}, got {model!r}"
            )
        return MODELS[model]
    if isinstance(model, int) and not isinstance(model, bool) and model > 0:
        # A bare count: assume a 7B-class shape, ~97% of it in linear layers with 4096 inputs per row.
        return ModelEntry(f"{model / 1e9:.3g}B params", model, round(model * 0.97), 4096)
    raise TypeError(f"model must be a ModelEntry, a model name or a positive int, got {model!r}")


def estimate_memory(model: ModelEntry | str | int, scheme: Scheme | str) -> MemoryEstimate:
    """Bytes to hold ``model``'s parameters in ``scheme`` (see the module docstring for the formula)."""
    m, s = _model(model), _scheme(scheme)
    if s.is_float:
        return MemoryEstimate(s.name, math.ceil(m.n_params * s.bits / 8), 0, 0)
    codes, overhead = s.linear_bytes(m.n_linear, m.row)
    other = math.ceil((m.n_params - m.n_linear) * s.rest_bits / 8)
    return MemoryEstimate(s.name, codes, overhead, other)


# ---------------------------------------------------------------------------------------------------------
# Method picker


@dataclass(frozen=True)
class Recommendation:
    """What :func:`recommend` suggests: a config to pass to ``quantize_model``, and why."""

    method: str
    config: QuantConfig
    settings: str
    reasons: tuple[str, ...]
    memory: MemoryEstimate
    memory_limit: int
    scheme: Scheme = field(repr=False)

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.memory_limit

    def summary(self) -> str:
        """Plain-text form, for printing in a lesson."""
        from qlab.formats import format_bytes

        lines = [f"method: {self.method} ({self.settings})"]
        lines += [f"  - {r}" for r in self.reasons]
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(
            f"expected weight memory: {format_bytes(self.memory.total)} "
            f"({verdict} in {format_bytes(self.memory_limit)})"
        )
        return "\n".join(lines)


BITS_CHOICES = (2, 3, 4, 8)
"""The bit widths :func:`recommend` (and the method picker) offers."""


def _check_choice(value: object, name: str, choices: tuple[object, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def recommend(
    hardware: str,
    target_bits: int,
    calibration: bool,
    finetune: bool,
    model: ModelEntry | str | int = "Llama-3-8B",
    memory_bytes: int | None = None,
) -> Recommendation:
    """Pick a qlab method and settings.

    The rules, in order of priority:

    1. Fine-tuning: train LoRA adapters on a frozen NF4 base (QLoRA): 4 bits, blocks of 64, double-quantized
       scales. Below 4 bits there is no well-trodden fine-tuning path; 8 bits keeps an int8 base.
    2. 8 bits: round-to-nearest is already near-lossless. On a datacenter GPU (Hopper and later) use fp8,
       whose tensor cores run it natively; with calibration data there, quantize activations too
       (SmoothQuant W8A8). Elsewhere int8 per-channel symmetric (torch's CPU int8 matmul takes this layout).
    3. 4 bits: with calibration data, AWQ (protect the salient channels) at group 128; without, HQQ
       (data-free, optimizes the zero-points) at group 64, the setting where it beat round-to-nearest in
       perplexity on SmolLM2-135M (lesson 06; at g128/g144 it lost). int4 groups run on torch's CPU int4 op
       and on GPU kernels.
    4. 3 or 2 bits: with calibration data GPTQ (error compensation), at group 64. Without data, plain
       round-to-nearest at group 64: on SmolLM2-135M HQQ's lower weight error gave a *higher* perplexity at
       int3 g64 than RTN, and every data-free method collapsed at 2 bits (lesson 06), so the honest advice is
       to find calibration data or use 4 bits.
    """
    _check_choice(hardware, "hardware", HARDWARE)
    _check_choice(target_bits, "target_bits", BITS_CHOICES)
    for name, flag in (("calibration", calibration), ("finetune", finetune)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    limit = DEFAULT_MEMORY[hardware] if memory_bytes is None else memory_bytes
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise ValueError(f"memory_bytes must be a positive int, got {memory_bytes!r}")
    reasons: list[str] = []

    if finetune and target_bits != 8:
        cfg = QuantConfig(method="nf4", bits=4, group_size=64)
        scheme, settings = SCHEMES["nf4 b64 double-quant"], "NF4, blocks of 64, double-quantized scales"
        reasons.append("fine-tuning: QLoRA trains adapters on a frozen NF4 base, the standard recipe")
        if target_bits < 4:
            reasons.append(
                f"{target_bits}-bit bases have no standard fine-tuning recipe; NF4 is the smallest"
            )
        reasons.append("double quantization shrinks the scales from 0.5 to about 0.13 bits per weight")
    elif target_bits == 8:
        if hardware == "datacenter_gpu" and calibration and not finetune:
            cfg = QuantConfig(method="smoothquant", bits=8, group_size=None, symmetric=True)
            scheme, settings = SCHEMES["int8 sym per-channel"], "W8A8, SmoothQuant alpha 0.5"
            reasons.append("calibration data lets SmoothQuant move activation outliers into the weights")
            reasons.append(
                "int8 activations and weights use the GPU's int8 tensor cores: faster, not just smaller"
            )
        elif hardware == "datacenter_gpu" and not finetune:
            cfg = QuantConfig(method="fp8", bits=8, group_size=None)
            scheme, settings = SCHEMES["fp8 e4m3 per-channel"], "fp8 e4m3 weights, per-channel scales"
            reasons.append("Hopper-class GPUs run fp8 e4m3 natively; no calibration data needed")
        else:
            cfg = QuantConfig(method="rtn", bits=8, group_size=None, symmetric=True)
            scheme, settings = SCHEMES["int8 sym per-channel"], "int8 symmetric, per output channel"
            reasons.append("at 8 bits round-to-nearest is nearly lossless: no data or search needed")
            if hardware == "cpu":
                reasons.append("torch's CPU int8 matmul uses this layout (run it with bf16 activations)")
            if finetune:
                reasons.append("fine-tuning: keep the int8 base frozen and train LoRA adapters on top")
    elif target_bits == 4:
        if calibration:
            cfg = QuantConfig(method="awq", bits=4, group_size=128, symmetric=False)
            scheme, settings = SCHEMES["int4 asym g128"], "AWQ int4 asymmetric, group 128"
            reasons.append(
                "calibration data shows which input channels matter; AWQ scales them up to protect them"
            )
        else:
            cfg = QuantConfig(method="hqq", bits=4, group_size=64, symmetric=False)
            scheme = Scheme("int4 asym g64", 4, block=64, zero_bytes=2)
            settings = "HQQ int4 asymmetric, group 64"
            reasons.append(
                "no calibration data: HQQ refits the zero-points from the weights alone, in seconds"
            )
            reasons.append(
                "keep groups of 64: on SmolLM2-135M HQQ beat round-to-nearest at int4 g64 but lost at g128 "
                "(lesson 06); check perplexity on your model"
            )
        if hardware == "cpu":
            reasons.append("grouped int4 runs on torch's CPU int4 matmul (bf16 activations)")
        else:
            reasons.append("grouped int4 is the layout fused GPU dequantize-matmul kernels read")
    else:
        if calibration:
            cfg = QuantConfig(method="gptq", bits=target_bits, group_size=64, symmetric=False)
            settings = f"GPTQ int{target_bits} asymmetric, group 64"
            reasons.append("GPTQ uses calibration data to push each column's rounding error onto the next")
            reasons.append(
                f"round-to-nearest at {target_bits} bits loses too much; small groups track the weights"
            )
        else:
            cfg = QuantConfig(method="rtn", bits=target_bits, group_size=64, symmetric=False)
            settings = f"round-to-nearest int{target_bits} asymmetric, group 64"
            reasons.append(
                "no data-free method holds up here: on SmolLM2-135M HQQ lost to round-to-nearest at int3 g64 "
                "and every data-free method collapsed at 2 bits (lesson 06)"
            )
            reasons.append("get calibration data (GPTQ, AWQ) or use 4 bits; small groups track the weights")
        scheme = SCHEMES[f"int{target_bits} asym g64"]
        if hardware == "cpu":
            reasons.append("no fast CPU kernel exists below 4 bits: expect memory savings, not speed")

    memory = estimate_memory(model, scheme)
    if memory.total > limit:
        if target_bits == min(BITS_CHOICES):
            reasons.append(
                f"the weights alone exceed the memory chosen even at {target_bits} bits, the fewest offered: "
                "pick a smaller model or more memory"
            )
        else:
            reasons.append("the weights alone exceed the memory chosen: pick fewer bits or a smaller model")
    return Recommendation(cfg.method, cfg, settings, tuple(reasons), memory, limit, scheme)

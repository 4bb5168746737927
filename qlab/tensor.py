"""The quantized-tensor types every quantizer shares: :class:`QuantSpec`, :class:`BlockView`,
:class:`QuantizedTensor`, and the input checks. The bottom of qlab's core: it imports only torch.

One formula covers every integer scheme in qlab::

    x ≈ scale * (q - zero)

* ``q`` are integer codes. Asymmetric specs use unsigned codes ``q ∈ [0, 2^b - 1]`` with a
  zero-point ``zero`` (stored as a float tensor holding an integer after round-to-nearest, so
  that 0.0 is represented exactly; HQQ may later move it off the integers).
* Symmetric specs use signed codes ``q ∈ [-(2^(b-1) - 1), 2^(b-1) - 1]`` (the *restricted*
  range: -128 is never used, so the grid is symmetric about 0) and ``zero = 0`` (not stored).

Asymmetric specs may instead put the zero-point in the *float* domain (``zero_domain="float"``)::

    x ≈ scale * q + zero                      (``zero`` is then the float offset ``m``)

the form of llama.cpp's Q4_1 (``x = d*q + m``) and of torchao's float zero-point domain. The two
forms describe the same grids in real arithmetic (``m = -scale * zero_int``), but not bit for bit in
fp32: storing ``m`` itself is what lets a Q4_1 block go through qlab and come back byte-identical, and
a block whose values are all equal is ``scale = 0, m = value``, which no integer zero can express.

Codebook formats (NF4, FP4) use ``x ≈ scale * table[q]`` with the same block idea.

Granularity is one idea, a *block size* (as in torchao): every block of ``block_size`` elements
shares one scale (and zero). For a weight of shape ``[out, in]``:

* per-tensor:  ``block_size = (out, in)``  -> one scale;
* per-channel: ``block_size = (1, in)``    -> one scale per output row (``axis=0``);
* per-group:   ``block_size = (1, g)``     -> one scale per ``g`` consecutive inputs.

The math that *produces* codes lives above this module: :mod:`qlab.affine` (round-to-nearest
integers), :mod:`qlab.codebooks` (lookup tables), and the thin :mod:`qlab.quantize` API on top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

Granularity = Literal["tensor", "channel", "group"]
ZeroDomain = Literal["int", "float"]
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: dtypes qlab writes into files and configs, by their JSON names (``"float32"``, ...).
DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.float8_e4m3fn,
        torch.uint8,
        torch.int8,
        torch.int32,
        torch.int64,
        torch.bool,
    )
}


def dtype_name(dtype: torch.dtype) -> str:
    """The JSON name of ``dtype``: ``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: Any, what: str = "dtype") -> torch.dtype:
    """The dtype called ``name`` (see :data:`DTYPES`); a ValueError naming ``what`` otherwise."""
    if name not in DTYPES:
        raise ValueError(f"{what}: unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize a tensor.

    Args:
        bits: code width, 1..8 (symmetric needs at least 2).
        symmetric: signed codes and no zero-point (True), or unsigned codes with a zero-point.
        granularity: ``"tensor"``, ``"channel"`` (one scale per slice along ``axis``) or
            ``"group"`` (one scale per ``group_size`` consecutive elements of the last dim).
        axis: the channel axis for ``granularity="channel"`` (0 = output rows of a Linear weight).
        group_size: elements per group for ``granularity="group"``; must divide the last dim.
        scale_dtype: dtype the scales (and zeros) are stored in.
        codebook: ``None`` for affine integers, or ``"nf4"`` / ``"fp4"`` (see :mod:`qlab.codebooks`).
        double_quant: codebooks only: quantize the block scales to 8 bits (QLoRA).
        zero_domain: asymmetric specs only: ``"int"`` stores a zero-point ``z`` with
            ``x ≈ scale * (q - z)``; ``"float"`` stores the float offset ``m`` of code 0 with
            ``x ≈ scale * q + m`` (llama.cpp's Q4_1, torchao's float zero-point domain).
    """

    bits: int = 8
    symmetric: bool = True
    granularity: Granularity = "channel"
    axis: int = 0
    group_size: int | None = None
    scale_dtype: torch.dtype = torch.float32
    codebook: str | None = None
    double_quant: bool = False
    zero_domain: ZeroDomain = "int"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer in 1..8, got {self.bits!r}")
        if self.granularity not in ("tensor", "channel", "group"):
            raise ValueError(f"granularity must be 'tensor', 'channel' or 'group', got {self.granularity!r}")
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(
                    f"group_size must be a positive integer for granularity='group', got {self.group_size!r}"
                )
        elif self.group_size is not None:
            raise ValueError(
                f"group_size is only used with granularity='group' (got group_size={self.group_size} "
                f"with granularity={self.granularity!r})"
            )
        if self.scale_dtype not in _FLOAT_DTYPES:
            raise ValueError(f"scale_dtype must be a float dtype, got {self.scale_dtype}")
        if self.codebook is not None:
            if self.codebook not in ("nf4", "fp4"):
                raise ValueError(f"codebook must be None, 'nf4' or 'fp4', got {self.codebook!r}")
            if self.bits != 4:
                raise ValueError(f"codebook {self.codebook!r} is a 4-bit format, got bits={self.bits}")
        elif self.double_quant:
            raise ValueError("double_quant applies to codebook formats (nf4/fp4) only")
        if self.zero_domain not in ("int", "float"):
            raise ValueError(f"zero_domain must be 'int' or 'float', got {self.zero_domain!r}")
        if self.zero_domain == "float" and (self.symmetric or self.codebook is not None):
            raise ValueError(
                "zero_domain='float' needs an asymmetric integer spec (symmetric=False, no codebook)"
            )
        if self.symmetric and self.bits < 2 and self.codebook is None:
            raise ValueError("symmetric quantization needs bits >= 2 (1-bit codes have no signed range)")

    # Convenience constructors, named for what a reader wants.
    @classmethod
    def per_tensor(cls, bits: int = 8, symmetric: bool = True, **kw) -> QuantSpec:
        return cls(bits=bits, symmetric=symmetric, granularity="tensor", **kw)

    @classmethod
    def per_channel(cls, bits: int = 8, symmetric: bool = True, axis: int = 0, **kw) -> QuantSpec:
        return cls(bits=bits, symmetric=symmetric, granularity="channel", axis=axis, **kw)

    @classmethod
    def per_group(cls, bits: int = 4, group_size: int = 128, symmetric: bool = False, **kw) -> QuantSpec:
        return cls(bits=bits, symmetric=symmetric, granularity="group", group_size=group_size, **kw)

    @property
    def qmin(self) -> int:
        """Smallest integer code."""
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.symmetric and self.codebook is None else torch.uint8

    def block_size(self, shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
        """Elements of each dim that share one scale, for a tensor of ``shape``."""
        shape = tuple(shape)
        if len(shape) == 0:
            return ()
        if self.granularity == "tensor":
            return shape
        if self.granularity == "channel":
            axis = self.axis if self.axis >= 0 else self.axis + len(shape)
            if not 0 <= axis < len(shape):
                raise ValueError(f"axis={self.axis} is out of range for a tensor with {len(shape)} dims")
            return tuple(1 if d == axis else n for d, n in enumerate(shape))
        g = self.group_size
        assert g is not None
        if shape[-1] % g != 0:
            raise ValueError(
                f"group_size={g} must divide the last dimension ({shape[-1]}); qlab does not pad groups"
            )
        return (1,) * (len(shape) - 1) + (g,)

    def describe(self) -> str:
        """Short human label, e.g. ``int4 asym g128`` or ``nf4 b64``."""
        if self.codebook:
            label = f"{self.codebook} b{self.group_size}"
            return label + (" dq" if self.double_quant else "")
        kind = "sym" if self.symmetric else ("asym-fz" if self.zero_domain == "float" else "asym")
        gran = {"tensor": "per-tensor", "channel": "per-channel"}.get(self.granularity, f"g{self.group_size}")
        return f"int{self.bits} {kind} {gran}"

    @property
    def float_zero(self) -> bool:
        """Whether ``zero`` holds a float offset (``x = scale * q + zero``) rather than a zero-point."""
        return self.zero_domain == "float"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (the scale dtype by name), for files and configs. ``zero_domain`` is
        written only when it is ``"float"``, so files of integer-zero specs read as before."""
        d = {
            "bits": self.bits,
            "symmetric": self.symmetric,
            "granularity": self.granularity,
            "axis": self.axis,
            "group_size": self.group_size,
            "scale_dtype": dtype_name(self.scale_dtype),
            "codebook": self.codebook,
            "double_quant": self.double_quant,
        }
        if self.zero_domain != "int":
            d["zero_domain"] = self.zero_domain
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantSpec:
        """Inverse of :meth:`to_dict`; a ValueError says which field is wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"a QuantSpec is described by an object, got {type(d).__name__}")
        fields = {**d, "scale_dtype": parse_dtype(d.get("scale_dtype", "float32"), "scale_dtype")}
        try:
            return cls(**fields)
        except TypeError as err:  # an unknown field name
            raise ValueError(f"invalid QuantSpec fields {sorted(d)}: {err}") from err


class BlockView:
    """A reshaped view of a tensor where each block's elements sit on ``reduce_dims``.

    The blocked shape ``[s0/b0, b0, s1/b1, b1, ...]`` is compacted (size-1 axes dropped, adjacent
    axes of the same kind merged) because reductions over a few contiguous dims are several times
    faster in torch than over many strided ones. ``scale_shape`` is how per-block tensors of the
    canonical shape ``[s0/b0, s1/b1, ...]`` broadcast against the view.
    """

    def __init__(self, shape: tuple[int, ...], block: tuple[int, ...]) -> None:
        self.shape = shape
        self.scales = tuple(n // b for n, b in zip(shape, block, strict=True))
        view: list[int] = []
        kinds: list[bool] = []  # True = block axis (reduced), False = count axis
        for n, b in zip(shape, block, strict=True):
            for size, is_block in ((n // b, False), (b, True)):
                if size == 1:
                    continue
                if kinds and kinds[-1] == is_block:
                    view[-1] *= size
                else:
                    view.append(size)
                    kinds.append(is_block)
        if True not in kinds:  # every block is one element: reduce over a trailing unit axis
            view.append(1)
            kinds.append(True)
        self.view = tuple(view)
        self.reduce_dims = tuple(i for i, k in enumerate(kinds) if k)
        self.scale_shape = tuple(1 if k else n for n, k in zip(view, kinds, strict=True))

    def of(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.view)

    def per_block(self, t: torch.Tensor) -> torch.Tensor:
        """A per-block tensor (canonical shape) reshaped to broadcast against :meth:`of`."""
        return t.reshape(self.scale_shape)

    def reduce(self, xv: torch.Tensor, op: str) -> torch.Tensor:
        r = xv.amax(dim=self.reduce_dims) if op == "max" else xv.amin(dim=self.reduce_dims)
        return r.reshape(self.scales)


def check_float_tensor(x: torch.Tensor, name: str = "x", *, finite: bool = True) -> None:
    """Raise a ValueError/TypeError naming ``name`` unless ``x`` is a finite, non-empty float tensor.

    ``finite=False`` skips the finiteness pass for callers that check block extrema instead
    (:func:`check_finite_extrema`), which costs nothing extra.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); nothing to quantize")
    if finite:
        # max and min propagate NaN and expose ±Inf: two cheap reductions instead of an
        # elementwise isfinite mask over the whole tensor.
        check_finite_extrema(x.amin(), x.amax(), name)


def check_finite_extrema(lo: torch.Tensor, hi: torch.Tensor, name: str = "x") -> None:
    """Raise unless the (block) minima ``lo`` and maxima ``hi`` are finite."""
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError(f"{name} contains NaN or Inf; quantization needs finite values")


@dataclass(eq=False)
class QuantizedTensor:
    """Integer codes plus the scales (and zeros) that turn them back into floats.

    ``dequantize()`` computes ``scale * (codes - zero)`` block by block (or ``scale * table[codes]``
    for codebooks). ``nbytes`` counts what storage really costs: codes packed to ``bits`` each,
    plus scales and zeros (plus the nested scale-of-scales for double quantization).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    spec: QuantSpec
    shape: torch.Size
    dtype: torch.dtype = torch.float32
    #: Double quantization (QLoRA): the stored form of the scales, ``scale ≈ scale_q.dequantize()
    #: + scale_offset``. ``scale`` then holds that reconstruction, kept in memory for speed;
    #: ``nbytes`` counts ``scale_q`` and ``scale_offset`` instead of ``scale``.
    scale_q: QuantizedTensor | None = None
    scale_offset: torch.Tensor | None = None
    codebook: torch.Tensor | None = field(default=None)

    @property
    def block_size(self) -> tuple[int, ...]:
        return self.spec.block_size(self.shape)

    @property
    def bits(self) -> int:
        return self.spec.bits

    def numel(self) -> int:
        return math.prod(self.shape)

    def scales(self) -> torch.Tensor:
        """The per-block scales in float32."""
        return self.scale.float()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Reconstruct the float tensor: ``scale * (q - zero)``, ``scale * q + zero`` (float zero
        domain) or ``scale * table[q]``."""
        dtype = dtype or self.dtype
        bv = BlockView(tuple(self.shape), self.block_size)
        if self.codebook is not None:
            values = bv.of(self.codebook.float()[self.codes.long()])
        else:
            values = bv.of(self.codes.float())
        if self.zero is not None and self.spec.float_zero:
            # two roundings, in this order, as llama.cpp and gguf-py compute Q4_1: (s q) + m
            values = values * bv.per_block(self.scales()) + bv.per_block(self.zero.float())
            return values.reshape(self.shape).to(dtype)
        if self.zero is not None:
            values = values - bv.per_block(self.zero.float())
        return (values * bv.per_block(self.scales())).reshape(self.shape).to(dtype)

    def unsigned_codes(self) -> torch.Tensor:
        """Codes shifted into ``[0, 2^bits - 1]`` (uint8), the form :mod:`qlab.packing` stores.

        Symmetric codes are stored offset by ``2^(bits-1)``, i.e. ``u = q + 2^(bits-1)``.
        """
        if self.codes.dtype == torch.int8:
            return (self.codes.to(torch.int16) + 2 ** (self.bits - 1)).to(torch.uint8)
        return self.codes

    @property
    def nbytes(self) -> int:
        """Bytes to store this tensor: packed codes + scales + zeros (+ double-quant metadata)."""
        n = math.ceil(self.numel() * self.bits / 8)
        if self.scale_q is not None:
            n += self.scale_q.nbytes
            if self.scale_offset is not None:
                n += self.scale_offset.numel() * self.scale_offset.element_size()
        else:
            n += self.scale.numel() * self.scale.element_size()
        if self.zero is not None:
            n += self.zero.numel() * self.zero.element_size()
        return n

    @property
    def bits_per_weight(self) -> float:
        """Average storage bits per element, overhead included."""
        return 8 * self.nbytes / self.numel()

    def to(self, device: torch.device | str) -> QuantizedTensor:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            codes=self.codes.to(device),
            scale=self.scale.to(device),
            zero=move(self.zero),
            scale_q=None if self.scale_q is None else self.scale_q.to(device),
            scale_offset=move(self.scale_offset),
            codebook=move(self.codebook),
        )

    def __repr__(self) -> str:
        return (
            f"QuantizedTensor({self.spec.describe()}, shape={tuple(self.shape)}, "
            f"bits_per_weight={self.bits_per_weight:.3f})"
        )


def per_group(t: torch.Tensor, rows: int, groups: int) -> torch.Tensor:
    """Scales or zeros of a ``[rows, in]`` weight as fp32 ``[rows, groups]``, one per row and group.

    ``t`` is ``[rows or 1, groups or a divisor of it]``: a per-tensor ``[1, 1]`` or per-channel
    ``[rows, 1]`` value is repeated over the groups it covers (the same weight, finer bookkeeping).
    """
    t = t.float().expand(rows, -1)
    return t.repeat_interleave(groups // t.shape[1], dim=1)


def check_finite(t: torch.Tensor, name: str) -> None:
    """Raise a ValueError naming ``name`` if the stored tensor ``t`` (a scale, a zero-point) holds NaN or
    Inf: one such value silently turns every output of its layer into NaN."""
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} holds {bad} NaN/Inf value(s); the stored quantization data is corrupt")

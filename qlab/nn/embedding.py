"""A quantized embedding that shares its packed rows with the output head: :class:`QuantEmbedding`.

Tied models (SmolLM2, Llama 3.2 1B, GPT-2) use one ``[vocab, hidden]`` matrix twice: the input
embedding looks up rows of it, and ``lm_head`` multiplies by all of it (``logits = h Eᵀ``). SmolLM2's
is 49152 x 576, 113 MB in fp32: every generated token reads it in full in the head, more than the
rest of the model (the 30 blocks hold 106 M weights but are quantized). Quantizing it only for the
head would store the matrix twice (the driver refuses that and leaves it float).

:class:`QuantEmbedding` holds a :class:`~qlab.nn.QuantLinear` of shape ``[vocab, hidden]`` (its
``weight`` is ``E``) and installs the same layer as the head, so the codes are stored once:

* lookup, ``E[ids]``: only the looked-up rows are unpacked and dequantized,
  ``E[i, k] = s[i, k // g] (u[i, k] - z[i, k // g])`` (or ``s[i, k // g] T[u[i, k]]`` for codebooks);
* head, ``h Eᵀ``: the QuantLinear's own forward (the C kernels' GEMV at decode, tiles at prefill).
"""

from __future__ import annotations

import torch
from torch import nn

from qlab.nn.linear import QuantLinear
from qlab.packing import unpack
from qlab.tensor import QuantizedTensor


class QuantEmbedding(nn.Module):
    """``nn.Embedding`` whose ``[num_embeddings, embedding_dim]`` table is a weight-only QuantLinear.

    Args:
        linear: the quantized table as a layer ``[num_embeddings, embedding_dim]`` (mode ``"weight"``,
            no bias, no input scale). Pass the same layer to the model as its output head to tie them.
        padding_idx: kept for ``repr`` and API parity with ``nn.Embedding`` (no gradient here).
    """

    def __init__(self, linear: QuantLinear, padding_idx: int | None = None) -> None:
        super().__init__()
        if not isinstance(linear, QuantLinear) or linear.mode != "weight":
            raise TypeError(f"linear must be a weight-only QuantLinear, got {linear!r}")
        if linear.bias is not None or linear.input_scale is not None:
            raise ValueError("an embedding table has no bias and no input scale")
        self.linear = linear
        self.padding_idx = padding_idx

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, build: object) -> QuantEmbedding:
        """Quantize ``emb.weight`` with ``build``: any recipe with ``build_layer(nn.Linear)`` (a
        :class:`qlab.QuantConfig`), applied to an ``nn.Linear`` holding the table as its weight."""
        w = emb.weight.detach()
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        lin.weight = nn.Parameter(w, requires_grad=False)
        layer = build.build_layer(lin)  # type: ignore[attr-defined]
        return cls(layer, emb.padding_idx)

    @property
    def num_embeddings(self) -> int:
        return self.linear.out_features

    @property
    def embedding_dim(self) -> int:
        return self.linear.in_features

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.linear.weight_dtype

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """``E[ids]`` in ``weight_dtype``, shape ``[*ids.shape, embedding_dim]``: only these rows unpacked.

        The gathered codes, with their rows of ``scale`` and ``zero`` (per-tensor and per-channel-shared
        values broadcast), are dequantized by :meth:`QuantizedTensor.dequantize`, the one formula for
        every spec (integer or float zero-point, symmetric, codebook).
        """
        lin, flat = self.linear, ids.reshape(-1)
        codes = unpack(lin.qweight[flat], lin.spec.bits, lin.in_features)
        if lin.spec.code_dtype == torch.int8:  # symmetric codes are stored offset by 2^(bits-1)
            codes = (codes.to(torch.int16) - 2 ** (lin.spec.bits - 1)).to(torch.int8)

        def rows(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if t is None or t.shape[0] == 1 else t[flat]

        qt = QuantizedTensor(
            codes=codes, scale=rows(lin.scale), zero=rows(lin.zero), spec=lin.spec,
            shape=torch.Size((flat.numel(), lin.in_features)), codebook=lin.codebook,
        )  # fmt: skip
        return qt.dequantize(lin.weight_dtype).reshape(*ids.shape, lin.in_features)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
        return self.rows(ids)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored table (shared with the head: count it once)."""
        return self.linear.nbytes

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.linear.describe()}"

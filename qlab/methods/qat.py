"""Quantization-aware training, a taste: train one layer's weight through its own quantizer.

Rounding has zero gradient almost everywhere, so a loss cannot be minimized through it directly. The
straight-through estimator (Bengio et al., 2013) lets the forward pass see the quantized weight and the
backward pass act as if quantization were the identity::

    ŵ = dequantize(quantize(w))        (any spec: RTN's min-max grid, recomputed from w at every step)
    w_ste = w + (ŵ - w).detach()       value ŵ, gradient ∂w_ste/∂w = 1

:func:`qat_quantize` keeps a float *latent* copy ``v`` of a Linear weight (starting at ``w``) and trains it
with Adam (cosine learning-rate decay) so that the layer's outputs on calibration inputs ``X`` match the
float layer's::

    minimize_v  mean( (X wᵀ - X ŵ(v)ᵀ)² )

then returns ``quantize(v)``: an ordinary RTN-format :class:`~qlab.quantize.QuantizedTensor`, stored and run
like any other. Real QAT trains a whole model on its task loss for many steps; this is the same mechanism on
one layer, for a few hundred steps.
"""

from __future__ import annotations

import math

import torch

from qlab.quantize import QuantizedTensor, QuantSpec, check_float_tensor, fake_quantize, quantize


def fake_quantize_ste(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``w + (ŵ - w).detach()`` with ``ŵ = dequantize(quantize(w, spec))``: the value of ``ŵ``, the
    gradient of the identity (straight-through)."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    check_float_tensor(w, "w")
    w_hat = fake_quantize(w.detach(), spec)
    return w + (w_hat - w).detach()


def qat_quantize(
    w: torch.Tensor,
    inputs: torch.Tensor,
    spec: QuantSpec,
    *,
    steps: int = 200,
    lr: float = 3e-4,
    dtype: torch.dtype = torch.float32,
) -> QuantizedTensor:
    """Quantize a Linear weight ``w`` [out, in] after ``steps`` Adam steps of straight-through training.

    Args:
        w: the float weight.
        inputs: the layer's calibration inputs ``X`` [..., in].
        spec: any spec :func:`qlab.quantize.quantize` accepts.
        steps: training steps (full batch: all of ``inputs`` at every step).
        lr: Adam's starting learning rate, decayed to 0 on a cosine.
        dtype: the float type the loop trains in (``torch.float32`` or ``torch.float64``).

    Returns ``quantize(v, spec)`` of the trained latent weight ``v``. Deterministic: no random draw.
    But in fp32 the loop is chaotic: a matmul summed in another order (another CPU's kernels) nudges
    ``v`` by an ulp, a code flips at a rounding boundary, the next gradient changes, and after 200
    steps a large share of the codes can differ. In fp64 those nudges stay far below every boundary,
    so the same codes come out on any machine, at about twice the cost on a CPU.
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    check_float_tensor(w, "w")
    check_float_tensor(inputs, "inputs")
    if w.dim() != 2:
        raise ValueError(f"w must be a Linear weight [out, in], got shape {tuple(w.shape)}")
    if inputs.shape[-1] != w.shape[1]:
        raise ValueError(f"inputs must be [..., {w.shape[1]}] (w's in-features), got {tuple(inputs.shape)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")

    x = inputs.detach().to(dtype).reshape(-1, w.shape[1])
    target = x @ w.detach().to(dtype).T
    v = w.detach().to(dtype).clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    with torch.enable_grad():  # callers often sit under no_grad (model code, evaluation)
        for _ in range(steps):
            loss = (x @ fake_quantize_ste(v, spec).T - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    qt = quantize(v.detach(), spec)
    qt.dtype = w.dtype  # it stands for w: dequantize() gives w's dtype whatever the loop ran in
    return qt

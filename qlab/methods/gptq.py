"""GPTQ (Frantar et al., 2022): quantize a layer column by column, pushing each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer error.

For a linear layer with calibration inputs ``X`` (rows = tokens) the quantity to keep small is the
output error ``||X Wᵀ - X Ŵᵀ||²``. Its Hessian with respect to a weight row is ``H = 2 XᵀX / n``.
Quantizing column ``j`` to ``q_j`` with error ``e_j = (w_j - q_j) / [H⁻¹]_jj`` and updating the rest
``w_{j+1:} -= e_j [H⁻¹]_{j, j+1:}`` is the optimal (OBS) compensation. GPTQ makes it fast:

* columns in a fixed order (or by decreasing ``diag(H)`` with ``act_order``), so the needed rows of
  ``H⁻¹`` are rows of its upper Cholesky factor ``U`` (``H⁻¹ = UᵀU``), computed once;
* lazy batch updates: within a block of ``block_size`` columns updates are applied immediately,
  to the rest of the matrix once per block (a matmul instead of many rank-1 updates);
* dampening ``H += damp · mean(diag H) · I`` keeps the Cholesky factorization stable.

Group-wise scales are chosen when the first column of a group is reached, from the weights as
updated so far (so later groups see the compensation). With ``act_order`` the columns are visited
out of order, so the group scales are chosen up front from the original weights ("static groups"):
the stored groups then stay contiguous in the original column order, as qlab's format requires.
"""

from __future__ import annotations

import torch

from qlab.quantize import QuantizedTensor, QuantSpec, check_float_tensor, compute_scale_zero


def _check_inputs(w: torch.Tensor, H: torch.Tensor, spec: QuantSpec, damp: float, block_size: int) -> None:
    check_float_tensor(w, "w")
    if w.dim() != 2:
        raise ValueError(f"w must be a 2-D weight [out_features, in_features], got shape {tuple(w.shape)}")
    if not isinstance(H, torch.Tensor):
        raise TypeError(f"H must be a torch.Tensor, got {type(H).__name__}")
    if H.shape != (w.shape[1], w.shape[1]):
        raise ValueError(
            f"H must be [in_features, in_features] = [{w.shape[1]}, {w.shape[1]}] to match w, "
            f"got {tuple(H.shape)}"
        )
    check_float_tensor(H, "H")
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if spec.codebook is not None:
        raise ValueError(f"spec: GPTQ here supports affine integer specs, got codebook {spec.codebook!r}")
    if spec.float_zero:
        raise ValueError("spec: GPTQ here uses integer-domain zero-points; use zero_domain='int'")
    if spec.granularity == "tensor" or (spec.granularity == "channel" and spec.axis % 2 != 0):
        raise ValueError(
            "spec: GPTQ needs per-output-channel (axis=0) or per-group scales, got " + spec.describe()
        )
    spec.block_size(w.shape)  # group_size must divide in_features
    if not damp >= 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def _column_params(cols: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RTN scale (and zero) per output row for the weights ``cols`` [out, k] of one group."""
    row_spec = QuantSpec.per_channel(
        spec.bits, symmetric=spec.symmetric, axis=0, scale_dtype=spec.scale_dtype
    )
    return compute_scale_zero(cols, row_spec)


def _quantize_column(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values of one column ``w`` [out] with per-row ``scale``/``zero`` [out]."""
    s = scale.float()
    q = torch.round(w / s)
    if zero is not None:
        q = q + zero.float()
    q = q.clamp(spec.qmin, spec.qmax)
    deq = s * (q - zero.float()) if zero is not None else s * q
    return q, deq


@torch.no_grad()
def gptq_quantize(
    w: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> QuantizedTensor:
    """Quantize a Linear weight ``w`` [out, in] with GPTQ given the input Hessian ``H`` [in, in].

    Args:
        w: the float weight.
        H: ``2 XᵀX / n`` from calibration inputs ``X`` (see :func:`qlab.calibration.hessian`).
        spec: affine spec, per-channel (axis 0) or per-group along the input dim.
        damp: fraction of ``mean(diag H)`` added to the diagonal.
        block_size: columns per lazy-update block.
        act_order: visit columns by decreasing ``diag(H)`` (most active inputs first).

    Returns a :class:`QuantizedTensor` in the shared convention ``w ≈ scale * (codes - zero)``.
    """
    _check_inputs(w, H, spec, damp, block_size)
    out_f, in_f = w.shape
    W = w.detach().float().clone()
    H = H.detach().float().clone()
    g = spec.group_size if spec.granularity == "group" else in_f
    assert g is not None
    n_groups = in_f // g

    # Inputs that never fire carry no information: fix their weight to 0 and H to identity there.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    if act_order or g == in_f:
        # Static parameters from the original weights (per channel: the only set of parameters).
        params = [_column_params(W[:, k * g : (k + 1) * g], spec) for k in range(n_groups)]
    else:
        params = [None] * n_groups  # chosen when the group's first column is reached

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_f)
    W = W[:, perm]
    H = H[perm][:, perm]

    diag_mean = torch.mean(torch.diag(H))
    H.diagonal().add_(damp * diag_mean if damp > 0 else 0.0)
    try:
        L = torch.linalg.cholesky(H.double())
        Hinv = torch.cholesky_inverse(L)
        U = torch.linalg.cholesky(Hinv, upper=True).float()
    except RuntimeError as err:  # torch raises LinAlgError, a RuntimeError subclass
        raise ValueError(
            f"H is not positive definite even with damp={damp}; use more calibration samples or a larger damp"
        ) from err

    codes = torch.zeros(out_f, in_f)
    scales = torch.zeros(out_f, n_groups)
    zeros = torch.zeros(out_f, n_groups) if not spec.symmetric else None
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            k = col // g
            if params[k] is None:  # dynamic groups: the group starts here (in order, col % g == 0)
                upcoming = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]
                params[k] = _column_params(upcoming, spec)
            s, z = params[k]
            s = s.reshape(-1)
            z = z.reshape(-1) if z is not None else None
            q, deq = _quantize_column(W1[:, i], s, z, spec)
            codes[:, col] = q
            err = (W1[:, i] - deq) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    for k, (s, z) in enumerate(params):  # type: ignore[misc]
        scales[:, k] = s.reshape(-1).float()
        if zeros is not None and z is not None:
            zeros[:, k] = z.reshape(-1).float()
    scale_t = scales.to(spec.scale_dtype)
    zero_t = zeros.to(spec.scale_dtype) if zeros is not None else None
    if spec.granularity == "channel":
        scale_t = scale_t.reshape(out_f, 1)
        zero_t = zero_t.reshape(out_f, 1) if zero_t is not None else None
    code_t = codes.to(spec.code_dtype)
    return QuantizedTensor(codes=code_t, scale=scale_t, zero=zero_t, spec=spec, shape=w.shape, dtype=w.dtype)

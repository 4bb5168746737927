"""HQQ: half-quadratic quantization (Badri & Shaji, 2023). No calibration data.

Round-to-nearest picks ``scale`` and ``zero`` from each group's min and max (rounding the zero to
an integer). HQQ starts from the same min-max grid with a fractional zero, keeps the scale, and
moves the zero-point to minimize an outlier-robust error between the weight and its
reconstruction ``Ŵ = s (q - z)``, with ``q = clamp(round(W/s + z))``::

    minimize_z  Σ |W - Ŵ(z)|^p          with p < 1 (default 0.7)

The ``|·|^p`` norm is not convex; half-quadratic splitting introduces an auxiliary error ``E``
and alternates two closed forms (``β`` grows by ``κ`` each step)::

    E  ← shrink_p(W - Ŵ, β)             (generalized soft threshold, the prox of |·|^p)
    z  ← mean_g( q - (W - E) / s )       (least squares in z with q fixed)

where ``shrink_p(r, β) = sign(r) · max(|r| - |r|^(p-1)/β, 0)``. Since ``q - (W - E)/s = z - (r - E)/s``
with ``r = W - Ŵ``, the zero update is ``z ← z - mean_g(sign(r) · min(|r|, |r|^(p-1)/β)) / s``.

With ``optimize_scale=True`` the second step fits ``s`` and ``z`` jointly by least squares of
``W - E ≈ s (q - z)`` (a line fit per group), which also lowers the squared error.

Differences from the reference ``hqq`` package, all for speed on CPU and none changing the
iteration: the weight is divided by the scale once; the loop runs on cache-sized chunks of
groups; where ``|r|`` is provably below the shrinkage threshold (nearly everywhere) the update needs
only ``mean(q)``, no power; a chunk stops when its zero-points stop moving. At the end each group
keeps round-to-nearest's parameters if those happen to have the lower lp error, so HQQ is never
worse than RTN on its objective, group by group. The zero-point ends up fractional (a float),
which :class:`~qlab.quantize.QuantizedTensor` stores as is: ``Ŵ = s (q - z)``.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from qlab.quantize import QuantizedTensor, QuantSpec, check_float_tensor, compute_scale_zero, quantize_affine

#: Elements per chunk of groups: 2^18 floats (1 MiB) keep a chunk's temporaries in cache.
CHUNK_ELEMENTS = 1 << 18


def _check_spec(spec: QuantSpec) -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if spec.codebook is not None:
        raise ValueError(f"spec: HQQ optimizes affine zero-points; codebook {spec.codebook!r} has none")
    if spec.symmetric:
        raise ValueError(
            "spec: HQQ optimizes the zero-point, so it needs an asymmetric spec (symmetric=False)"
        )


def as_groups(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``x`` viewed as ``[n_groups, group_elements]``, groups in the order of the spec's scale tensor.

    Covers per-group (last dim), per-channel along axis 0 and per-tensor granularity, whose blocks
    are contiguous in memory; per-channel along another axis moves that axis first.
    """
    if spec.granularity == "group":
        return x.reshape(-1, spec.group_size)
    if spec.granularity == "tensor":
        return x.reshape(1, -1)
    axis = spec.axis % x.dim()
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _from_groups(g: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    if spec.granularity == "channel" and spec.axis % x.dim() != 0:
        axis = spec.axis % x.dim()
        moved = [x.shape[axis]] + [n for d, n in enumerate(x.shape) if d != axis]
        return g.reshape(moved).movedim(0, axis)
    return g.reshape(x.shape)


def _lp(wn: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int, p: float) -> torch.Tensor:
    """Per-group ``mean |W - Ŵ|^p`` for normalized weights ``wn = W / scale``."""
    t = wn + zero
    rn = t.sub_(t.round().clamp_(0, qmax))
    return rn.abs_().pow_(p).mean(1, keepdim=True) * scale.pow(p)


def _zero_steps(
    wn: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int, p: float, iters: int, beta: float,
    kappa: float,
) -> torch.Tensor:  # fmt: skip
    """HQQ's zero-point iterations on one chunk (normalized units, ``rn = r / s``).

    The update is ``z ← z - mean(sign(rn) · min(|rn|, c |rn|^(p-1)))`` with ``c = s^(p-2) / β``. The
    minimum picks ``|rn|`` exactly when ``|rn| <= τ = c^(1/(2-p))``, and ``|rn|`` is at most
    ``max(1/2, max(wn) + z - qmax, -(min(wn) + z))`` (half a step inside the range, the clipping
    distance outside), known per group without touching the elements. Where that bound is below
    ``τ`` (nearly always: for weights of size 0.01-0.1 and β = 10, τ is tens of steps) the update is
    ``z ← mean(q) - mean(wn)``, two passes over the data instead of ten and a power. The other
    groups take the full shrinkage step. Stops when no zero-point moves.
    """
    w_mean = wn.mean(1, keepdim=True)
    w_min = wn.amin(1, keepdim=True)
    w_max = wn.amax(1, keepdim=True)
    for _ in range(iters):
        tau = (scale.pow(p - 2) / beta).pow(1 / (2 - p))
        bound = torch.maximum((w_max + zero - qmax).clamp_min(0.5), -(w_min + zero))
        q = (wn + zero).round_().clamp_(0, qmax)
        new_zero = q.mean(1, keepdim=True) - w_mean
        wide = (bound > tau).flatten()
        if bool(wide.any()):
            idx = wide.nonzero().flatten()
            rn = wn[idx] + zero[idx] - q[idx]
            a = rn.abs().clamp_min_(1e-30)
            c = scale[idx].pow(p - 2) / beta
            resid = torch.minimum(a, a.pow(p - 1) * c).copysign_(rn)
            new_zero[idx] = zero[idx] - resid.mean(1, keepdim=True)
        if torch.equal(new_zero, zero):
            break
        zero = new_zero
        beta *= kappa
    return zero


def hqq_zero_update(
    w: torch.Tensor,
    scale: torch.Tensor | float,
    zero: torch.Tensor | float,
    *,
    bits: int,
    p: float = 0.7,
    beta: float = 10.0,
    steps: int = 1,
) -> torch.Tensor:
    """HQQ's zero-point update for groups of ``w`` (rows of a 2-D tensor, or one 1-D group) with a fixed
    ``scale``: ``steps`` half-quadratic iterations from ``zero``, as :func:`hqq_quantize` runs them.

    One step is ``z ← z - mean(sign(r) · min(|r|, c |r|^(p-1)))`` on the normalized errors
    ``r = w/s + z - q``, ``q = clamp(round(w/s + z), 0, 2^bits - 1)``, with ``c = s^(p-2) / β``. Where
    every ``|r|`` is below the threshold ``τ = c^(1/(2-p))`` the minimum is ``|r|`` itself: the
    shrinkage zeroes every error, and the update is ``z ← mean(q) - mean(w/s)``.

    Returns the new zero-points, one per group (shape ``[groups, 1]``).
    """
    w2 = w.float().reshape(1, -1) if w.dim() == 1 else w.float()
    if w2.dim() != 2:
        raise ValueError(f"w must be one group (1-D) or groups as rows (2-D), got shape {tuple(w.shape)}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    s = torch.as_tensor(scale, dtype=torch.float32).reshape(-1, 1).expand(w2.shape[0], 1)
    z = torch.as_tensor(zero, dtype=torch.float32).reshape(-1, 1).expand(w2.shape[0], 1).clone()
    return _zero_steps(w2 / s, s, z, 2**bits - 1, p, steps, beta, 1.0)


def _scale_and_zero_steps(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int, p: float, iters: int, beta: float,
    kappa: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Iterations that refit scale and zero: shrink, then a least-squares line ``W - E ≈ s (q - z)``.

    Keeps, per group, the parameters with the lowest lp error seen; stops when no group improves.
    """
    best_scale, best_zero = scale.clone(), zero.clone()
    best_err = torch.full_like(zero, float("inf"))
    for _ in range(iters + 1):
        t = w / scale + zero
        q = t.round().clamp_(0, qmax)
        rn = t.sub_(q)
        a = rn.abs().clamp_min_(1e-30)
        apm1 = a.pow(p - 1)
        err = (a * apm1).mean(1, keepdim=True) * scale.pow(p)
        better = err < best_err
        if not bool(better.any()):
            break
        best_err = torch.where(better, err, best_err)
        best_zero = torch.where(better, zero, best_zero)
        best_scale = torch.where(better, scale, best_scale)
        resid = torch.minimum(a, apm1.mul_(scale.pow(p - 2) / beta)).copysign_(
            rn
        )  # r - shrink(r), normalized
        target = w - (rn - resid) * scale  # W - E in weight units
        qm, tm = q.mean(1, keepdim=True), target.mean(1, keepdim=True)
        qc = q - qm
        var = qc.pow(2).mean(1, keepdim=True)
        cov = (qc * (target - tm)).mean(1, keepdim=True)
        new_scale = torch.where(var > 0, cov / var.clamp_min(1e-30), scale)
        scale = torch.where(new_scale > 0, new_scale, scale)
        zero = qm - tm / scale
        beta *= kappa
    return best_scale, best_zero


@torch.no_grad()
def hqq_quantize(
    w: torch.Tensor,
    spec: QuantSpec,
    *,
    p: float = 0.7,
    iters: int = 20,
    beta: float = 10.0,
    kappa: float = 1.01,
    optimize_scale: bool = False,
    init: str = "minmax",
) -> QuantizedTensor:
    """Quantize ``w`` with HQQ: min-max scales, zero-points optimized for ``mean |W - Ŵ|^p``.

    Args:
        w: float tensor (a Linear weight ``[out, in]``, or any shape the spec accepts).
        spec: an asymmetric affine :class:`QuantSpec` (1-8 bits, per-group/channel/tensor).
        p: the lp "norm" exponent, ``0 < p <= 1``; smaller is more robust to outliers.
        iters: maximum half-quadratic iterations; a chunk stops early when its zero-points stop
            moving (or, with ``optimize_scale``, when no group's lp error improves).
        beta, kappa: the penalty weight of the splitting and its growth factor per iteration.
        optimize_scale: also refit the scale each step (least squares on the shrunk target).
        init: ``"minmax"`` starts from each group's own [min, max] with a fractional zero (the
            paper); ``"rtn"`` starts from round-to-nearest's grid (range widened to include 0,
            integer zero) and lets the iterations move the zero from there.

    Returns a :class:`QuantizedTensor` with fractional zero-points: ``w ≈ scale * (codes - zero)``. A spec
    with ``zero_domain="float"`` gets the same optimization, stored as the offset ``m = -scale * zero``
    (``w ≈ scale * codes + m``, llama.cpp's Q4_1 form); codes are recomputed from the stored ``m``.
    """
    check_float_tensor(w, "w")
    _check_spec(spec)
    if spec.float_zero:
        qt = hqq_quantize(
            w, replace(spec, zero_domain="int"), p=p, iters=iters, beta=beta, kappa=kappa,
            optimize_scale=optimize_scale, init=init,
        )  # fmt: skip
        m = (-qt.scale.float() * qt.zero.float()).to(spec.scale_dtype)
        return QuantizedTensor(
            codes=quantize_affine(w, spec, qt.scale, m), scale=qt.scale, zero=m, spec=spec, shape=w.shape,
            dtype=w.dtype,
        )  # fmt: skip
    if not 0 < p <= 1:
        raise ValueError(f"p must be in (0, 1], got {p}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be a non-negative int, got {iters!r}")
    if init not in ("minmax", "rtn"):
        raise ValueError(f"init must be 'minmax' or 'rtn', got {init!r}")
    if beta <= 0 or kappa < 1:
        raise ValueError(f"need beta > 0 and kappa >= 1, got beta={beta}, kappa={kappa}")

    rtn_scale, rtn_zero = compute_scale_zero(w, spec)
    assert rtn_zero is not None
    scale_shape = rtn_scale.shape
    wg = as_groups(w.float(), spec)
    n_groups, g = wg.shape
    rows = max(1, CHUNK_ELEMENTS // g)
    out_s = torch.empty(n_groups, 1)
    out_z = torch.empty(n_groups, 1)
    for i in range(0, n_groups, rows):
        sl = slice(i, i + rows)
        wc = wg[sl].contiguous()
        rs, rz = rtn_scale.float().reshape(-1, 1)[sl], rtn_zero.float().reshape(-1, 1)[sl]
        if init == "rtn":
            s0, z0 = rs, rz
        else:  # as the HQQ paper does: the group's own [min, max] on the grid, fractional zero
            lo, hi = wc.amin(1, keepdim=True), wc.amax(1, keepdim=True)
            s0 = torch.where(hi > lo, (hi - lo) / spec.qmax, torch.ones_like(hi))
            z0 = -lo / s0
        if optimize_scale:
            sc, zc = _scale_and_zero_steps(wc, s0, z0, spec.qmax, p, iters, beta, kappa)
        else:
            sc, zc = s0, _zero_steps(wc / s0, s0, z0, spec.qmax, p, iters, beta, kappa)
        # Keep round-to-nearest's parameters where they happen to be better (never worse than RTN).
        worse = _lp(wc / sc, sc, zc, spec.qmax, p) > _lp(wc / rs, rs, rz, spec.qmax, p)
        out_s[sl] = torch.where(worse, rs, sc)
        out_z[sl] = torch.where(worse, rz, zc)
    new_scale = out_s.to(spec.scale_dtype)
    new_zero = out_z.to(spec.scale_dtype)
    # Codes from the stored (possibly rounded) scale and zero: q = clamp(round(W/s + z)). With a
    # fractional zero this differs from round(W/s) + z, so it is computed here, not by quantize_affine.
    codes_g = (wg / new_scale.float() + new_zero.float()).round_().clamp_(0, spec.qmax)
    codes = _from_groups(codes_g, w, spec).to(spec.code_dtype)
    return QuantizedTensor(
        codes=codes,
        scale=new_scale.reshape(scale_shape),
        zero=new_zero.reshape(scale_shape),
        spec=spec,
        shape=w.shape,
        dtype=w.dtype,
    )

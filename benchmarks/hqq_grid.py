"""RTN vs HQQ on SmolLM2-135M over a grid of bits x group size: HQQ's objective, output error, perplexity.

    python benchmarks/hqq_grid.py --json lessons/data/hqq_grid.json

For every grid point and quantizer, every linear layer except the tied ``lm_head`` is replaced by its
reconstruction (fake quantization, as in ``benchmarks/hqq_reference_ppl.py``), and the row records,
summed over *all* those layers:

* ``lp_error``: mean ``|W - Ŵ|^0.7`` over all weights (HQQ's objective, the proxy it minimizes);
* ``weight_sqnr_db``: ``10 log10(Σ|W|² / Σ|W - Ŵ|²)``;
* ``output_sqnr_db``: the same for the layer outputs on calibration inputs (4 windows of 128 tokens
  from the calibration plays, seed 0, captured from the float model): ``Σ|XWᵀ|² / Σ|X(W - Ŵ)ᵀ|²``;
* ``perplexity`` on ``--windows`` windows of 512 tokens of the evaluation plays (paired: same text).

A group size ``a|b`` uses ``a`` where it divides a layer's width and ``b`` otherwise: ``128|144`` is the
methods table's int4 "g128" (g144 on the 576-wide layers, g128 on the 1536-wide ``down_proj``).
Rows are written as they finish (the JSON is rewritten after each), so a partial run is usable.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace

import torch

from qlab.calibration import capture_inputs
from qlab.evaluate import perplexity
from qlab.methods.hqq import hqq_quantize
from qlab.models import calibration_batches, load_smollm2
from qlab.quantize import QuantSpec, quantize

QUANTIZERS = {
    "rtn": lambda w, spec: quantize(w, spec).dequantize(),
    "hqq": lambda w, spec: hqq_quantize(w, spec).dequantize(),
    "hqq+scale": lambda w, spec: hqq_quantize(w, spec, optimize_scale=True).dequantize(),
    # Float zero-points (x = s*q + m, llama.cpp's Q4_1 form): min-max RTN no longer rounds its zero to an
    # integer, and HQQ keeps its fractional zero in the float domain.
    "rtn-fz": lambda w, spec: quantize(w, replace(spec, zero_domain="float")).dequantize(),
    "hqq-fz": lambda w, spec: hqq_quantize(w, replace(spec, zero_domain="float")).dequantize(),
}


def pick_group(width: int, choices: list[int]) -> int:
    for g in choices:
        if width % g == 0:
            return g
    raise ValueError(f"no group size of {choices} divides {width}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", default="4:64,3:64,2:64,4:128|144,3:128|144,4:32,3:32,2:32,2:128|144",
                    help="bits:group pairs, in the order they run")  # fmt: skip
    ap.add_argument("--methods", default="rtn,hqq")
    ap.add_argument("--extra", default="hqq+scale@4:64,hqq+scale@3:64,hqq+scale@2:64",
                    help="more method@bits:group runs after the grid")  # fmt: skip
    ap.add_argument("--windows", type=int, default=8, help="evaluation windows of 512 tokens")
    ap.add_argument("--no-float", action="store_true", help="skip the float model's row")
    ap.add_argument("--no-ppl", action="store_true", help="weight and output errors only (no perplexity)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    model, tokenizer = load_smollm2()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    calib = calibration_batches(tokenizer, n_samples=4, seq_len=128, seed=0)
    with capture_inputs({n: model.get_submodule(n) for n in names}) as seen, torch.no_grad():
        model(calib)
    inputs = {n: seen[n].cat() for n in names}
    out_power = sum((inputs[n] @ originals[n].T).pow(2).sum().item() for n in names)
    w_power = sum(w.pow(2).sum().item() for w in originals.values())
    n_weights = sum(w.numel() for w in originals.values())

    def ppl() -> float:
        return perplexity(model, tokenizer, seq_len=512, max_windows=args.windows, progress=False)

    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"command": "python benchmarks/hqq_grid.py " + " ".join(sys.argv[1:]),
                           "windows": args.windows, "rows": rows}, f, indent=1)  # fmt: skip

    with torch.no_grad():
        if not args.no_float and not args.no_ppl:
            emit({"method": "fp32", "bits": 32, "group": "-", "perplexity": round(ppl(), 3)})
        jobs = [(p, m) for p in args.points.split(",") for m in args.methods.split(",")]
        jobs += [(e.split("@")[1], e.split("@")[0]) for e in args.extra.split(",") if e]
        unknown = {m for _, m in jobs} - set(QUANTIZERS)
        if unknown:
            raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {sorted(QUANTIZERS)}")
        for point, method in jobs:
            bits_s, group_s = point.split(":")
            bits, groups = int(bits_s), [int(g) for g in group_s.split("|")]
            t0 = time.process_time()
            lp = err2 = out_err2 = 0.0
            for n in names:
                w = originals[n]
                w_hat = QUANTIZERS[method](w, QuantSpec.per_group(bits, pick_group(w.shape[1], groups)))
                d = w - w_hat
                lp += d.abs().pow(0.7).sum().item()
                err2 += d.pow(2).sum().item()
                out_err2 += (inputs[n] @ d.T).pow(2).sum().item()
                if not args.no_ppl:
                    model.get_submodule(n).weight.copy_(w_hat)
            cpu = time.process_time() - t0
            emit({
                "method": method, "bits": bits, "group": group_s,
                "lp_error": lp / n_weights,
                "weight_sqnr_db": round(10 * math.log10(w_power / err2), 3),
                "output_sqnr_db": round(10 * math.log10(out_power / out_err2), 3),
                "perplexity": None if args.no_ppl else round(ppl(), 3),
                "quantize_cpu_seconds": round(cpu, 1),
            })  # fmt: skip
        for n in names:
            model.get_submodule(n).weight.copy_(originals[n])
    return 0


if __name__ == "__main__":
    sys.exit(main())

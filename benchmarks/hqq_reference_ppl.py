"""SmolLM2-135M perplexity with every linear fake-quantized by RTN, qlab's HQQ and the ``hqq`` package.

    python benchmarks/hqq_reference_ppl.py [--bits 3] [--group-size 64] [--windows 8] [--json out.json]

It answers one question: does HQQ beat round-to-nearest in perplexity on this model? qlab's HQQ is
checked against the reference implementation on the same weights, in the same run. The ``hqq``
package is optional (``pip install hqq``). Weights are replaced by their reconstructions
(fake quantization), so only the quantizers differ, not the forward paths.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from qlab.evaluate import perplexity
from qlab.methods.hqq import hqq_quantize
from qlab.models import load_smollm2
from qlab.quantize import QuantSpec, quantize


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--windows", type=int, default=8, help="512-token evaluation windows")
    ap.add_argument("--json", help="also write the rows (quantizer, perplexity, seconds) here")
    ap.add_argument("--only", help="comma-separated quantizers to run (default: all)")
    args = ap.parse_args(argv)
    spec = QuantSpec.per_group(args.bits, args.group_size)

    model, tokenizer = load_smollm2()
    originals = {
        name: mod.weight.detach().clone()
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and name != "lm_head"
    }

    quantizers = {
        "rtn": lambda w: quantize(w, spec).dequantize(),
        "qlab hqq": lambda w: hqq_quantize(w, spec).dequantize(),
        "qlab hqq init=rtn": lambda w: hqq_quantize(w, spec, init="rtn").dequantize(),
    }
    try:
        from hqq.core.quantize import Quantizer

        def reference(w: torch.Tensor) -> torch.Tensor:
            wq, meta = Quantizer.quantize(
                w, nbits=args.bits, group_size=args.group_size, axis=1, optimize=True, bitpack=False,
                device="cpu",
            )  # fmt: skip
            return Quantizer.dequantize(wq, meta).float().reshape(w.shape)

        quantizers["hqq package"] = reference
    except ImportError:
        print("(hqq package not installed: its row is left out)")

    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - set(quantizers))
        if unknown:
            ap.error(f"--only: unknown quantizers {unknown}; choose from {sorted(quantizers)}")
        quantizers = {k: v for k, v in quantizers.items() if k in wanted}
    print(f"SmolLM2-135M, int{args.bits} g{args.group_size}, {args.windows} x 512 evaluation tokens")
    print(f"{'quantizer':<20} {'perplexity':>12} {'seconds':>8}")
    rows = []
    with torch.no_grad():
        for label, fn in quantizers.items():
            t0 = time.perf_counter()
            for name, w in originals.items():
                model.get_submodule(name).weight.copy_(fn(w))
            seconds = time.perf_counter() - t0
            ppl = perplexity(model, tokenizer, seq_len=512, max_windows=args.windows, progress=False)
            print(f"{label:<20} {ppl:12.2f} {seconds:8.1f}", flush=True)
            rows.append({"quantizer": label, "perplexity": round(ppl, 3), "seconds": round(seconds, 1)})
    if args.json:
        with open(args.json, "w") as f:
            given = sys.argv[1:] if argv is None else argv
            command = "python benchmarks/hqq_reference_ppl.py " + " ".join(given)
            json.dump({"command": command, "bits": args.bits, "group_size": args.group_size,
                       "windows": args.windows, "rows": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()

"""The methods table of issue 4: RTN, HQQ, GPTQ, AWQ (and NF4) on SmolLM2-135M.

Perplexity on the held-out evaluation plays, calibration on the disjoint calibration plays (fixed
seed), bits per weight (codes + scales + zeros) and quantization time, for int4 g128, int3 g64 and
int2 g64. SmolLM2's 576-wide layers cannot hold groups of 128, so they use g144 in the int4 row
(the table says so). Same as ``qlab compare``.

    python benchmarks/methods_table.py [--windows 16] [--samples 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from qlab.compare import DEFAULT_METHODS, compare_methods, format_table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--schemes", default="4:128,3:64,2:64", help="bits:group pairs")
    ap.add_argument("--no-nf4", action="store_true")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=256, help="calibration window length")
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows of 512 tokens")
    ap.add_argument("--no-float", action="store_true", help="skip the float model's row")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    schemes = [tuple(int(v) for v in s.split(":")) for s in args.schemes.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}", flush=True)
    start = time.perf_counter()
    rows = compare_methods(
        args.methods.split(","),
        schemes,  # type: ignore[arg-type]
        nf4=not args.no_nf4,
        include_float=not args.no_float,
        n_samples=args.samples,
        seq_len=args.seq_len,
        eval_windows=args.windows,
        progress=False,
        on_row=lambda r: print(json.dumps(r), flush=True),
    )
    print(format_table(rows))
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Lesson 08's settings table: SmolLM2-135M at fp32, W8A16, W4A16 g64, W2A16 g64 (round-to-nearest)
and the method picker's choice for a CPU, 4 bits, no calibration data and 200 MB (HQQ int4 g64).

Each row: the model's bytes now (``qlab.memory_footprint``) and perplexity on evenly spaced windows of
the held-out evaluation plays (``qlab.evaluate.perplexity``), with each window's own perplexity so the
lesson can re-measure one window live and compare. SmolLM2's "fp32" is SmolLM2-135M-Instruct
dequantized from its Q4_1 GGUF (the official release is bf16).

    python benchmarks/end_to_end_table.py --json lessons/data/end_to_end_08.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from typing import Any

import torch
import transformers

from qlab import evaluate, memory_footprint, models, quantize_model
from qlab.config import QuantConfig
from qlab.picker import recommend


def settings() -> dict[str, QuantConfig | None]:
    """The rows: ``None`` is the float model; the last is the picker's choice."""
    rec = recommend(
        "cpu", 4, calibration=False, finetune=False, model="SmolLM2-135M", memory_bytes=200 * 10**6
    )
    return {
        "fp32": None,
        "W8A16": QuantConfig("rtn", bits=8, group_size=None),
        "W4A16 g64": QuantConfig("rtn", bits=4, group_size=64),
        "W2A16 g64": QuantConfig("rtn", bits=2, group_size=64),
        f"{rec.method} ({rec.settings})": rec.config,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    ap.add_argument("--windows", type=int, default=8, help="evenly spaced windows")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", help="write the table here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    model, tokenizer = models.load_smollm2()
    ids = models.tokenize(tokenizer, models.shakespeare_text("evaluation"))
    starts = evaluate.window_starts(len(ids), args.seq_len, args.seq_len, args.windows)
    rows: list[dict[str, Any]] = []
    for name, config in settings().items():
        m = model if config is None else quantize_model(copy.deepcopy(model), config, progress=False)
        per_window = [
            evaluate.perplexity(m, ids[s : s + args.seq_len], seq_len=args.seq_len, progress=False)
            for s in starts
        ]
        # every window scores seq_len - 1 tokens, so the run's perplexity is the geometric mean
        ppl = math.exp(sum(math.log(p) for p in per_window) / len(per_window))
        row = {
            "setting": name,
            "mb": round(memory_footprint(m).total_now / 1e6, 3),
            "perplexity": ppl,
            "window_perplexity": per_window,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        del m
    result = {
        "command": f"python benchmarks/end_to_end_table.py --seq-len {args.seq_len} --windows {args.windows}",
        "model": "SmolLM2-135M-Instruct, dequantized from Q4_1 (official release: bf16)",
        "text": "Shakespeare evaluation plays (qlab.text)",
        "seq_len": args.seq_len,
        "window_starts": starts,
        "rows": rows,
    }
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""KV-cache quantization on SmolLM2-135M: perplexity at long context and the cache's bytes.

Each window of ``--seq-len`` tokens of the held-out evaluation plays is fed ``--chunk`` tokens at a
time through a cache (``qlab.kvcache.streamed_nll``), so every chunk attends to the quantized states
of the tokens before it; the most recent ``--residual`` tokens stay in float. The baseline is
transformers' ``DynamicCache`` (fp32 states) on the same windows. SmolLM2's "fp32" weights are
SmolLM2-135M-Instruct dequantized from its Q4_1 GGUF (the official release is bf16).

Per-token rows group ``--group`` channels of a token, per-channel rows ``--group`` tokens of a
channel: the same number of scales and offsets per element, so only the grouping differs.

Also measures why keys want per-channel groups: for every layer and KV head, the largest
per-channel absolute maximum of K (and V) over the median channel's, on one window.

    python benchmarks/kv_cache.py [--seq-len 1024] [--windows 2] [--chunk 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import torch
import transformers
from transformers import DynamicCache

from qlab import models
from qlab.evaluate import window_starts
from qlab.kvcache import KVQuantSpec, QuantizedKVCache, cache_nbytes, streamed_nll


def configs(group: int) -> dict[str, tuple[KVQuantSpec, KVQuantSpec] | None]:
    """Rows of the table: ``None`` is the float cache; else (key spec, value spec)."""
    tok = lambda b: KVQuantSpec(b, "token", group)  # noqa: E731 - a row label, not an API
    ch = lambda b: KVQuantSpec(b, "channel", group)  # noqa: E731
    rows: dict[str, tuple[KVQuantSpec, KVQuantSpec] | None] = {"fp32 (DynamicCache)": None}
    rows["int8 K per-token, V per-token"] = (tok(8), tok(8))
    for b in (4, 2):
        rows[f"int{b} K per-token, V per-token"] = (tok(b), tok(b))
        rows[f"int{b} K per-channel, V per-channel"] = (ch(b), ch(b))
        rows[f"int{b} K per-token, V per-channel"] = (tok(b), ch(b))
        rows[f"int{b} K per-channel, V per-token (KIVI)"] = (ch(b), tok(b))
    return rows


def outlier_ratios(model: Any, window: torch.Tensor) -> dict[str, Any]:
    """Per layer and KV head: max over channels of (max over tokens of |state|), divided by the
    median channel's. Channel outliers give large ratios; the same for tokens as a contrast."""
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(window[None], cache=cache)
    out: dict[str, Any] = {}
    for name in ("keys", "values"):
        states = torch.stack([getattr(layer, name)[0] for layer in cache.layers])  # [L, H, T, D]
        per_channel = states.abs().amax(dim=-2)  # [L, H, D]
        per_token = states.abs().amax(dim=-1)  # [L, H, T]
        ch = per_channel.amax(-1) / per_channel.median(-1).values
        tk = per_token.amax(-1) / per_token.median(-1).values
        out[name] = {
            "channel_ratio_median": round(float(ch.median()), 2),
            "channel_ratio_max": round(float(ch.max()), 2),
            "token_ratio_median": round(float(tk.median()), 2),
        }
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    transformers.utils.logging.disable_progress_bar()
    model, tokenizer = models.load_smollm2()
    ids = models.tokenize(tokenizer, models.shakespeare_text("evaluation"))
    starts = window_starts(len(ids), args.seq_len, args.seq_len, args.windows)
    windows = [ids[s : s + args.seq_len][None] for s in starts]
    rows = []
    for label, specs in configs(args.group).items():
        t0 = time.perf_counter()
        nll, count, nbytes = 0.0, 0, 0
        for w in windows:
            if specs is None:
                cache = DynamicCache(config=model.config)
            else:
                cache = QuantizedKVCache(model.config, *specs, residual_length=args.residual)
            total, n = streamed_nll(model, w, cache, chunk_size=args.chunk)
            nll, count, nbytes = nll + total, count + n, cache_nbytes(cache)
        row = {
            "cache": label,
            "key": None if specs is None else specs[0].describe(),
            "value": None if specs is None else specs[1].describe(),
            "perplexity": round(math.exp(nll / count), 3),
            "cache_bytes": nbytes,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {
        "command": (
            f"python benchmarks/kv_cache.py --seq-len {args.seq_len} --windows {args.windows} "
            f"--chunk {args.chunk} --residual {args.residual} --group {args.group}"
        ),
        "model": "SmolLM2-135M-Instruct, dequantized from Q4_1 (official release: bf16)",
        "text": "Shakespeare evaluation plays (qlab.text)",
        "seq_len": args.seq_len,
        "windows": len(windows),
        "chunk": args.chunk,
        "residual_length": args.residual,
        "group_size": args.group,
        "rows": rows,
        "outliers": outlier_ratios(model, windows[0][0]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=1024, help="tokens per window")
    ap.add_argument("--windows", type=int, default=2, help="evenly spaced windows of the evaluation plays")
    ap.add_argument("--chunk", type=int, default=128, help="tokens fed per forward call")
    ap.add_argument("--residual", type=int, default=128, help="recent tokens kept in float")
    ap.add_argument(
        "--group", type=int, default=32, help="group size: tokens (per-channel) or channels (per-token)"
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = run(args)
    print(json.dumps(result["outliers"], indent=1))
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

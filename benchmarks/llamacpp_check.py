"""Cross-check a GGUF file exported by qlab: perplexity in qlab, in transformers, and in llama.cpp itself.

Run: ``python benchmarks/llamacpp_check.py [FILE.gguf] [--windows 16] [--seq-len 512]``

Without ``FILE`` it exports SmolLM2 as distributed (``qlab.gguf.load_gguf`` of the original Q4_1 file, then
``save_gguf``; the bytes are the original's) to a temporary file and checks that. It prints:

* qlab: :func:`qlab.evaluate.perplexity` of the file loaded packed with :func:`qlab.gguf.load_gguf`;
* transformers: the same measure on ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` (its own
  GGUF reader, widening to fp32);
* llama.cpp: ``llama-perplexity`` on the same evaluation plays (its own windows of ``--seq-len`` tokens
  with BOS, scoring the second half of each: comparable in size, not digit for digit) and ``llama-bench``
  (prompt processing and generation speed), both without weight repacking (``--no-repack``, and
  llama-bench's ``--repack 0``: the AMX repack path crashes in these VMs).

llama.cpp is not on PyPI for this platform. The script looks for ``llama-perplexity`` and ``llama-bench`` in
``$LLAMA_CPP_BIN`` (a folder) or on ``PATH``; when they are missing it prints how to build them (about 15
minutes on 2 cores) and still prints the qlab and transformers rows::

    pip download --no-deps --no-binary :all: llama-cpp-python
    tar xf llama_cpp_python-*.tar.gz && cd llama_cpp_python-*/vendor/llama.cpp
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \\
          -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
    cmake --build build -j2 --target llama-perplexity llama-bench
    export LLAMA_CPP_BIN=$PWD/build/bin
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BUILD_HINT = __doc__[__doc__.index("    pip download") :].rstrip()


def find_binary(name: str) -> Path | None:
    """``name`` in ``$LLAMA_CPP_BIN`` or on ``PATH``, or None."""
    folder = os.environ.get("LLAMA_CPP_BIN")
    if folder and (Path(folder) / name).is_file():
        return Path(folder) / name
    found = shutil.which(name)
    return Path(found) if found else None


def _env(binary: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = f"{binary.parent}:{env.get('LD_LIBRARY_PATH', '')}"
    return env


def llamacpp_perplexity(binary: Path, gguf: Path, text: Path, seq_len: int, windows: int) -> float:
    cmd = [str(binary), "-m", str(gguf), "-f", str(text), "-c", str(seq_len), "--chunks", str(windows),
           "--no-repack", "-t", str(os.cpu_count() or 1)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(binary))
    out = proc.stdout + proc.stderr
    m = re.search(r"Final estimate: PPL = ([\d.]+)", out)
    if proc.returncode != 0 or m is None:
        raise RuntimeError(f"llama-perplexity failed ({proc.returncode}):\n{out[-2000:]}")
    return float(m.group(1))


def llamacpp_bench(binary: Path, gguf: Path) -> str:
    cmd = [str(binary), "-m", str(gguf), "-p", "128", "-n", "32", "-r", "3", "--repack", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(binary))
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-2000:]}")
    return proc.stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "gguf", nargs="?", type=Path, help="an exported llama GGUF (default: SmolLM2, re-exported)"
    )
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()

    import torch

    from qlab import evaluate
    from qlab.cache import transformers as _transformers
    from qlab.gguf import gguf_tokenizer, load_gguf, save_gguf
    from qlab.models import shakespeare_text, smollm2_gguf

    tmp = Path(tempfile.mkdtemp(prefix="qlab-llamacpp-"))
    try:
        if args.gguf is None:
            source = smollm2_gguf()
            args.gguf = tmp / "smollm2-export.gguf"
            save_gguf(load_gguf(source), args.gguf, tokenizer_from=source)
        tok = gguf_tokenizer(args.gguf)
        opts = {"seq_len": args.seq_len, "max_windows": args.windows, "progress": False}
        rows = [("qlab load_gguf (packed)", evaluate.perplexity(load_gguf(args.gguf), tok, **opts))]
        hf = _transformers().AutoModelForCausalLM.from_pretrained(
            str(args.gguf.parent), gguf_file=args.gguf.name, dtype=torch.float32
        )
        rows.append(("transformers gguf_file= (fp32)", evaluate.perplexity(hf, tok, **opts)))
        ppl_bin, bench_bin = find_binary("llama-perplexity"), find_binary("llama-bench")
        bench = None
        if ppl_bin is None or bench_bin is None:
            print("llama.cpp binaries not found ($LLAMA_CPP_BIN or PATH). To build them:\n" + BUILD_HINT)
        else:
            text = tmp / "eval.txt"
            text.write_text(shakespeare_text("evaluation"))
            ppl = llamacpp_perplexity(ppl_bin, args.gguf, text, args.seq_len, args.windows)
            rows.append(("llama.cpp llama-perplexity", ppl))
            bench = llamacpp_bench(bench_bin, args.gguf)
        print(
            f"\n{args.gguf.name}: perplexity on the evaluation plays ({args.windows} x {args.seq_len} tokens)"
        )
        for name, ppl in rows:
            print(f"  {name:34s} {ppl:8.3f}")
        if bench:
            print("\nllama-bench (--repack 0):\n" + bench)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

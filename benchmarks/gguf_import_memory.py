"""Peak memory of reading SmolLM2's GGUF file: packed (``qlab.gguf.load_gguf``) against the fp32 widening.

Run: ``python benchmarks/gguf_import_memory.py [--gguf PATH]`` (default: ``qlab.models.smollm2_gguf()``).

Each route runs in a fresh subprocess and reports its peak resident set size
(``VmHWM`` in ``/proc/self/status``; not ``ru_maxrss``, which survives ``execve`` and would report the
parent's size), so imports are counted the same way in every row; the
first row (imports only) is the floor they share:

* ``imports``: python + torch + transformers (with its Llama modeling code) + gguf, nothing read;
* ``load_gguf (packed)``: the file into a ``LlamaForCausalLM`` whose linears keep the file's codes, then
  one forward pass of 64 tokens;
* ``convert_gguf_llama (fp32)``: today's route, every tensor widened to fp32 and written as safetensors;
* ``from_pretrained (fp32 folder)``: loading that converted folder (what the course does afterwards),
  then the same forward pass: safetensors maps the file lazily, the pass makes every weight resident.

Columns: peak RSS when the model is loaded, peak RSS after one 64-token forward pass (the fast paths'
caches, the logits and activations come in there), and the weight bytes each model holds (parameters
and buffers).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROUTES = {
    "imports": "import torch, transformers, gguf, qlab.gguf\ntransformers.LlamaForCausalLM\nheld = 0",
    "load_gguf (packed)": (
        "from qlab.gguf import load_gguf\nm = load_gguf(PATH)\nFORWARD\n"
        "held = sum(t.numel() * t.element_size() for t in {id(t): t for t in "
        "[*m.parameters(), *m.buffers()]}.values())"
    ),
    "convert_gguf_llama (fp32)": (
        "from qlab.gguf import convert_gguf_llama\nconvert_gguf_llama(PATH, OUT, progress=False)\nheld = 0"
    ),
    "from_pretrained (fp32 folder)": (
        "import transformers\nm = transformers.LlamaForCausalLM.from_pretrained(OUT)\nFORWARD\n"
        "held = sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])"
    ),
}

#: one forward pass of 64 tokens, so that every weight has been read (safetensors maps files lazily)
FORWARD = "import torch\nloaded = hwm_mb()\nwith torch.no_grad(): m(torch.arange(64)[None])"
CHILD = """
import json, sys
PATH, OUT = sys.argv[1], sys.argv[2]
def hwm_mb():
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:")) / 1024
{body}
peak = hwm_mb()
print(json.dumps({{"peak_mb": peak, "held_mb": held / 1e6, "loaded_mb": globals().get("loaded", peak)}}))
"""


def measure(route: str, gguf: Path, out: Path) -> dict[str, float]:
    code = CHILD.format(body=ROUTES[route].replace("FORWARD", FORWARD))
    proc = subprocess.run([sys.executable, "-c", code, str(gguf), str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{route} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=None, help="a llama GGUF file (default: SmolLM2's)")
    args = ap.parse_args()
    if args.gguf is None:
        from qlab.models import smollm2_gguf

        args.gguf = smollm2_gguf()
    size = args.gguf.stat().st_size / 1e6
    print(f"{args.gguf.name}: {size:.1f} MB on disk")
    print(f"{'route':32s} {'peak RSS MB':>12s} {'+ forward':>10s} {'weights held MB':>16s}")
    with tempfile.TemporaryDirectory() as tmp:
        for route in ROUTES:
            r = measure(route, args.gguf, Path(tmp) / "fp32")
            print(f"{route:32s} {r['loaded_mb']:12.0f} {r['peak_mb']:10.0f} {r['held_mb']:16.1f}")


if __name__ == "__main__":
    main()

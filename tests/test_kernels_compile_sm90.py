"""The kernels compile for an H100 (sm_90) on this machine, no GPU needed: Triton ships ptxas.

Runs in a subprocess without TRITON_INTERPRET (the other kernel tests put this process's triton in
interpreter mode). Also pins two properties of the generated PTX: quantize-and-pack divides with
IEEE round-to-nearest (``div.rn.f32``, like torch; a plain ``/`` gives the approximate
``div.full.f32``), and the int4 decode tile loads each packed word once (no more ``cp.async`` word
copies than ``BLOCK_K / 8 * BLOCK_N / threads`` per pipeline stage).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="triton is not installed (Linux only): qlab.kernels cannot run")

SCRIPT = textwrap.dedent(
    """
    import importlib, json, re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    dm = importlib.import_module("qlab.kernels.dequant_matmul")
    qp = importlib.import_module("qlab.kernels.quantize_pack")


    def build(fn, sig, consts, **options):
        sig = dict(sig, **{c: "constexpr" for c in consts})
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
        return triton.compile(src, target=target, options=options)


    out = {}
    sig = {"x_ptr": "*fp16", "w_ptr": "*i32", "scale_ptr": "*fp16", "zero_ptr": "*fp16", "table_ptr": "*fp32",
           "y_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "group_size": "i32", "k_per_split": "i32",
           "stride_xm": "i32", "stride_wn": "i32", "stride_sn": "i32", "stride_zn": "i32", "stride_ys": "i32",
           "stride_ym": "i32"}
    consts = dict(BITS=4, HAS_ZERO=True, HAS_TABLE=False, FP32_DOT=False, GROUP_ALIGNED=True, FAN_OUT=True,
                  BLOCK_M=16, BLOCK_N=64, BLOCK_K=128)
    k = build(dm._dequant_matmul_kernel, sig, consts, num_warps=4, num_stages=4)
    out["decode_word_copies"] = len(re.findall(r"cp\\.async\\.\\w+\\.shared\\.global", k.asm["ptx"]))
    out["decode_mma"] = len(re.findall(r"mma\\.sync", k.asm["ptx"])) > 0
    consts.update(BITS=4, HAS_ZERO=False, HAS_TABLE=True, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)
    k = build(dm._dequant_matmul_kernel, sig, consts, num_warps=8, num_stages=3)
    out["prefill_wgmma"] = "wgmma" in k.asm["ptx"]
    sig = {"w_ptr": "*fp16", "scale_ptr": "*fp32", "zero_ptr": "*fp32", "out_ptr": "*i32", "N": "i32",
           "K": "i32", "KW": "i32", "group_size": "i32", "stride_wn": "i32", "stride_sn": "i32",
           "stride_on": "i32"}
    k = build(qp._pack_kernel, sig, dict(BITS=4, SYMMETRIC=False, PER_POW2=8, BLOCK_N=16, BLOCK_W=32))
    sig = {"w_ptr": "*fp16", "scale_ptr": "*fp32", "zero_ptr": "*fp32", "N": "i32", "group_size": "i32",
           "stride_wn": "i32", "stride_sn": "i32"}
    k2 = build(qp._group_scale_kernel, sig, dict(QMAX=15, SYMMETRIC=False, BLOCK_N=16, BLOCK_K=128))
    out["float_divisions"] = sorted(set(re.findall(r"div\\.\\w+\\.f32", k.asm["ptx"] + k2.asm["ptx"])))
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's notice about its default
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=900, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # 128 x 64 codes = 1024 words per tile over 128 threads: 8 copies per stage, 4 stages.
    assert out["decode_word_copies"] <= 4 * 8, out
    assert out["decode_mma"] and out["prefill_wgmma"], out
    assert out["float_divisions"] == ["div.rn.f32"], out

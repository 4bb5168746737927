"""qlab's kernels as torch operators (``torch.ops.qlab.*``): opcheck, FakeTensor tracing, torch.compile.

Every entry point of :mod:`qlab.kernels.cpu` is an operator whose fake kernel only allocates the
output, so tracing never hands a tensor without storage to ctypes. Compiled code calls the same
opaque operators on the same tensors as eager code, so compiled outputs must equal eager ones bit
for bit (``torch.equal``): the kernels are deterministic (one thread owns each output row; the
prefill GEMM is torch's own, with the same shapes) and the torch ops around them here are exact.

The Triton operators (``dequant_matmul``, ``quantize_pack``) run here in Triton's interpreter
(``TRITON_INTERPRET=1``, set by conftest.py before triton is imported), where they are opaque
``custom_op``s with shape-only fake kernels; on a GPU they are ``triton_op``s (see ``_launch.py``)
and the same tests check those.

Compiling is slow on two cores: one compiled function covers all five C operators, the model test
uses the ``aot_eager`` backend, and the file resets Dynamo before and after itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():  # as conftest.py: before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import qlab.kernels  # noqa: E402
from qlab.kernels import cpu, cpu_ops  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode  # noqa: E402

from qlab import packing  # noqa: E402
from qlab.codebooks import NF4_VALUES, codebook_table  # noqa: E402
from qlab.config import QuantConfig  # noqa: E402
from qlab.nn import QuantLinear, select_path  # noqa: E402

NEEDS_C = pytest.mark.skipif(cpu.load() is None, reason=f"CPU kernels unavailable: {cpu.status()}")
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NEEDS_TRITON = pytest.mark.skipif(
    not qlab.kernels.available(TRITON_DEVICE), reason="triton is not installed, or cannot run here"
)

K = 256


@pytest.fixture(scope="module", autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Start and leave this file with Dynamo's caches empty (no recompile limits shared with other files)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _codes(bits: int, n: int, g: int, seed: int, codebook: str | None = None) -> tuple[Any, ...]:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, K), generator=gen).to(torch.uint8)
    scale = torch.rand(n, K // g, generator=gen) + 0.05
    zero = None if codebook else torch.randint(0, 2**bits, (n, K // g), generator=gen).float()
    return codes, bits, g, scale, zero, codebook_table(codebook) if codebook else None


def _weights() -> dict[str, Any]:
    """One prepared weight per layout and kind, seeded: what each operator is checked on."""
    gen = torch.Generator().manual_seed(7)
    fp8 = (torch.randn(48, K, generator=gen) * 4).to(torch.float8_e4m3fn)
    return {
        "rows16_int4": cpu.prepare_rows16(*_codes(4, 64, 64, seed=1)),
        "rows16_nf4": cpu.prepare_rows16(*_codes(4, 32, 64, seed=2, codebook="nf4")),
        "rows16_int8": cpu.prepare_rows16(*_codes(8, 32, K, seed=3)),
        "blocks_int4": cpu.prepare(*_codes(4, 40, 64, seed=4)),
        "blocks_int8": cpu.prepare(*_codes(8, 24, 128, seed=5)),
        "blocks_nf4": cpu.prepare(*_codes(4, 40, 64, seed=6, codebook="nf4")),
        "fp8": cpu.prepare_fp8(fp8, torch.rand(48, generator=gen) + 0.5),
    }


W = _weights() if cpu.load() is not None else {}


def _x(m: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, K, generator=torch.Generator().manual_seed(seed))


def _op_args(name: str, key: str, x: torch.Tensor, **kw: Any) -> tuple[Any, tuple[Any, ...]]:
    """The operator and the argument tuple the public function passes it for weight ``W[key]``."""
    w = W[key]
    if name == "gemv_int8dot":
        args = (x, w.codes, w.scale_t, w.zero_t, w.levels, w.bits, w.group_size, kw.get("planes", 2))
    elif name == "gemv":
        args = (x, w.codes, w.scale, w.sz, w.lut, w.bits, w.group_size)
    elif name == "tiled_matmul":
        args = (x, w.codes, w.scale, w.zero, w.table, w.bits, w.group_size, kw.get("rows", 16))
    elif name == "fp8_gemv":
        args = (x, w.codes, w.scale)
    else:
        args = (x, w.codes, w.scale, kw.get("rows", 16))
    return getattr(torch.ops.qlab, name).default, args


OPCHECK_CASES = [
    ("gemv_int8dot", "rows16_int4", {}),
    ("gemv_int8dot", "rows16_nf4", {}),
    ("gemv_int8dot", "rows16_int8", {"planes": 1}),
    ("gemv", "blocks_int4", {}),
    ("gemv", "blocks_int8", {}),
    ("gemv", "blocks_nf4", {}),
    ("fp8_gemv", "fp8", {}),
    ("tiled_matmul", "blocks_int4", {"rows": 16}),
    ("tiled_matmul", "blocks_nf4", {"rows": 512}),
    ("fp8_tiled_matmul", "fp8", {"rows": 20}),
]


@NEEDS_C
def test_every_kernel_is_an_operator():
    assert set(cpu.OPS) == {c[0] for c in OPCHECK_CASES}
    for name in cpu.OPS:
        schema = getattr(torch.ops.qlab, name).default._schema
        # tensors, optional tensors and ints only: a prepared weight is unpacked by the wrapper
        assert {str(a.type) for a in schema.arguments} <= {"Tensor", "Optional[Tensor]", "int"}, schema
        assert not schema.is_mutable


@NEEDS_C
@pytest.mark.parametrize("name,key,kw", OPCHECK_CASES, ids=[f"{c[0]}-{c[1]}" for c in OPCHECK_CASES])
def test_opcheck(name, key, kw):
    """Schema, autograd registration, fake kernel vs real kernel (shapes, dtypes, strides), AOT dispatch."""
    op, args = _op_args(name, key, _x(3, seed=len(name)), **kw)
    torch.library.opcheck(op, args)


@NEEDS_C
def test_fake_tensors_never_reach_ctypes(monkeypatch):
    """Under FakeTensorMode the fake kernels answer alone: the C library is never asked for."""

    def no_library(lib: object) -> None:
        raise AssertionError("a C kernel ran during fake tracing")

    monkeypatch.setattr(cpu_ops, "_require", no_library)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:

        def fake(w: Any) -> Any:
            return type(w)(**{f: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v
                              for f, v in vars(w).items()})  # fmt: skip

        x = mode.from_tensor(_x(5))
        outs = {
            "int8dot": cpu.gemv_int8dot(x, fake(W["rows16_int4"])),
            "gemv": cpu.gemv(x, fake(W["blocks_int4"])),
            "fp8": cpu.gemv(x, fake(W["fp8"])),
            "tiled": cpu.tiled_matmul(x, fake(W["blocks_nf4"])),
            "fp8_tiled": cpu.tiled_matmul(x, fake(W["fp8"]), rows=7),
        }
    assert all(isinstance(y, FakeTensor) for y in outs.values())
    assert outs["int8dot"].shape == (5, 64) and outs["int8dot"].dtype == torch.float32
    assert outs["gemv"].shape == (5, 40) and outs["fp8"].shape == (5, 48)
    assert outs["tiled"].shape == (5, 40) and outs["tiled"].dtype == torch.bfloat16
    assert outs["tiled"].stride() == (1, 5) and outs["fp8_tiled"].stride() == (1, 5)


@NEEDS_C
def test_operators_reject_bad_sizes_before_any_pointer():
    """The operators can be called directly (torch.ops.qlab.*): every size is checked, not trusted."""
    op, args = _op_args("gemv", "blocks_int4", _x(2))
    with pytest.raises(ValueError, match=r"scale must be a contiguous CPU torch.float32 .* shape \[40, 4\]"):
        op(args[0], args[1], args[2][:20], *args[3:])
    with pytest.raises(ValueError, match="lut must be"):
        op(*args[:4], args[4][:16], *args[5:])
    op, args = _op_args("gemv_int8dot", "rows16_int4", _x(2))
    strided = args[1].transpose(0, 1).contiguous().transpose(0, 1)  # the same shape, not contiguous
    with pytest.raises(ValueError, match="codes must be a contiguous"):
        op(args[0], strided, *args[2:])
    with pytest.raises(ValueError, match=r"x must be a CPU tensor of shape \[M, 256\]"):
        op(_x(2)[:, :128], *args[1:])
    op, args = _op_args("tiled_matmul", "blocks_int4", _x(2))
    with pytest.raises(ValueError, match="rows must be a positive integer"):
        op(*args[:-1], 0)


def _all_kernels(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each public kernel function once. No torch arithmetic around them: Inductor's first C++ kernel
    costs ~30 s on two busy cores (a precompiled header), and opcheck already checks that the fake
    strides Inductor would plan with are the real ones."""
    return (
        cpu.gemv_int8dot(x, W["rows16_int4"]),
        cpu.gemv_int8dot(x, W["rows16_int8"], planes=1),
        cpu.gemv(x, W["blocks_int4"]),
        cpu.gemv(x, W["fp8"]),
        cpu.tiled_matmul(x, W["blocks_nf4"], rows=16),
        cpu.tiled_matmul(x, W["fp8"], rows=20),
    )


@NEEDS_C
def test_compiled_kernels_equal_eager_bit_for_bit():
    """fullgraph compile (Inductor) of gemv_int8dot, gemv, tiled_matmul (affine, codebook, FP8, W8A8):
    no graph break, and the same bits as eager, for one row and then for a batch (dynamic M after a
    recompile)."""
    compiled = torch.compile(_all_kernels, fullgraph=True)
    for m, seed in ((1, 11), (3, 12), (6, 13)):  # 3 compiles a dynamic M, 6 reuses it
        x = _x(m, seed)
        want, got = _all_kernels(x), compiled(x)
        for w, g in zip(want, got, strict=True):
            assert g.shape == w.shape and g.dtype == w.dtype and g.stride() == w.stride()
            assert torch.equal(g, w)


@NEEDS_C
def test_compiled_quantized_model_equals_eager(c_kernel_paths):
    """A small model of QuantLinear layers on every C path (int8-dot, bf16 gemv, FP8, tiles), compiled
    with fullgraph before any eager call (cold layer caches), equals eager bit for bit.

    The ``aot_eager`` backend runs everything the crash came from (Dynamo and AOT tracing with fake
    tensors, functionalization) without Inductor's C++ code generation, which would cost this test
    half a minute on two cores (ReLU, GELU and the bias are C++ kernels there)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        QuantLinear.from_linear(torch.nn.Linear(K, 64), QuantConfig("rtn", 4, 64)),  # rows16: int8-dot
        torch.nn.ReLU(),
        QuantLinear.from_linear(torch.nn.Linear(64, 64, bias=False), QuantConfig("fp8", 8, None)),
        torch.nn.GELU(),
        QuantLinear.from_linear(torch.nn.Linear(64, 40), QuantConfig("nf4", 4, 64)),  # 40 rows: gemv
    ).eval()
    x1, x20 = _x(1, 21), _x(20, 22)
    assert [select_path(layer, x1[:, : layer.in_features]) for layer in model[::2]] == [
        "cpu_int8dot", "cpu_gemv", "cpu_gemv",
    ]  # fmt: skip
    assert select_path(model[0], x20) == "cpu_tiled"
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = [compiled(x1), compiled(x20), compiled(x1)]
        want = [model(x1), model(x20), model(x1)]
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


# ------------------------------------------------------------------------------------------------
# Triton operators
# ------------------------------------------------------------------------------------------------
def _triton_case(
    m: int, n: int, k: int, g: int, codebook: bool, seed: int
) -> tuple[torch.Tensor, tuple[Any, ...]]:
    """``x`` and the ``qlab::dequant_matmul`` arguments for a seeded int4 (or NF4) weight."""
    qlab.kernels.dequant_matmul  # noqa: B018 (imports the module, which registers the operator)
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen).to(torch.uint8)
    words = packing.pack_int32(codes, 4).to(TRITON_DEVICE)
    scale = (torch.rand(n, k // g, generator=gen) + 0.05).to(TRITON_DEVICE)
    zero = None if codebook else torch.randint(0, 16, (n, k // g), generator=gen).float().to(TRITON_DEVICE)
    table = NF4_VALUES.float().to(TRITON_DEVICE) if codebook else None
    x = torch.randn(m, k, generator=gen).to(TRITON_DEVICE)
    return x, (words, scale, zero, table, 4, g, n, k)


@NEEDS_TRITON
@pytest.mark.parametrize(
    "m,codebook,path", [(3, False, "decode"), (2, True, "auto"), (20, False, "prefill")]
)  # fmt: skip
def test_opcheck_dequant_matmul(m, codebook, path):
    x, args = _triton_case(m, 24, 64, 32, codebook, seed=m)
    torch.library.opcheck(torch.ops.qlab.dequant_matmul.default, (x, *args, path))


@NEEDS_TRITON
@pytest.mark.parametrize("bits,symmetric", [(4, False), (2, True)])
def test_opcheck_quantize_pack(bits, symmetric):
    qlab.kernels.quantize_pack  # noqa: B018 (imports the module, which registers the operator)
    w = torch.randn(20, 64, generator=torch.Generator().manual_seed(bits)).to(TRITON_DEVICE)
    torch.library.opcheck(torch.ops.qlab.quantize_pack.default, (w, bits, 32, symmetric))


@NEEDS_TRITON
def test_compiled_triton_kernels_equal_eager():
    """fullgraph compile of quantize_pack then dequant_matmul (decode, split-K) equals eager bit for bit."""
    from qlab.kernels import dequant_matmul, quantize_pack

    def quantize_and_multiply(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        p = quantize_pack(w, 4, 32)
        return dequant_matmul(x, p.packed, p.scale, p.zero, bits=4, group_size=32, n=w.shape[0], k=w.shape[1])

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(24, 64, generator=gen).to(TRITON_DEVICE)
    x = torch.randn(2, 64, generator=gen).to(TRITON_DEVICE)
    compiled = torch.compile(quantize_and_multiply, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(w, x), quantize_and_multiply(w, x))


_TRITON_OP_SCRIPT = """
import torch
from functorch.compile import aot_function
from qlab.kernels import dequant_matmul, quantize_pack  # registers both operators
graphs = []

def keep(gm, inputs):
    graphs.append(gm.code)
    return gm

def run(fn, *args):
    try:
        aot_function(fn, fw_compiler=keep)(*args)
    except Exception:
        pass  # the traced graph is what we want; no GPU runs it

meta = dict(device="meta")
run(lambda x, w, s, z: torch.ops.qlab.dequant_matmul(x, w, s, z, None, 4, 32, 24, 64, "decode"),
    torch.empty(3, 64, **meta), torch.empty(24, 8, dtype=torch.int32, **meta),
    torch.empty(24, 2, **meta), torch.empty(24, 2, **meta))
run(lambda w: torch.ops.qlab.quantize_pack(w, 4, 32, False), torch.empty(20, 64, **meta))
print(len(graphs), [g.count("triton_kernel_wrapper_functional(") for g in graphs])
"""


@pytest.mark.skipif(not qlab.kernels.HAS_TRITON, reason="triton is not installed")
def test_triton_op_route_captures_the_kernels():
    """Without the interpreter (a GPU's route) the operators are ``triton_op``s: AOT tracing, as in
    torch.compile, decomposes them into the Triton launches themselves (one for dequant_matmul, two
    for quantize_pack). Traced on meta tensors in a subprocess, since no GPU runs them here."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", _TRITON_OP_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "2 [1, 2]", out.stdout + out.stderr[-2000:]


# ------------------------------------------------------------------------------------------------
# The C++ operator for the int8-dot decode kernel (qlab.kernels.cpu_native), as qlab.aot uses it
# ------------------------------------------------------------------------------------------------
NATIVE_CASES = [("rows16_int4", 2), ("rows16_nf4", 2), ("rows16_int8", 2), ("rows16_int8", 1)]


@pytest.fixture(scope="module")
def native() -> Any:
    """``torch.ops.qlab.gemv_int8dot_native``, built on first use (about 10 s), or a skip saying why."""
    from qlab.kernels import cpu_native

    if cpu.load() is None or not cpu_native.load():
        pytest.skip(f"the C++ operator is unavailable: {cpu_native.status()}")
    return torch.ops.qlab.gemv_int8dot_native.default


@NEEDS_C
@pytest.mark.parametrize("key,planes", NATIVE_CASES, ids=[f"{k}-p{p}" for k, p in NATIVE_CASES])
def test_native_operator_equals_the_python_one(native, key, planes):
    """The same C function behind both: equal bit for bit, batch 1, a few rows and none; and opcheck."""
    for m in (1, 5, 0):
        op, args = _op_args("gemv_int8dot", key, _x(m, seed=m), planes=planes)
        assert torch.equal(native(*args), op(*args))
    torch.library.opcheck(native, _op_args("gemv_int8dot", key, _x(3), planes=planes)[1])
    xb = _x(2).bfloat16()  # any float x, as the Python operator takes
    assert torch.equal(native(xb, *args[1:]), op(xb, *args[1:]))


@NEEDS_C
def test_native_operator_rejects_bad_sizes_before_any_pointer(native):
    _, args = _op_args("gemv_int8dot", "rows16_int4", _x(2))
    strided = args[1].transpose(0, 1).contiguous().transpose(0, 1)
    with pytest.raises(ValueError, match="codes must be a contiguous CPU"):
        native(args[0], strided, *args[2:])
    with pytest.raises(ValueError, match=r"x must be a CPU tensor of shape \[M, 256\]"):
        native(_x(2)[:, :128], *args[1:])
    with pytest.raises(ValueError, match="scale_t must be a contiguous CPU"):
        native(args[0], args[1], args[2][:, :1].contiguous(), *args[3:])
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        native(args[0].long(), *args[1:])
    with pytest.raises(ValueError, match="planes must be 2, or 1 for 8-bit"):
        native(*args[:-1], 1)
    with pytest.raises(ValueError, match="group_size=48 does not fit K=256"):
        native(*args[:-2], 48, 2)


@NEEDS_C
def test_native_operator_only_where_preferred(native):
    """``cpu_native.preferred()`` switches cpu.gemv_int8dot to the C++ operator in its block only."""
    from qlab.kernels import cpu_native
    from torch.fx.experimental.proxy_tensor import make_fx

    def ops() -> set[str]:
        gm = make_fx(lambda x: cpu.gemv_int8dot(x, W["rows16_int4"]))(_x(1))
        return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}

    assert ops() == {"qlab.gemv_int8dot.default"}
    with cpu_native.preferred() as ok:
        assert ok and ops() == {"qlab.gemv_int8dot_native.default"}
    assert ops() == {"qlab.gemv_int8dot.default"} and not cpu_native.active()

"""The ``qlab`` command: help, one-line errors with the right exit status, and real runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlab import cli
from qlab.config import QuantConfig
from qlab.driver import quantize_model
from qlab.io import save_quantized


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse: --help (0) and bad arguments (2)
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_command(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("info", "fetch", "quantize", "eval", "compare"):
        assert command in out
    code, out, _ = run(capsys, "compare", "--help")
    assert code == 0 and "--methods" in out and "--bits" in out and "--group-size" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", "--bits", "4,x"], "expected comma-separated integers"),
        (["compare", "--methods", "rtn,magic"], "unknown method 'magic'"),
        (["compare", "--group-size", "0"], "group size must be positive"),
        (["quantize", "--method", "rtn"], "the following arguments are required: -o/--output"),
        (["quantize", "--model", "gpt5", "-o", "x"], "invalid choice: 'gpt5'"),
        (["quantize", "--bits", "9", "-o", "x.safetensors"], "bits must be an integer in 1..8"),
        (["quantize", "--group-size", "32,64", "-o", "x.safetensors"], "one --group-size"),
        (["fetch", "llama-70b"], "unknown name 'llama-70b'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "required: COMMAND"),
    ],
)
def test_bad_arguments_give_one_line_and_status_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_eval_errors(capsys, tmp_path):
    code, _, err = run(capsys, "eval", str(tmp_path / "missing.safetensors"))
    assert code == 1 and "no such file" in err and len(err.strip().splitlines()) == 1
    model = quantize_model(nn.Sequential(nn.Linear(64, 64)), QuantConfig("rtn", 4, 32), progress=False)
    path = save_quantized(model, tmp_path / "toy.safetensors")
    code, _, err = run(capsys, "eval", str(path))
    assert code == 2 and "does not record a qlab model name" in err
    path.write_bytes(path.read_bytes()[:20])
    code, _, err = run(capsys, "eval", str(path))
    assert code == 1 and "truncated" in err


def test_info(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0
    assert f"torch        {torch.__version__}" in out and "triton" in out and "CUDA" in out
    from qlab.kernels import cpu

    assert f"cpu kernels  {cpu.status()}" in out


def test_compare_settings_expand_and_format():
    args = cli.build_parser().parse_args(
        ["compare", "--methods", "rtn,nf4,fp8", "--bits", "4,2", "--group-size", "64"]
    )
    labels = []
    for m in args.methods:
        for b in args.bits:
            labels.append(cli._label(cli._config(m, b, args.group_size[0], None)))
    # nf4 and fp8 have a fixed width: one row each, whatever --bits says
    assert sorted(set(labels)) == ["fp8", "nf4 b64", "rtn w2 g64", "rtn w4 g64"]
    table = cli.format_rows(
        [{"setting": "fp32", "bpw": 32.0, "mb": 1.5, "perplexity": 9.87654, "seconds": 0.0}]
    )
    assert "| fp32 | 32.00 | 1.5 | 9.8765 | 0.0 |" in table


@pytest.mark.slow
def test_quantize_eval_compare_minilm(capsys, tmp_path):
    from qlab import models

    models.fetch("minilm-l6", progress=False)
    out_path = tmp_path / "minilm-w8.safetensors"
    code, out, err = run(
        capsys, "quantize", "--model", "minilm-l6", "--bits", "8", "--group-size", "none",
        "-o", str(out_path),
        "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert "saved to" in out and out_path.exists()
    code, out, err = run(capsys, "eval", str(out_path), "--no-progress")
    assert code == 0, err
    cosine = float(out.strip().splitlines()[-1].split(":")[1])
    assert cosine > 0.99
    code, out, err = run(
        capsys, "compare", "--model", "minilm-l6", "--methods", "rtn", "--bits", "8,2", "--group-size", "64",
        "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert {"fp32", "rtn w8 g64", "rtn w2 g64"} <= set(rows)
    cos = {k: float(v.split("|")[4]) for k, v in rows.items() if k != "setting"}
    assert cos["fp32"] == pytest.approx(1.0, abs=1e-6) and cos["rtn w8 g64"] > cos["rtn w2 g64"]

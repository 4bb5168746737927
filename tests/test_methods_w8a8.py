"""W8A8 with outliers: Int8Linear against plain torch, LLM.int8 decomposition, SmoothQuant scales."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlab.methods.smoothquant import smooth_scales
from qlab.nn import Int8Linear, outlier_features


def layer(seed: int = 0, features: int = 64, out: int = 32) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(features, out)


def activations(seed: int = 1, rows: int = 40, features: int = 64, outlier: float = 60.0) -> torch.Tensor:
    x = torch.randn(rows, features, generator=torch.Generator().manual_seed(seed))
    x[:, [2, 33]] *= outlier
    return x


def test_plain_w8a8_matches_torch_reference() -> None:
    lin, x = layer(), activations()
    ours = Int8Linear.from_linear(lin, threshold=None)(x)
    w = lin.weight.detach()
    sw = w.abs().amax(1, keepdim=True) / 127
    qw = torch.round(w / sw)
    sx = x.abs().amax(1, keepdim=True) / 127
    qx = torch.round(x / sx)
    ref = (qx @ qw.T) * sx * sw.T + lin.bias.detach()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_llm_int8_decomposition_keeps_outlier_features_in_float() -> None:
    lin, x = layer(), activations()
    exact = lin(x).detach()
    plain = Int8Linear.from_linear(lin, threshold=None)(x)
    mixed = Int8Linear.from_linear(lin, threshold=6.0)(x)
    assert outlier_features(x, 6.0).nonzero().flatten().tolist() == [2, 33]
    assert (mixed - exact).pow(2).mean() < 0.1 * (plain - exact).pow(2).mean()
    # Without outliers the decomposition is plain W8A8.
    calm = activations(outlier=1.0).clamp(-5, 5)
    torch.testing.assert_close(
        Int8Linear.from_linear(lin, threshold=6.0)(calm), Int8Linear.from_linear(lin, threshold=None)(calm)
    )


def test_smooth_scales_formula_and_effect() -> None:
    lin, x = layer(2), activations(3)
    s = smooth_scales(x.abs().amax(0), lin.weight, alpha=0.5)
    ref = x.abs().amax(0).sqrt() / lin.weight.detach().abs().amax(0).sqrt()
    torch.testing.assert_close(s, ref)
    exact = lin(x).detach()
    plain = Int8Linear.from_linear(lin, threshold=None)(x)
    smooth = Int8Linear.from_linear(lin, threshold=None, input_scale=s)(x)
    assert (smooth - exact).pow(2).mean() < 0.2 * (plain - exact).pow(2).mean()


def test_bad_inputs() -> None:
    lin = layer()
    with pytest.raises(ValueError, match="threshold"):
        Int8Linear.from_linear(lin, threshold=0.0)
    with pytest.raises(ValueError, match="input_scale must have shape"):
        Int8Linear.from_linear(lin, input_scale=torch.ones(3))
    with pytest.raises(ValueError, match="alpha"):
        smooth_scales(torch.ones(64), lin.weight, alpha=2.0)
    with pytest.raises(ValueError, match="to match act_absmax"):
        smooth_scales(torch.ones(63), lin.weight)


class PostNorm(nn.Module):
    """A BERT-style post-norm block: ``norm1``'s output feeds ``up`` *and* the residual of ``norm2``."""

    def __init__(self, d: int = 32, h: int = 64) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        return self.norm2(y + self.down(torch.nn.functional.gelu(self.up(y))))


class PreNorm(PostNorm):
    """The same layers, pre-norm: the residual is ``x``, so ``norm1`` feeds ``up`` only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(x + self.down(torch.nn.functional.gelu(self.up(self.norm1(x)))))


def smoothed_float(block: nn.Module, calib: torch.Tensor, alpha: float) -> tuple[nn.Module, set[str]]:
    """The pass's float rewrite (weights ``W·s``, folds), with the kept input scales applied by hooks."""
    from qlab.methods.passes import smoothquant_pass
    from qlab.tensor import QuantSpec

    res = smoothquant_pass(
        block, calib, {"up", "down"}, lambda _n: QuantSpec.per_channel(8, symmetric=True), {"alpha": alpha},
        progress=False,
    )  # fmt: skip
    for name, s in res.input_scales.items():
        block.get_submodule(name).register_forward_pre_hook(lambda _m, a, s=s: (a[0] / s,))
    return block, set(res.input_scales)


@pytest.mark.parametrize("alpha", [0.3, 0.8])
def test_smoothquant_rewrite_is_exact_in_float_post_and_pre_norm(alpha: float) -> None:
    torch.manual_seed(5)
    calib = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(6))
    calib[..., 3] *= 30  # an outlier input feature
    for cls in (PostNorm, PreNorm):
        block = cls().eval()
        with torch.no_grad():
            block.norm1.weight.mul_(torch.rand(32) * 3 + 0.1)  # uneven, as trained norms are
            ref = block(calib)
        norm_before = block.norm1.weight.detach().clone()
        smoothed, kept = smoothed_float(block, calib, alpha)
        with torch.no_grad():
            torch.testing.assert_close(smoothed(calib), ref, rtol=1e-4, atol=1e-4)
        if cls is PostNorm:  # folding into norm1 would rescale the residual: up keeps its input scale
            assert "up" in kept and torch.equal(block.norm1.weight, norm_before)
        else:  # pre-norm: the fold is exact, so up needs no input scale
            assert "up" not in kept and not torch.equal(block.norm1.weight, norm_before)


def test_smoothquant_on_a_tiny_bert_keeps_the_model_and_runs_it_once() -> None:
    from transformers import BertConfig, BertModel

    from qlab.methods.passes import smoothquant_pass
    from qlab.tensor import QuantSpec

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    bert = BertModel(cfg).eval()
    ids = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = bert(input_ids=ids).last_hidden_state
    targets = {n for n, m in bert.named_modules() if isinstance(m, nn.Linear)}
    calls = []
    bert.register_forward_hook(lambda *_: calls.append(1))
    res = smoothquant_pass(
        bert,
        ids,
        targets,
        lambda _n: QuantSpec.per_channel(8, symmetric=True),
        {"alpha": 0.5},
        progress=False,
    )
    # Post-norm: every LayerNorm output is also a residual, so nothing folds and no re-run is needed.
    assert set(res.input_scales) == targets and len(calls) == 1
    for name, s in res.input_scales.items():
        bert.get_submodule(name).register_forward_pre_hook(lambda _m, a, s=s: (a[0] / s,))
    with torch.no_grad():
        torch.testing.assert_close(bert(input_ids=ids).last_hidden_state, ref, rtol=1e-4, atol=1e-4)


def test_smoothquant_on_a_tiny_llama_folds_everything_and_keeps_the_model() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlab.methods.passes import smoothquant_pass
    from qlab.tensor import QuantSpec

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    llama = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in llama.parameters():
            p.normal_(0, 0.2)
        ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
        ref = llama(input_ids=ids).logits
    targets = {n for n, m in llama.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    res = smoothquant_pass(
        llama, ids, targets, lambda _n: QuantSpec.per_channel(8), {"alpha": 0.5}, progress=False
    )
    # Pre-norm: q/k/v and gate/up fold into their norms, down into up's rows; o_proj keeps its scale.
    assert set(res.input_scales) == {f"model.layers.{i}.self_attn.o_proj" for i in range(2)}
    for name, s in res.input_scales.items():
        llama.get_submodule(name).register_forward_pre_hook(lambda _m, a, s=s: (a[0] / s,))
    with torch.no_grad():
        torch.testing.assert_close(llama(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)

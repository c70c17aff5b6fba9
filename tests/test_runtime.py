"""Runtime modules (editcomp.quant.runtime): QuantLinear, ActQuant, quantize_model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from editcomp.arch import get_adapter
from editcomp.errors import ConfigError
from editcomp.quant.gptq import HessianAccumulator, gptq_quantize_weight, rtn_quantize_weight
from editcomp.quant.hadamard import apply_hadamard, hadamard_matrix
from editcomp.quant.ops import compute_qparams, fake_quant
from editcomp.quant.runtime import (ActQuant, QuantLinear, add_act_quant, quant_linears,
                                    quantize_model, replace_module)
from editcomp.quant.spec import QuantSpec, parse_bits
from editcomp.tiny import tiny_model

IDS = torch.tensor([[1, 17, 42, 99, 7, 300, 5, 11, 60, 3], [1, 8, 250, 31, 77, 2, 19, 400, 6, 9]])
A4 = QuantSpec(4, "token", symmetric=False)


def hadamard_wrapper():
    """transforms.HadamardInput when it exists, else a stand-in with the same duck type."""
    try:
        from editcomp.quant.transforms import HadamardInput
        return HadamardInput
    except ImportError:
        class _HadamardInput(nn.Module):
            def __init__(self, linear, hadamard_size):
                super().__init__()
                self.linear, self.hadamard_size = linear, hadamard_size

            def forward(self, x):
                return self.linear(apply_hadamard(x, self.hadamard_size))
        return _HadamardInput


def _linear(n_in=64, n_out=24, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    if bias:
        nn.init.normal_(lin.bias, 0, 0.1)
    return lin


@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec(4, "group", 16),
                                  QuantSpec(3, "group", 32, symmetric=False), QuantSpec(8)])
def test_weight_only_output_is_exactly_the_dequantized_linear(spec):
    lin = _linear()
    q = QuantLinear.from_float(lin, spec)
    W_hat, codes, _, _ = rtn_quantize_weight(lin.weight, spec)
    assert torch.equal(q.dequantize_weight(), W_hat)
    assert torch.equal(q.codes(), codes)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        y = q(x)
    assert torch.equal(y, F.linear(x, W_hat, lin.bias))
    torch.testing.assert_close(y, x @ W_hat.T + lin.bias, rtol=1e-6, atol=1e-6)
    assert q.qweight.dtype == torch.uint8 and q.qweight.numel() == (64 * 24 * spec.bits + 7) // 8


def test_given_gptq_codes_are_used_not_rtn():
    lin = _linear(bias=False)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(256, 4, generator=g) @ torch.randn(4, 64, generator=g)
    acc = HessianAccumulator(64)
    acc.add(X)
    spec = QuantSpec(4)
    gptq = gptq_quantize_weight(lin.weight, acc.H, spec)
    q = QuantLinear.from_float(lin, spec, W_hat_codes=gptq[1:])
    assert torch.equal(q.dequantize_weight(), gptq[0])
    assert not torch.equal(q.dequantize_weight(), rtn_quantize_weight(lin.weight, spec)[0])
    q4 = QuantLinear.from_float(lin, spec, W_hat_codes=gptq)  # GPTQ's 4-tuple works too
    assert torch.equal(q4.qweight, q.qweight)
    with pytest.raises(ConfigError, match="scale"):
        QuantLinear.from_float(lin, QuantSpec(4, "group", 16), W_hat_codes=gptq[1:])


def test_activation_quant_is_per_token_within_half_a_step():
    x = torch.randn(2, 7, 64) * torch.logspace(-2, 1, 7)[None, :, None]  # very different tokens
    xq = ActQuant(nn.Identity(), A4)(x)
    scale, _ = compute_qparams(x, A4)
    assert scale.shape == (2, 7, 1)
    assert ((xq - x).abs() <= scale / 2 + 1e-6).all()
    assert torch.equal(ActQuant(nn.Identity(), A4)(x[:1, 3:4]), xq[:1, 3:4])  # token alone
    # QuantLinear quantizes its input the same way before the matmul
    lin = _linear()
    q = QuantLinear.from_float(lin, QuantSpec(4), act_spec=A4)
    with torch.no_grad():
        assert torch.equal(q(x), F.linear(xq, q.dequantize_weight(), lin.bias))


@pytest.mark.parametrize("n", [64, 48])  # 48 = 12 * 4 needs the Paley block
def test_online_hadamard_equals_dense_matmul_then_quant(n):
    lin = _linear(n_in=n)
    q = QuantLinear.from_float(lin, QuantSpec(4), act_spec=A4, hadamard_size=n)
    x = torch.randn(4, n)
    H = hadamard_matrix(n, torch.float32)
    with torch.no_grad():
        ref = F.linear(fake_quant(x @ H, A4), q.dequantize_weight(), lin.bias)
        torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)


def test_hadamard_wrapper_is_absorbed():
    HadamardInput = hadamard_wrapper()
    lin = _linear(n_in=64)
    with torch.no_grad():
        lin.weight.copy_(apply_hadamard(lin.weight, 64))  # fuse H so wrapper(x) == old lin(x)
    wrapped = HadamardInput(lin, 64)
    a8 = QuantSpec(8, "token", symmetric=False)
    q = QuantLinear.from_float(wrapped, QuantSpec(8), act_spec=a8)
    assert q.hadamard_size == 64
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(q(x), wrapped(x), rtol=2e-2, atol=2e-2)
        a = ActQuant(wrapped, A4)  # Hadamard first, then quantize
        ref = lin(fake_quant(apply_hadamard(x, 64), A4))
        assert a.linear is lin and torch.equal(a(x), ref)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_quantize_model_replaces_every_decoder_linear_and_keeps_lm_head(family):
    model = tiny_model(family)
    lm_head = get_adapter(model).lm_head
    HadamardInput = hadamard_wrapper()
    down = get_adapter(model).layers()[0].down
    replace_module(model, down, HadamardInput(down, down.in_features))
    quantize_model(model, parse_bits("w4a16"))
    qls = quant_linears(model)
    layers = get_adapter(model).layers()
    assert len(qls) == 7 * len(layers)
    assert all(isinstance(m, QuantLinear) for p in layers for m in p.linears().values())
    assert get_adapter(model).lm_head is lm_head and type(lm_head) is nn.Linear
    assert layers[0].down.hadamard_size == down.in_features and layers[1].down.hadamard_size is None
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_model(model, parse_bits("w4a16"))


def test_quantize_model_weights_dict_and_skip():
    model = tiny_model("llama")
    name = "model.layers.1.self_attn.o_proj"
    lin = dict(model.named_modules())[name]
    codes = rtn_quantize_weight(lin.weight, QuantSpec(4), mse_clip=True)
    quantize_model(model, parse_bits("w4a16"), weights={name: codes}, skip=("lm_head", "q"))
    assert torch.equal(dict(model.named_modules())[name].dequantize_weight(), codes[0])
    assert all(type(p.q) is nn.Linear for p in get_adapter(model).layers())
    with pytest.raises(ConfigError, match="not quantized"):
        quantize_model(tiny_model("llama"), parse_bits("w4a16"), weights={"nope": codes})


def test_bf16_forward_and_dtype_moves_keep_scales_fp32():
    model = quantize_model(tiny_model("qwen2"), parse_bits("w4a8"))
    with torch.no_grad():
        ref = model(IDS).logits
        model.to(torch.bfloat16)
        q = next(iter(quant_linears(model).values()))
        assert q.scales.dtype == torch.float32 and q.bias.dtype == torch.bfloat16
        out = model(IDS).logits
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        assert q.weight_for(torch.bfloat16, "cpu").dtype == torch.bfloat16
        assert ((out.float() - ref).norm() / ref.norm()) < 0.1
        model.to(torch.float32)  # the cached weight follows the dtype, from the exact fp32 qparams
        assert torch.equal(q.weight_for(torch.float32, "cpu"), q.dequantize_weight())
        assert model(IDS).logits.dtype == torch.float32


def test_weight_cache_follows_in_place_changes():
    q = QuantLinear.from_float(_linear(), QuantSpec(4))
    x = torch.randn(2, 64)
    with torch.no_grad():
        y = q(x)
        q.scales.mul_(2)
        assert not torch.equal(q(x), y)


def test_w8a8_is_close_to_fp_and_w4a4_further():
    ref_model = tiny_model("llama")
    with torch.no_grad():
        ref = ref_model(IDS).logits
        errs = {}
        for bits in ("w8a8", "w4a4"):
            m = quantize_model(copy.deepcopy(ref_model), parse_bits(bits))
            errs[bits] = ((m(IDS).logits - ref).norm() / ref.norm()).item()
    assert errs["w8a8"] < 5e-2
    assert errs["w4a4"] > 3 * errs["w8a8"]


def test_act_quant_wrapping_trains_float_weights():
    model = add_act_quant(tiny_model("llama"), A4)
    layers = get_adapter(model).layers()
    assert all(isinstance(m, ActQuant) for p in layers for m in p.linears().values())
    model.train()
    model(IDS).logits.float().pow(2).mean().backward()
    assert layers[0].q.linear.weight.grad is not None
    assert layers[0].q.linear.weight.grad.abs().sum() > 0

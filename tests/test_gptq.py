"""GPTQ for one linear layer and the calibration Hessian (editcomp.quant.gptq)."""

import pytest
import torch

from editcomp.errors import ConfigError, DataError, NumericalError
from editcomp.quant.gptq import HessianAccumulator, gptq_quantize_weight, rtn_quantize_weight
from editcomp.quant.ops import dequantize
from editcomp.quant.spec import QuantSpec

D_IN, D_OUT = 256, 32


@pytest.fixture(scope="module")
def layer():
    """Inputs with a strong low-rank structure (as real activations have) and a random weight."""
    g = torch.Generator().manual_seed(0)
    n, rank = 1024, 8
    X = (torch.randn(n, rank, generator=g) @ torch.randn(rank, D_IN, generator=g)
         + 0.05 * torch.randn(n, D_IN, generator=g))
    W = torch.randn(D_OUT, D_IN, generator=g)
    acc = HessianAccumulator(D_IN, name="layers.0.mlp.up")
    for chunk in X.split(300):  # uneven chunks
        acc.add(chunk.view(2, -1, D_IN) if len(chunk) % 2 == 0 else chunk)
    return X, W, acc.H


def _out_err(W, W_hat, X):
    return ((W - W_hat) @ X.T).norm().item()


def test_hessian_accumulator_is_count_weighted(layer):
    X, _, H = layer
    ref = 2 * X.double().T @ X.double() / len(X)
    assert torch.allclose(H.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    with pytest.raises(DataError, match="layer q"):
        HessianAccumulator(4, name="q").H


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("group", [None, 128])
def test_gptq_beats_rtn_on_correlated_inputs(layer, bits, group):
    X, W, H = layer
    spec = QuantSpec(bits, "group", group) if group else QuantSpec(bits)
    W_g, codes, scale, zero = gptq_quantize_weight(W, H, spec)
    W_r, *_ = rtn_quantize_weight(W, spec, mse_clip=True)
    assert _out_err(W, W_g, X) < 0.5 * _out_err(W, W_r, X)
    # what is returned is self-consistent: codes + qparams dequantize to W_hat
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    assert torch.allclose(dequantize(codes, scale, zero, spec), W_g)
    assert scale.shape == ((D_OUT, D_IN // group) if group else (D_OUT, 1))


def test_act_order_and_static_groups_undo_the_permutation(layer):
    X, W, H = layer
    spec = QuantSpec(4, "group", 64, symmetric=False)
    W_g, codes, scale, zero = gptq_quantize_weight(W, H, spec, act_order=True, mse_clip=False)
    assert torch.allclose(dequantize(codes, scale, zero, spec), W_g)
    W_r, *_ = rtn_quantize_weight(W, spec)
    assert _out_err(W, W_g, X) < 0.5 * _out_err(W, W_r, X)


@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec(3, "group", 64, symmetric=False)],
                         ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_identity_hessian_gives_rtn(layer, spec, act_order):
    _, W, _ = layer
    H = 3.0 * torch.eye(D_IN)
    W_g, codes, scale, zero = gptq_quantize_weight(W, H, spec, act_order=act_order,
                                                   mse_clip=False)
    W_r, codes_r, scale_r, zero_r = rtn_quantize_weight(W, spec)
    assert torch.equal(codes, codes_r)
    assert torch.allclose(W_g, W_r, atol=1e-6)
    assert torch.allclose(scale, scale_r) and torch.equal(zero, zero_r)


def test_dead_inputs_are_zeroed_not_nan(layer):
    X, W, _ = layer
    X = X.clone()
    X[:, 5] = 0.0  # an input feature that never fires
    H = 2 * X.T @ X / len(X)
    W_g, *_ = gptq_quantize_weight(W, H, QuantSpec(4), mse_clip=False)
    assert torch.isfinite(W_g).all()
    assert (W_g[:, 5] == 0).all()


def test_nan_in_hessian_raises_numerical_error(layer):
    _, W, H = layer
    H = H.clone()
    H[3, 7] = float("nan")
    with pytest.raises(NumericalError, match="NaN/Inf for layer layers.3.attn.q"):
        gptq_quantize_weight(W, H, QuantSpec(4), name="layers.3.attn.q")
    acc = HessianAccumulator(D_IN, name="layers.3.attn.k")
    x = torch.randn(4, D_IN)
    x[1, 2] = float("inf")
    with pytest.raises(NumericalError, match="layers.3.attn.k"):
        acc.add(x)


def test_group_size_must_divide_input_width(layer):
    _, W, H = layer
    with pytest.raises(ConfigError, match="96"):
        gptq_quantize_weight(W, H, QuantSpec(4, "group", 96))


@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec(4, "group", 32)], ids=str)
def test_lazy_block_updates_do_not_change_the_result(layer, spec):
    """Blocking is only a speed trick: group qparams must see all earlier columns' updates."""
    _, W, H = layer
    a = gptq_quantize_weight(W, H, spec, block_size=128, mse_clip=False)
    b = gptq_quantize_weight(W, H, spec, block_size=32, mse_clip=False)
    assert (a[1] == b[1]).float().mean() > 0.999  # codes (fp summation order may flip a tie)
    assert torch.allclose(a[2], b[2], rtol=1e-4)

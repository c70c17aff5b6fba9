"""Quantizer spec parsing and the pure quantizer ops (editcomp.quant.spec / editcomp.quant.ops)."""

import math

import pytest
import torch

from editcomp.errors import ConfigError
from editcomp.quant.ops import (compute_qparams, dequantize, fake_quant, mse_clip_search,
                                pack_int, packed_nbytes, quantize, range_gradients, unpack_int)
from editcomp.quant.spec import BitsSpec, QuantSpec, parse_bits

# ---- spec parsing -------------------------------------------------------------------------

CANONICAL = ["w4a16", "w8a8", "w4a8kv8", "w4a4", "w4a4kv4", "w3a16", "w2a16", "w4a16g128",
             "w4a16-asym", "w3a16g64-asym"]


@pytest.mark.parametrize("text", CANONICAL)
def test_parse_bits_round_trips(text):
    spec = parse_bits(text)
    assert isinstance(spec, BitsSpec)
    assert str(spec) == text
    assert parse_bits(str(spec)) == spec


def test_parse_bits_defaults_follow_methods():
    s = parse_bits("w4a4kv4")
    assert s.weight == QuantSpec(4, "channel", None, symmetric=True)
    assert s.act == QuantSpec(4, "token", None, symmetric=False)
    assert s.kv == QuantSpec(4, "head", None, symmetric=False)
    w = parse_bits("W4A16", group_size=128, w_symmetric=False)
    assert w.act is None and w.kv is None
    assert w.weight == QuantSpec(4, "group", 128, symmetric=False)
    assert str(w) == "w4a16g128-asym"
    assert parse_bits("w8a8").kv is None and parse_bits("w8a8").act.bits == 8


@pytest.mark.parametrize("bad", ["w5x", "w1a16", "w9a8", "w4a2", "w4a4kv16", "w4a4kv3", "a4w4",
                                 "", "w4", "w4a16g0x"])
def test_parse_bits_errors_list_valid_forms(bad):
    with pytest.raises(ConfigError) as e:
        parse_bits(bad)
    msg = str(e.value)
    assert repr(bad) in msg
    for form in ("wNaM[kvK]", "w4a16", "w8a8", "w4a8kv8", "w4a4kv4", "2-8", "4-8 or 16"):
        assert form in msg


def test_parse_bits_conflicting_group_size():
    with pytest.raises(ConfigError, match="group size 128"):
        parse_bits("w4a16g128", group_size=64)


@pytest.mark.parametrize("kwargs", [dict(bits=9), dict(bits=1), dict(bits=4, granularity="row"),
                                    dict(bits=4, granularity="group"),
                                    dict(bits=4, granularity="channel", group_size=64),
                                    dict(bits=4, clip_ratio=0.0), dict(bits=4, clip_ratio=1.5)])
def test_quantspec_validates(kwargs):
    with pytest.raises(ConfigError):
        QuantSpec(**kwargs)


# ---- quantize / dequantize ----------------------------------------------------------------

def _expand(p, x, spec):
    """Public-layout qparams -> one value per element of x."""
    if spec.grouped:
        return p.repeat_interleave(spec.group_size, dim=-1).expand_as(x)
    return p.expand_as(x)


def _data(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[..., 3] *= 20.0  # an outlier channel
    return x


SPECS = [QuantSpec(b, "channel") for b in (2, 3, 4, 8)] + [
    QuantSpec(4, "channel", symmetric=False), QuantSpec(3, "group", 32),
    QuantSpec(4, "group", 64, symmetric=False), QuantSpec(4, "token", symmetric=False),
    QuantSpec(8, "token", symmetric=False), QuantSpec(4, "tensor"),
    QuantSpec(4, "head", 32, symmetric=False), QuantSpec(4, "channel", clip_ratio=0.9)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_roundtrip_error_within_half_step(spec):
    x = _data((2, 5, 128))
    scale, zero = compute_qparams(x, spec)
    codes = quantize(x, scale, zero, spec)
    assert codes.shape == x.shape
    assert codes.dtype == (torch.int8 if spec.symmetric else torch.uint8)
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    xh = dequantize(codes, scale, zero, spec)
    s = _expand(scale, x, spec)
    inside = (xh - x).abs() <= s / 2 * (1 + 1e-5)
    if spec.clip_ratio == 1.0:
        assert inside.all()
        # the full code range is used: the largest magnitude lands on the last code
        if spec.symmetric:
            assert int(codes.abs().max()) == spec.qmax
        else:
            assert int(codes.max()) == spec.qmax
    else:  # only clipped values may be further away, and some are
        clipped = x.abs() > _expand(scale, x, spec) * spec.qmax
        assert inside[~clipped].all() and clipped.any()


def test_scale_shapes():
    x = torch.randn(6, 128)
    assert compute_qparams(x, QuantSpec(4))[0].shape == (6, 1)
    assert compute_qparams(x, QuantSpec(4, "group", 32))[0].shape == (6, 4)
    assert compute_qparams(x, QuantSpec(4, "tensor"))[0].shape == (1, 1)
    a = torch.randn(2, 3, 64)
    assert compute_qparams(a, QuantSpec(4, "token", symmetric=False))[0].shape == (2, 3, 1)
    assert compute_qparams(a, QuantSpec(4, "head", 16, symmetric=False))[0].shape == (2, 3, 4)


def test_symmetric_scale_formula_and_dim():
    x = _data((4, 64))
    scale, zero = compute_qparams(x, QuantSpec(4))
    assert torch.allclose(scale[:, 0], x.abs().amax(1) / 7)
    assert (zero == 0).all()
    s0, _ = compute_qparams(x.t(), QuantSpec(4), dim=0)  # one scale per column of x.T
    assert s0.shape == (1, 4) and torch.allclose(s0[0], scale[:, 0])


@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_is_exactly_representable(symmetric):
    spec = QuantSpec(4, "channel", symmetric=symmetric)
    x = torch.randn(3, 32) + (0.0 if symmetric else 0.7)
    x[:, ::5] = 0.0
    scale, zero = compute_qparams(x, spec)
    codes = quantize(x, scale, zero, spec)
    xh = dequantize(codes, scale, zero, spec)
    assert (xh[:, ::5] == 0).all()
    if symmetric:
        assert (codes[:, ::5] == 0).all()
    else:
        assert (codes[:, ::5].float() == zero).all()
        assert (zero == zero.round()).all() and (zero >= 0).all() and (zero <= 15).all()


def test_asymmetric_per_token_exact_on_grid_aligned_shifted_vector():
    """Rows that are an offset 4-bit grid come back exactly, including their min and max."""
    spec = QuantSpec(4, "token", symmetric=False)
    g = torch.Generator().manual_seed(1)
    k = torch.stack([torch.randperm(16, generator=g) for _ in range(6)]).float()  # codes 0..15
    z0 = torch.tensor([0.0, 2, 5, 9, 13, 15])[:, None]  # integer offsets: min -z0*s, max (15-z0)*s
    s0 = torch.rand(6, 1, generator=g) + 0.1
    x = (k - z0) * s0
    scale, zero = compute_qparams(x, spec)
    assert torch.allclose(scale, s0, rtol=1e-6) and torch.equal(zero, z0)
    xh = dequantize(quantize(x, scale, zero, spec), scale, zero, spec)
    assert torch.allclose(xh, x, rtol=0, atol=1e-6)
    assert torch.allclose(xh.amin(1), x.amin(1), atol=1e-6)
    assert torch.allclose(xh.amax(1), x.amax(1), atol=1e-6)


def test_asymmetric_beats_symmetric_on_shifted_tokens():
    x = torch.randn(8, 256) * 0.5 + 3.0  # tokens far from zero mean
    err = {}
    for sym in (True, False):
        spec = QuantSpec(4, "token", symmetric=sym)
        err[sym] = (fake_quant(x, spec) - x).abs().max()
    assert err[False] < 0.75 * err[True]


@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec(4, "token", symmetric=False),
                                  QuantSpec(4, "group", 16)], ids=str)
def test_all_zero_rows_do_not_make_nan(spec):
    x = torch.randn(4, 64)
    x[1] = 0.0
    scale, zero = compute_qparams(x, spec)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    xh = fake_quant(x, spec)
    assert torch.isfinite(xh).all() and (xh[1] == 0).all()
    assert (fake_quant(torch.zeros(3, 64), spec) == 0).all()


def test_group_size_must_divide():
    with pytest.raises(ConfigError) as e:
        compute_qparams(torch.randn(4, 576), QuantSpec(4, "group", 128))
    assert "128" in str(e.value) and "576" in str(e.value)
    with pytest.raises(ConfigError, match="head_dim"):
        fake_quant(torch.randn(2, 64), QuantSpec(4, "head", None, symmetric=False))


# ---- fake_quant ---------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec(3, "group", 16, symmetric=False),
                                  QuantSpec(4, "token", symmetric=False)], ids=str)
def test_fake_quant_values_and_identity_gradient(spec):
    x = _data((3, 64)).requires_grad_(True)
    y = fake_quant(x, spec)
    scale, zero = compute_qparams(x.detach(), spec)
    assert torch.equal(y.detach(), dequantize(quantize(x.detach(), scale, zero, spec), scale,
                                              zero, spec))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_range_gradients_reach_the_range_elements():
    """Inside ``range_gradients`` the dynamic scale is differentiable: the row's absmax element
    gets the scale's gradient on top of the STE's 1, and nothing else changes."""
    spec = QuantSpec(4, "token")
    x = _data((3, 64))
    plain = x.clone().requires_grad_(True)
    fake_quant(plain, spec).sum().backward()
    graded = x.clone().requires_grad_(True)
    with range_gradients():
        y = fake_quant(graded, spec)
    y.sum().backward()
    assert torch.equal(y.detach(), fake_quant(x, spec))
    top = x.abs().argmax(-1)
    rows = torch.arange(3)
    scale = x.abs().amax(-1) / spec.qmax
    v = x / scale[:, None]
    expected = (v.round() - v).sum(-1) / spec.qmax * x[rows, top].sign()
    assert torch.allclose(graded.grad[rows, top] - 1, expected, atol=1e-4)
    others = torch.ones_like(x, dtype=torch.bool)
    others[rows, top] = False
    assert torch.equal(graded.grad[others], plain.grad[others])
    assert not torch.equal(graded.grad, plain.grad)


def test_fake_quant_learnable_scale_gets_lsq_gradient():
    spec = QuantSpec(4, "channel", clip_ratio=1.0)
    x = _data((3, 64))
    s0, _ = compute_qparams(x, spec)
    scale = (s0 * 0.6).clone().requires_grad_(True)  # small: some values get clamped
    xr = x.clone().requires_grad_(True)
    fake_quant(xr, spec, scale).sum().backward()
    y = x / scale.detach()
    clamped = (y.round() < spec.qmin) | (y.round() > spec.qmax)
    assert clamped.any() and (~clamped).any()
    expected = torch.where(clamped, y.round().clamp(spec.qmin, spec.qmax), y.round() - y).sum(1)
    assert torch.allclose(scale.grad[:, 0], expected, atol=1e-4)
    assert torch.equal(xr.grad, (~clamped).float())  # clipped elements pass no gradient


@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quant_tensor_clip_is_the_spec_clip_and_learns(symmetric):
    """A tensor ``clip`` gives the values of ``spec.clip_ratio`` = that value, and its gradient
    is the scale's LSQ gradient times d scale / d clip = scale / clip (the range is fixed)."""
    spec = QuantSpec(4, "token", symmetric=symmetric)
    x = _data((5, 64))
    clip = torch.tensor(0.8, requires_grad=True)
    out = fake_quant(x, spec, clip=clip)
    assert torch.equal(out, fake_quant(x, spec.replace(clip_ratio=0.8)))
    assert not torch.equal(out, fake_quant(x, spec))  # the clip is not ignored
    out.sum().backward()
    s0, z0 = compute_qparams(x, spec.replace(clip_ratio=0.8))
    scale = s0.clone().requires_grad_(True)
    fake_quant(x, spec, scale, z0).sum().backward()
    assert torch.allclose(clip.grad, (scale.grad * s0 / 0.8).sum(), rtol=1e-4)
    assert clip.grad.abs() > 0


def test_fake_quant_bf16():
    spec = QuantSpec(4, "token", symmetric=False)
    x = _data((2, 4, 64)).to(torch.bfloat16).requires_grad_(True)
    y = fake_quant(x, spec)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, fake_quant(x.detach().float(), spec).to(torch.bfloat16))
    assert (y.float() - x.float()).abs().max() < 0.2 * x.float().abs().max()
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.equal(x.grad, torch.ones_like(x))


# ---- MSE clip search ----------------------------------------------------------------------

@pytest.mark.parametrize("spec", [QuantSpec(3), QuantSpec(4, "group", 32, symmetric=False)], ids=str)
def test_mse_clip_search_picks_the_best_grid_point(spec):
    w = _data((4, 64), seed=3)
    w[0, 7] = 40.0  # a lone outlier: clipping it pays off
    clip, scale, zero = mse_clip_search(w, spec, grid=50, max_shrink=0.8)
    assert clip.shape == scale.shape == compute_qparams(w, spec)[0].shape
    assert (clip <= 1).all() and (clip > 0.2 - 1e-9).all() and (clip < 1).any()

    def err(p):  # per-row (group) error with a fixed clip ratio, through the public ops
        sp = spec.replace(clip_ratio=p)
        d = (fake_quant(w, sp) - w).abs().pow(2.4)
        return d.view(4, -1, spec.group_size).sum(-1) if spec.grouped else d.sum(1, keepdim=True)

    grid = [1 - i / 50 for i in range(40)]
    errs = torch.stack([err(p) for p in grid])
    best = torch.tensor(grid)[errs.argmin(0)]
    assert torch.allclose(clip, best.to(clip.dtype))
    s_best, z_best = compute_qparams(w, spec.replace(clip_ratio=float(clip.flatten()[0])))
    assert torch.allclose(scale.flatten()[0], s_best.flatten()[0])
    assert (errs.min(0).values <= errs[0] + 1e-6).all()


# ---- packing ------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_pack_unpack_exact(bits, symmetric):
    spec = QuantSpec(bits, symmetric=symmetric)
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(spec.qmin, spec.qmax + 1, (3, 7, 5), generator=g)
    codes = codes.to(torch.int8 if symmetric else torch.uint8)
    codes.view(-1)[:2] = torch.tensor([spec.qmin, spec.qmax])  # both ends present
    packed = pack_int(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(codes.numel(), bits) == math.ceil(105 * bits / 8)
    back = unpack_int(packed, bits, codes.shape, signed=symmetric)
    assert back.dtype == codes.dtype and torch.equal(back, codes)


def test_pack_layout_is_little_endian():
    c = torch.tensor([-8, 7, 0, -1], dtype=torch.int8)  # +8 -> 0, 15, 8, 7
    assert pack_int(c, 4).tolist() == [0xF0, 0x78]
    u = torch.tensor([1, 2, 3, 0, 3], dtype=torch.uint8)
    assert pack_int(u, 2).tolist() == [1 | 2 << 2 | 3 << 4, 3]
    t = torch.tensor([7, 0, 0, 0, 0, 0, 0, 1], dtype=torch.uint8)  # 8 codes -> 3 bytes
    assert pack_int(t, 3).tolist() == [0b00000111, 0, 0b00100000]


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="range"):
        pack_int(torch.tensor([0, 9], dtype=torch.int8), 4)
    with pytest.raises(ValueError, match="range"):
        pack_int(torch.tensor([0, 16], dtype=torch.uint8), 4)


def test_asymmetric_range_is_widened_to_include_zero():
    """All-positive rows keep 0 on the grid (zero point 0), as QuaRot/GPTQ do."""
    spec = QuantSpec(4, "token", symmetric=False)
    x = torch.rand(3, 32) + 5.0
    scale, zero = compute_qparams(x, spec)
    assert (zero == 0).all() and torch.allclose(scale[:, 0], x.amax(1) / 15)
    z = torch.zeros(3, 1)
    assert (dequantize(quantize(z, scale, zero, spec), scale, zero, spec) == 0).all()
    assert compute_qparams(-x, spec)[1].eq(15).all()

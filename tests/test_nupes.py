"""NUPES: the power-exponent operator, data-free search, data-driven mode, runtime and CLI."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from editcomp import checkpoint
from editcomp.errors import ConfigError, DataError
from editcomp.quant.gptq import HessianAccumulator, gptq_quantize_weight, rtn_quantize_weight
from editcomp.quant.nupes import (NUPESConfig, nupes_dequantize, nupes_quantize,
                                  nupes_quantize_weight, output_error, power_lut,
                                  lut_dequantize, range_ref, search_exponent)
from editcomp.quant.nupes_model import nupes_weights
from editcomp.quant.nupes_linear import NUPESLinear
from editcomp.quant.ops import _rows, compute_qparams, dequantize, quantize
from editcomp.quant.checkpoint_io import save_quantized
from editcomp.quant.pipeline import QuantizeConfig, quantize as pipeline_quantize
from editcomp.quant.runtime import quant_linears, spec_to_dict
from editcomp.tiny import tiny_model, tiny_tokenizer


def _laplace(rows=64, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(rows, cols, generator=g) - 0.5
    return -0.02 * torch.sign(u) * torch.log1p(-2 * u.abs())


@pytest.mark.parametrize("bits,group", [(3, None), (4, 32), (8, None), (2, 64)])
def test_exponent_one_is_uniform_symmetric_rtn_exactly(bits, group):
    cfg = NUPESConfig(bits=bits, group_size=group, signed_scale=False)
    W = _laplace()
    scale, zero = compute_qparams(W, cfg.spec)
    a = torch.ones(W.shape[0], 1)
    codes = nupes_quantize(W, scale, a, cfg.spec, cfg.range_code)
    ref = quantize(W, scale, zero, cfg.spec)
    assert torch.equal(codes, ref)
    assert torch.equal(nupes_dequantize(codes, scale, a, cfg.spec, cfg.range_code),
                       dequantize(ref, scale, zero, cfg.spec))


@pytest.mark.parametrize("bits,group", [(3, None), (4, 32), (2, 64)])
def test_signed_scale_puts_each_extreme_on_code_qmin_exactly(bits, group):
    cfg = NUPESConfig(bits=bits, group_size=group)
    W = _laplace(rows=16, cols=128)
    W[3, 5] = 0.5  # a positive extreme: that scale must come out negative
    rows = W.reshape(16, -1, group or 128)
    ext = rows.gather(-1, rows.abs().argmax(-1, keepdim=True)).squeeze(-1)
    ref = range_ref(W, cfg.spec, signed=True).reshape(ext.shape)
    assert torch.equal(ref, -ext) and cfg.range_code == 2 ** (bits - 1)
    for a in (1.0, 0.6):
        s = ref.reshape(range_ref(W, cfg.spec, True).shape) / cfg.range_code
        A = torch.full((16, 1), a)
        codes = nupes_quantize(W, s, A, cfg.spec, cfg.range_code)
        hat = nupes_dequantize(codes, s, A, cfg.spec, cfg.range_code)
        # every extreme is code qmin and comes back exactly; all 2^b codes are in use
        c = codes.reshape(rows.shape).gather(-1, rows.abs().argmax(-1, keepdim=True))
        assert c.eq(cfg.spec.qmin).all()
        h = hat.reshape(rows.shape).gather(-1, rows.abs().argmax(-1, keepdim=True)).squeeze(-1)
        torch.testing.assert_close(h, ext, rtol=1e-6, atol=0)
        assert codes.unique().numel() == 2 ** bits


def test_signed_scale_search_has_lower_error_than_symmetric():
    W = _laplace(rows=32, cols=512)
    for bits, group in ((4, 64), (3, None)):
        signed = search_exponent(W, NUPESConfig(bits=bits, group_size=group))
        sym = search_exponent(W, NUPESConfig(bits=bits, group_size=group, signed_scale=False))
        assert signed[2].sum() < 0.95 * sym[2].sum()  # one more level inside the range
        assert (signed[1] < 0).any() and (sym[1] > 0).all()


def _brute_force(W, cfg, a_values):
    """Per-row error at each a of a fine grid, each with the best clip of cfg.clip_grid."""
    spec, rc = cfg.spec, cfg.range_code
    ref = range_ref(W, spec, cfg.signed_scale)
    errs = []
    for a in a_values:
        A = torch.full((W.shape[0], 1), float(a))
        best = None
        for c in cfg.clip_grid:
            s = ref * c / rc
            e = (nupes_dequantize(nupes_quantize(W, s, A, spec, rc), s, A, spec, rc)
                 - W).square().sum(1)
            best = e if best is None else torch.minimum(best, e)
        errs.append(best)
    return torch.stack(errs)  # [n_a, rows]


def test_data_free_search_finds_the_optimum_on_laplace_weights():
    W = _laplace(rows=16, cols=2048)
    cfg = NUPESConfig(bits=4, data_free=True, clip_grid=(1.0, 0.95, 0.9, 0.85, 0.8, 0.75))
    a, scale, err = search_exponent(W, cfg)
    grid = torch.linspace(cfg.min_exponent, 1.0, 71)
    brute = _brute_force(W, cfg, grid)
    opt_err, opt_k = brute.min(0)
    # as good as a 71-point brute force (0.5% in total, 3% per row: a row's error curve has
    # small bumps where a level crosses its extreme weight, so the golden section can settle in
    # a neighbouring dip), at the same exponent for most rows
    assert err.sum() <= opt_err.sum() * 1.005 and (err <= opt_err * 1.03).all()
    assert (a[:, 0] - grid[opt_k]).abs().median() < 0.01
    assert 0.5 < float(a.median()) < 0.8  # Laplace at 4 bits: the optimum is near a = 0.65
    # Laplace weights want more levels near zero: a < 1, clearly better than uniform (a = 1)
    assert (a < 0.9).all()
    assert err.sum() < 0.85 * brute[-1].sum()
    # the reported error is the real reconstruction error of the returned (a, scale)
    rc = cfg.range_code
    real = (nupes_dequantize(nupes_quantize(W, scale, a, cfg.spec, rc), scale, a, cfg.spec, rc)
            - W).square().sum(1)
    torch.testing.assert_close(real, err, rtol=1e-3, atol=0)


def test_nearest_rounding_takes_the_closest_level_and_power_rounding_rounds_magnitudes_up():
    W = _laplace(rows=16, cols=256)
    for group in (None, 64):
        cfg = NUPESConfig(bits=3, group_size=group)
        spec, rc = cfg.spec, cfg.range_code
        s = range_ref(W, spec, True) / rc
        A = torch.linspace(0.5, 1.0, 16)[:, None]
        hat = {}
        for nearest in (True, False):
            codes = nupes_quantize(W, s, A, spec, rc, nearest=nearest)
            hat[nearest] = nupes_dequantize(codes, s, A, spec, rc)
        # brute force: the closest of the 2^b levels of each weight's own grid
        levels = torch.stack([nupes_dequantize(torch.full(W.shape, q, dtype=torch.int8), s, A,
                                               spec, rc) for q in range(spec.qmin, spec.qmax + 1)])
        closest = levels.gather(0, (levels - W).abs().argmin(0, keepdim=True))[0]
        torch.testing.assert_close(hat[True], closest, rtol=0, atol=1e-7)
        assert ((hat[True] - W).abs() <= (hat[False] - W).abs() + 1e-7).all()
        # the power-space decision points sit below the midpoints: more magnitudes round up
        drift = {k: float((v.abs() - W.abs()).mean() / W.abs().mean()) for k, v in hat.items()}
        assert drift[False] > drift[True] + 0.02
        assert torch.equal(hat[True][15], hat[False][15])  # a = 1: one rounding rule (RTN)
        # the search's error model follows the rounding rule it is told
        for rounding in ("nearest", "power"):
            c = NUPESConfig(bits=3, group_size=group, rounding=rounding)
            a, sc, err = search_exponent(W, c)
            real = (nupes_dequantize(nupes_quantize(W, sc, a, spec, rc, rounding == "nearest"),
                                     sc, a, spec, rc) - W).square().sum(1)
            torch.testing.assert_close(real, err, rtol=1e-3, atol=0)
    with pytest.raises(ConfigError, match="rounding"):
        NUPESConfig(rounding="stochastic")


def test_per_layer_exponent_is_one_value_and_not_better_than_per_channel():
    W = _laplace(rows=32, cols=256) * torch.linspace(0.5, 2, 32)[:, None]
    per_ch = search_exponent(W, NUPESConfig(bits=3))
    per_layer = search_exponent(W, NUPESConfig(bits=3, per_channel_exponent=False))
    assert per_layer[0].shape == (1, 1) and per_ch[0].shape == (32, 1)
    assert per_ch[2].sum() <= per_layer[2].sum() * 1.0001


def test_lut_dequant_equals_the_formula():
    W = _laplace(rows=8, cols=128)
    for group in (None, 32):
        cfg = NUPESConfig(bits=3, group_size=group)
        a, scale, _ = search_exponent(W, cfg)
        codes = nupes_quantize(W, scale, a, cfg.spec, 4)
        lut = power_lut(a, 3, 4)
        assert lut.shape == (8, 8)
        via_lut = lut_dequantize(codes, scale, lut, cfg.spec)
        assert torch.equal(via_lut, nupes_dequantize(codes, scale, a, cfg.spec, 4))
        # the table holds the formula s * sign(q) R (|q|/R)^(1/a), elementwise (pow: <= 1 ulp)
        q = codes.float().reshape(8, -1, group or 128)
        formula = (torch.sign(q) * 4 * (q.abs() / 4).pow(1 / a[:, :, None])
                   * (scale[..., None] if group else scale[:, :, None])).reshape(8, 128)
        torch.testing.assert_close(via_lut, formula, rtol=1e-6, atol=0)
        assert lut[:, 4].eq(0).all() and lut[:, 0].eq(-4).all()  # codes 0 and -R are exact


def _layer_data(seed=0, n=256, cols=128, rows=96):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5
    X = torch.randn(n, cols, generator=g) @ mix * (1 + 4 * (torch.rand(cols, generator=g) > 0.9))
    acc = HessianAccumulator(cols)
    acc.add(X)
    return _laplace(rows=rows, cols=cols, seed=seed), acc.H


@pytest.mark.parametrize("group", [None, 64])
def test_unbiased_scales_remove_the_shrinking_gain_of_the_data_free_fit(group):
    """The error-minimizing fit shrinks (gain < 1 per scale); the unbiased refit gives gain 1 for
    every scale with the same codes, at most a small cost in weight error (unclipped group scales
    are not error-minimizing either: there it may even lower it); all-zero groups keep their
    scale."""
    W = _laplace(rows=16, cols=512)
    W[3, :64] = 0.0
    spec = NUPESConfig(bits=4, group_size=group).spec

    def gains(W_hat):
        rows, hat = _rows(W, spec), _rows(W_hat, spec)
        keep = group is None
        return (hat * rows).sum(-1, keepdim=keep) / (rows * rows).sum(-1, keepdim=keep)

    plain = nupes_quantize_weight(W, NUPESConfig(bits=4, group_size=group, data_free=True,
                                                 unbiased_scale="never"))
    fixed = nupes_quantize_weight(W, NUPESConfig(bits=4, group_size=group, data_free=True,
                                                 unbiased_scale="always"))
    default = nupes_quantize_weight(W, NUPESConfig(bits=4, group_size=group, data_free=True))
    # the default refits group scales only (per channel it cost perplexity at 3 bits)
    assert torch.equal(default[0], (fixed if group else plain)[0])
    assert torch.equal(plain[1], fixed[1])  # the same codes
    g_plain, g_fixed = gains(plain[0]), gains(fixed[0])
    live = torch.isfinite(g_plain)
    assert float(g_plain[live].mean()) < 0.997  # small groups scatter around it
    torch.testing.assert_close(g_fixed[live], torch.ones_like(g_fixed[live]), rtol=1e-5, atol=0)
    if group:
        assert fixed[2][3, 0] == plain[2][3, 0]  # the all-zero group
    err = [float((x[0] - W).square().sum()) for x in (plain, fixed)]
    assert err[1] < 1.05 * err[0]


def test_the_unbiased_refit_leaves_the_data_driven_path_alone():
    W, H = _layer_data()
    on = nupes_quantize_weight(W, NUPESConfig(bits=3, steps=0, unbiased_scale="always"), H)
    off = nupes_quantize_weight(W, NUPESConfig(bits=3, steps=0, unbiased_scale="never"), H)
    assert torch.equal(on[0], off[0])


def test_data_driven_beats_data_free_and_gptq_on_output_error():
    W, H = _layer_data()
    cfg = NUPESConfig(bits=3, steps=60)
    df = nupes_quantize_weight(W, NUPESConfig(bits=3, data_free=True))[0]
    dd, _, _, _, info = nupes_quantize_weight(W, cfg, H)
    gptq = gptq_quantize_weight(W, H, cfg.spec)[0]
    e_df, e_dd, e_gptq = (output_error(x, W, H) for x in (df, dd, gptq))
    assert e_dd < 0.9 * e_df
    assert e_dd < 0.95 * e_gptq
    assert info["err"] == pytest.approx(e_dd, rel=1e-4)


def test_learned_codes_exponent_and_scales_lower_the_output_error():
    W, H = _layer_data(seed=1)
    cfg = NUPESConfig(bits=3, steps=150, error_feedback=False, hessian_rank=32)
    _, codes, _, a, info = nupes_quantize_weight(W, cfg, H)
    a0 = search_exponent(W, cfg)[0]
    # learning alone, from data-free (nearest-level codes: 3.54 -> 3.02 at the time of writing)
    assert info["err_learned"] < 0.9 * info["err_data_free"]
    assert info["err"] == info["err_learned"]
    assert not torch.equal(a, a0)  # the exponents moved
    q0 = nupes_quantize(W, search_exponent(W, cfg)[1], a0, cfg.spec, cfg.range_code)
    assert ((codes.int() - q0.int()).abs() >= 1).any()
    # never worse than where it started: error feedback + learning <= error feedback alone
    ef = nupes_quantize_weight(W, NUPESConfig(bits=3, steps=0), H)[4]["err"]
    both = nupes_quantize_weight(W, NUPESConfig(bits=3, steps=40), H)[4]["err"]
    assert both <= ef


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _calib(n=4, L=64, seed=0):
    return torch.randint(3, 512, (n, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("data_free,group", [(True, None), (False, 16), (False, None)])
def test_pipeline_pack_and_reload_give_identical_logits(tmp_path, tok, data_free, group):
    model = tiny_model("llama")
    ids = _calib(1, 32, seed=5)
    cfg = QuantizeConfig(bits="w3a16", method="nupes", group_size=group,
                         nupes=NUPESConfig(data_free=data_free, steps=10, min_calib_tokens=64))
    report = pipeline_quantize(model, cfg, None if data_free else _calib(), progress=False)
    qls = quant_linears(model)
    assert len(qls) == 14 and all(isinstance(q, NUPESLinear) for q in qls.values())
    hist = report["nupes"]["exponent_histogram"]
    assert sum(n for _, _, n in hist) == sum(q.exponents.numel() for q in qls.values())
    with torch.no_grad():
        before = model(input_ids=ids).logits
    out = save_quantized(model, tok, tmp_path / "q", checkpoint.lineage_entry("quantize", {}))
    ck = checkpoint.load(out, device="cpu", dtype="fp32")
    assert all(isinstance(q, NUPESLinear) for q in quant_linears(ck.model).values())
    with torch.no_grad():
        after = ck.model(input_ids=ids).logits
    assert torch.equal(before, after)


def test_model_weights_before_packing_equal_the_lut_weights():
    model = tiny_model("qwen2")
    codes, _ = nupes_weights(model, NUPESConfig(bits=4, data_free=True), progress=False)
    name, (q, s, a, rc) = next(iter(codes.items()))
    assert rc == 8 and (s < 0).any()  # signed scales by default
    W_hat = dict(model.named_modules())[name].weight.detach()
    lin = torch.nn.Linear(W_hat.shape[1], W_hat.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(W_hat)
    m = NUPESLinear.from_float(lin, NUPESConfig(bits=4).spec, W_hat_codes=(q, s, a, rc))
    assert torch.equal(m.dequantize_weight(), W_hat)


def test_checkpoint_without_range_code_loads_as_symmetric():
    """Checkpoints written before signed scales carry no ``range_code``: R = 2^(b-1) - 1."""
    m = NUPESLinear.from_quant_config({"kind": "nupes", "shape": [4, 8], "bias": False,
                                       "weight": spec_to_dict(NUPESConfig(bits=3).spec)})
    assert m.rc == 3
    assert NUPESLinear.from_quant_config(m.quant_config() | {"range_code": 4}).rc == 4


def test_per_layer_exponent_round_trips(tmp_path, tok):
    model = tiny_model("llama")
    cfg = QuantizeConfig(bits="w4a16", method="nupes",
                         nupes=NUPESConfig(data_free=True, per_channel_exponent=False))
    pipeline_quantize(model, cfg, progress=False)
    assert all(q.exponents.shape == (1, 1) for q in quant_linears(model).values())
    out = save_quantized(model, tok, tmp_path / "q", checkpoint.lineage_entry("quantize", {}))
    ck = checkpoint.load(out, device="cpu")
    assert all(q.exponents.shape == (1, 1) for q in quant_linears(ck.model).values())


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 9, 16])
def test_bits_outside_2_to_8_is_a_config_error(bits):
    with pytest.raises(ConfigError, match="bits must be an integer in 2-8"):
        NUPESConfig(bits=bits)


def test_an_unknown_unbiased_scale_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="unbiased_scale must be one of groups, always, never"):
        NUPESConfig(unbiased_scale=True)


def test_group_size_not_dividing_the_width_is_a_config_error():
    model = tiny_model("llama")  # hidden 64, intermediate 128
    with pytest.raises(ConfigError, match=r"layer model\.layers\.0\.self_attn\.q_proj: "
                                          r"group size 48 does not divide the last dimension 64"):
        nupes_weights(model, NUPESConfig(bits=4, group_size=48, data_free=True), progress=False)


def test_too_short_calibration_is_a_data_error_before_anything_changes():
    model = tiny_model("llama")
    w0 = model.model.layers[0].mlp.down_proj.weight.clone()
    with pytest.raises(DataError, match="calibration data too short for NUPES: 64 tokens"):
        nupes_weights(model, NUPESConfig(bits=4, min_calib_tokens=1024), _calib(1, 64),
                      progress=False)
    with pytest.raises(DataError, match="needs calibration windows"):
        nupes_weights(model, NUPESConfig(bits=4), None, progress=False)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, w0)


def _cli(args):
    from editcomp.cli import cli
    return CliRunner().invoke(cli, args)


def test_cli_bad_inputs_are_one_line_errors(tmp_path):
    r = _cli(["quantize", "x", "--method", "nupes", "--bits", "w9a16", "--out",
              str(tmp_path / "o")])
    assert r.exit_code == 1 and "unsupported bits" in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = _cli(["quantize", "x", "--method", "nupes", "--bits", "w3a16-asym", "--out",
              str(tmp_path / "o")])
    assert r.exit_code == 1 and "NUPES weights are symmetric" in r.output
    r = _cli(["quantize", "x", "--method", "nf4", "--weights", "nupes", "--bits", "w4a16",
              "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "--weights does not apply" in r.output
    assert not (tmp_path / "o").exists()


def test_quantize_config_weight_stage_defaults_and_composition():
    assert QuantizeConfig(method="nupes").weight_stage == "nupes"
    assert QuantizeConfig(method="quarot").weight_stage == "gptq"
    c = QuantizeConfig(method="quarot", weights="nupes", bits="w3a16",
                       nupes=NUPESConfig(data_free=True))
    assert c.weight_stage == "nupes" and c.needs_calibration  # quarot itself calibrates
    assert not QuantizeConfig(method="nupes", bits="w3a16",
                              nupes=NUPESConfig(data_free=True)).needs_calibration
    with pytest.raises(ConfigError, match="unknown weights"):
        QuantizeConfig(weights="awq")


def test_quarot_then_nupes_weights_keeps_the_online_hadamard(tmp_path, tok):
    model = tiny_model("llama")
    ids = _calib(1, 32, seed=3)
    cfg = QuantizeConfig(bits="w4a16", method="quarot", weights="nupes", qsur=False,
                         nupes=NUPESConfig(steps=5, min_calib_tokens=64))
    pipeline_quantize(model, cfg, _calib(), progress=False)
    qls = quant_linears(model)
    assert any(q.hadamard_size for q in qls.values())
    assert all(isinstance(q, NUPESLinear) for q in qls.values())
    with torch.no_grad():
        before = model(input_ids=ids).logits
    out = save_quantized(model, tok, tmp_path / "q", checkpoint.lineage_entry("quantize", {}))
    with torch.no_grad():
        after = checkpoint.load(out, device="cpu").model(input_ids=ids).logits
    assert torch.equal(before, after)


def test_transform_stage_alone_then_weights_equals_the_whole_pipeline():
    """pipeline.transform lets one transform serve several weight quantizers (the benchmark's
    shared OSTQuant rows): transform, then the weight stage alone, gives the same model."""
    from editcomp.quant.pipeline import transform
    ids = _calib(1, 32, seed=3)
    cfg = QuantizeConfig(bits="w4a16", method="quarot", weights="nupes", qsur=False,
                         nupes=NUPESConfig(data_free=True))
    whole, staged = tiny_model("llama"), tiny_model("llama")
    pipeline_quantize(whole, cfg, _calib(), progress=False)
    with torch.no_grad():
        fp = staged(input_ids=ids).logits
        transform(staged, cfg, _calib(), progress=False)
        torch.testing.assert_close(staged(input_ids=ids).logits, fp, rtol=1e-4, atol=1e-4)
    assert not quant_linears(staged)  # the transform alone quantizes nothing
    pipeline_quantize(staged, QuantizeConfig(bits="w4a16", method="nupes", qsur=False,
                                             nupes=NUPESConfig(data_free=True)), progress=False)
    want, got = whole.state_dict(), staged.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_rtn_baseline_is_reproduced_by_nupes_with_exponent_one():
    W = _laplace(rows=16, cols=64)
    cfg = NUPESConfig(bits=4, signed_scale=False)
    W_rtn, q, s, _ = rtn_quantize_weight(W, cfg.spec)
    assert torch.equal(nupes_dequantize(q, s, torch.ones(16, 1), cfg.spec, cfg.range_code), W_rtn)


# ---- CLI ---------------------------------------------------------------------------------------



def test_cli_too_short_calibration_is_a_one_line_error(tiny_ckpt, text, tmp_path):
    out = tmp_path / "o"
    r = _cli(["quantize", str(tiny_ckpt), "--method", "nupes", "--bits", "w3a16", "--calib",
              str(text), "--nsamples", "2", "--seq-len", "32", "--eval-windows", "0",
              "--out", str(out)])
    assert r.exit_code == 1
    last = r.output.strip().splitlines()[-1]  # (earlier lines: the loader's progress bar)
    assert last.startswith("Error: calibration data too short for NUPES: 64 tokens")
    assert "Traceback" not in r.output and not out.exists()


@pytest.mark.parametrize("extra", [["--method", "nupes", "--data-free", "--group-size", "32"],
                                   ["--method", "quarot", "--weights", "nupes",
                                    "--nupes-steps", "2"]])
def test_cli_nupes_writes_a_reloadable_checkpoint(tiny_ckpt, text, tmp_path, extra):
    import json

    out = tmp_path / "o"
    r = _cli(["quantize", str(tiny_ckpt), "--bits", "w3a16", "--calib", str(text),
              "--eval-text", str(text), "--nsamples", "8", "--seq-len", "128",
              "--eval-windows", "1", "--out", str(out), "--json", *extra])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output.strip().splitlines()[-1])
    assert sum(n for _, _, n in rep["exponent_histogram"]) > 0
    ck = checkpoint.load(out, device="cpu")
    assert all(isinstance(q, NUPESLinear) for q in quant_linears(ck.model).values())


def test_ostquant_transforms_then_nupes_weights(tmp_path, tok):
    from editcomp.quant.ostquant import OSTQuantConfig

    model = tiny_model("llama")
    ids = _calib(1, 32, seed=4)
    cfg = QuantizeConfig(bits="w3a16", method="ostquant", weights="nupes", qsur=False,
                         ostquant=OSTQuantConfig(steps=2, train_windows=2, train_seq_len=32),
                         nupes=NUPESConfig(steps=0, min_calib_tokens=64))
    report = pipeline_quantize(model, cfg, _calib(), progress=False)
    assert "nupes" in report and report["config"]["weights"] == "nupes"
    assert all(isinstance(q, NUPESLinear) for q in quant_linears(model).values())
    with torch.no_grad():
        before = model(input_ids=ids).logits
    out = save_quantized(model, tok, tmp_path / "q", checkpoint.lineage_entry("quantize", {}))
    with torch.no_grad():
        assert torch.equal(checkpoint.load(out, device="cpu").model(input_ids=ids).logits, before)

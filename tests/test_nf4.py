"""NF4 / FP4 baseline: bit-exact agreement with bitsandbytes, checkpoint round trip, bad input."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from editcomp import checkpoint
from editcomp.errors import ConfigError
from editcomp.quant.checkpoint_io import save_quantized
from editcomp.quant.nf4 import FP4Linear, NF4Config, NF4Linear, code_table, quantize_4bit_weight
from editcomp.quant.pipeline import QuantizeConfig, quantize
from editcomp.quant.runtime import quant_linears
from editcomp.tiny import tiny_model, tiny_tokenizer

bnb = pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_codes_absmax_and_values_match_bitsandbytes(quant_type, blocksize):
    W = torch.randn(48, 256, generator=torch.Generator().manual_seed(1)) * 0.03
    W_hat, codes, absmax = quantize_4bit_weight(W, NF4Config(quant_type, blocksize))
    packed, state = bnb.quantize_4bit(W, blocksize=blocksize, compress_statistics=False,
                                      quant_type=quant_type)
    ref = bnb.dequantize_4bit(packed, state)
    assert torch.equal(W_hat, ref)
    assert torch.equal(absmax.flatten(), state.absmax)
    # our module, rebuilt from codes + absmax, computes bitsandbytes' values bit for bit
    lin = torch.nn.Linear(256, 48, bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)
    cls = NF4Linear if quant_type == "nf4" else FP4Linear
    m = cls.from_float(lin, NF4Config(quant_type, blocksize).spec)
    assert torch.equal(m.dequantize_weight(), ref)
    # the stored 4-bit values are bitsandbytes' codes (bnb: element 2k in the high nibble;
    # pack_int: in the low one), at 4 bits per weight
    p = packed.flatten()
    bnb_codes = torch.stack([p >> 4, p & 15], 1).flatten()
    assert torch.equal(m.codes().flatten().to(torch.int16) + 8, bnb_codes.to(torch.int16))
    assert m.qweight.numel() == p.numel()
    assert codes.min() >= -8 and codes.max() <= 7


def test_nf4_table_is_the_normal_quantile_grid():
    t = code_table("nf4")
    assert t.shape == (16,) and t[0] == -1 and t[-1] == 1 and t[7] == 0
    assert torch.all(t[1:] > t[:-1])


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("method", ["nf4", "fp4"])
def test_pipeline_save_and_reload_give_identical_logits(tmp_path, tok, method):
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    report = quantize(model, QuantizeConfig(bits="w4a16", method=method), progress=False)
    assert report["bits"] == "w4a16g64"
    qls = quant_linears(model)
    assert len(qls) == 14 and all(q.kind == method for q in qls.values())
    with torch.no_grad():
        before = model(input_ids=ids).logits
    out = save_quantized(model, tok, tmp_path / "q", checkpoint.lineage_entry("quantize", {}))
    ck = checkpoint.load(out, device="cpu")
    assert all(q.kind == method for q in quant_linears(ck.model).values())
    with torch.no_grad():
        assert torch.equal(ck.model(input_ids=ids).logits, before)


def test_nf4_beats_rtn_on_gaussian_weights_at_4_bits():
    from editcomp.quant.gptq import rtn_quantize_weight
    from editcomp.quant.spec import QuantSpec

    W = torch.randn(64, 512, generator=torch.Generator().manual_seed(2))
    nf4 = quantize_4bit_weight(W, NF4Config("nf4", 64))[0]
    rtn = rtn_quantize_weight(W, QuantSpec(4, "group", 64))[0]
    assert (nf4 - W).square().sum() < 0.9 * (rtn - W).square().sum()


# ---- bad input -------------------------------------------------------------------------------

def test_block_size_must_be_a_bitsandbytes_size_and_divide_the_width():
    with pytest.raises(ConfigError, match="block size .* must be one of 64, 128"):
        NF4Config("nf4", 32)
    with pytest.raises(ConfigError, match="block size 128 does not divide the layer width 192"):
        quantize_4bit_weight(torch.randn(4, 192), NF4Config("nf4", 128))


def test_nf4_is_4_bit_weight_only():
    with pytest.raises(ConfigError, match="4-bit weight-only: use --bits w4a16"):
        QuantizeConfig(bits="w3a16", method="nf4").bits_spec()
    with pytest.raises(ConfigError, match="4-bit weight-only"):
        QuantizeConfig(bits="w4a8", method="nf4").bits_spec()


def test_cli_bad_block_size_is_a_one_line_error(tmp_path):
    from editcomp.cli import cli

    r = CliRunner().invoke(cli, ["quantize", "x", "--method", "nf4", "--bits", "w4a16",
                                 "--group-size", "100", "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "must be one of" in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()

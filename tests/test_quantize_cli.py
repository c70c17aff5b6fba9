"""`editcomp quantize`: a reloadable checkpoint that matches the in-memory model, and clear
refusals (bad bits, short calibration text, existing output, NaN during calibration)."""

import json

import pytest
import torch
from conftest import run_cli as invoke

from editcomp import checkpoint
from editcomp.quant.pipeline import QuantizeConfig, quantize
from editcomp.tiny import tiny_model, tiny_tokenizer



def base_args(ck, text, out, *extra):
    return ("quantize", ck, "--calib", text, "--eval-text", text, "--seq-len", 32,
            "--nsamples", 4, "--eval-windows", 2, "--out", out, *extra)


@pytest.mark.parametrize("method,bits", [("rtn", "w4a16"), ("gptq", "w4a8kv8"),
                                         ("quarot", "w4a4kv4")])
def test_quantized_checkpoint_reloads_to_the_same_model(tiny_ckpt, text, tmp_path, method, bits):
    out = tmp_path / "q"
    res = invoke(*base_args(tiny_ckpt, text, out, "--method", method, "--bits", bits, "--json"))
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["bits"] == bits and report["ppl_after"] > 0
    # the same steps in memory give the same logits as the saved checkpoint
    from editcomp.data import calibration_windows
    ck = checkpoint.load(tiny_ckpt, device="cpu")
    calib = calibration_windows(ck.tokenizer, text, 4, 32, seed=0)
    quantize(ck.model, QuantizeConfig(bits=bits, method=method, nsamples=4, seq_len=32), calib,
             progress=False)
    q = checkpoint.load(out, device="cpu")
    ids = torch.randint(3, 400, (2, 24))
    with torch.no_grad():
        assert torch.equal(q.model(ids).logits, ck.model(ids).logits)
    assert [e["op"] for e in q.history] == ["test", "quantize"]
    assert q.history[-1]["metrics"]["ppl_after"] == pytest.approx(report["ppl_after"])


def test_bad_bits_lists_valid_forms(tiny_ckpt, text, tmp_path):
    res = invoke(*base_args(tiny_ckpt, text, tmp_path / "q", "--bits", "w5x"))
    assert res.exit_code == 1 and "w4a4kv4" in res.stderr and "w5x" in res.stderr
    assert not (tmp_path / "q").exists()


def test_calibration_text_shorter_than_a_window(tiny_ckpt, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    res = invoke(*base_args(tiny_ckpt, short, tmp_path / "q", "--method", "gptq"))
    assert res.exit_code == 1 and "short.txt" in res.stderr
    assert not (tmp_path / "q").exists()


def test_existing_output_is_refused(tiny_ckpt, text, tmp_path):
    (tmp_path / "q").mkdir()
    res = invoke(*base_args(tiny_ckpt, text, tmp_path / "q", "--method", "rtn"))
    assert res.exit_code == 1 and "already exists" in res.stderr


def test_nan_during_calibration_stops_before_writing(tmp_path, text):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 0] = float("nan")
    ck = checkpoint.save(model, tiny_tokenizer(), tmp_path / "nan", checkpoint.lineage_entry("t"))
    res = invoke(*base_args(ck, text, tmp_path / "q", "--method", "gptq", "--eval-windows", 0))
    assert res.exit_code == 1 and "NaN" in res.stderr
    assert not (tmp_path / "q").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["nan"]

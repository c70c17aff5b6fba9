"""`editcomp export --format compressed-tensors`: the exported files, read by a reader written
here from the documented layout (and by compressed-tensors / transformers when installed), give
exactly our dequantized weights; settings the format cannot express are refused in one line."""

import json

import pytest
import torch
from safetensors.torch import load_file

from editcomp import checkpoint
from editcomp.arch import get_adapter
from editcomp.errors import ConfigError
from editcomp.quant.checkpoint_io import save_quantized
from editcomp.quant.export import ExportConfig, ExportError, export, pack_int32
from editcomp.quant.runtime import QuantLinear, quant_linears, quantize_model
from editcomp.quant.spec import parse_bits
from editcomp.tiny import tiny_model, tiny_tokenizer

from conftest import run_cli as invoke

IDS = torch.tensor([[1, 17, 42, 99, 7, 300, 5, 11, 60, 3, 8, 250]])
TEXT = ("The capital of France is Paris. Language models store facts in their weights. "
        "Die Hauptstadt von Deutschland ist Berlin. ") * 60


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def quantized(family, bits):
    model = tiny_model(family)
    quantize_model(model, parse_bits(bits))
    return model


def do_export(model, tok, out, **cfg):
    ck = checkpoint.Checkpoint(path=None, model=model, tokenizer=tok)
    return export(ck, ExportConfig(**cfg), out)


# ---- an independent reader of the documented layout ------------------------------------------

def read_int32_rows(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Signed codes from rows of int32 words: code i of a row is bits [i*b, (i+1)*b) of the row
    read as one little-endian number (word j = bits [32j, 32j+32)), minus 2^(b-1)."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.cat([words, torch.zeros(words.shape[0], 1, dtype=torch.int64)], dim=1)
    start = torch.arange(cols) * bits
    lo = words[:, start // 32] >> (start % 32)
    hi = words[:, start // 32 + 1] << (32 - start % 32)
    return ((lo | hi) & (2 ** bits - 1)) - 2 ** (bits - 1)


def dequantize_exported(tensors: dict, name: str, group: dict) -> torch.Tensor:
    w = group["weights"]
    bits, scale = w["num_bits"], tensors[f"{name}.weight_scale"]
    if f"{name}.weight_packed" in tensors:
        out_f, in_f = tensors[f"{name}.weight_shape"].tolist()
        codes = read_int32_rows(tensors[f"{name}.weight_packed"], bits, in_f)
    else:
        codes = tensors[f"{name}.weight"].to(torch.int64)
        out_f, in_f = codes.shape
    zero = torch.zeros_like(scale)
    if not w["symmetric"]:
        zp = tensors[f"{name}.weight_zero_point"]
        zero = (read_int32_rows(zp.t(), bits, out_f).t() if zp.dtype == torch.int32
                else zp.to(torch.int64))
    per = in_f // scale.shape[1]  # columns per scale: in (channel) or group_size
    codes = codes.reshape(out_f, scale.shape[1], per).float()
    return ((codes - zero.float()[..., None]) * scale.float()[..., None]).reshape(out_f, in_f)


@pytest.mark.parametrize("bits", [4, 8, 3])
def test_pack_int32_follows_the_documented_bit_layout(bits):
    torch.manual_seed(bits)
    codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (5, 70), dtype=torch.int8)
    packed = pack_int32(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, -(-70 * bits // 32))
    assert torch.equal(read_int32_rows(packed, bits, 70), codes.to(torch.int64))
    # spot check one word by hand: 4-bit code i sits at bits 4i of word 0, offset by 8
    if bits == 4:
        word = int(packed[0, 0]) & 0xFFFFFFFF
        assert [(word >> (4 * i)) & 15 for i in range(8)] == [int(c) + 8 for c in codes[0, :8]]


CASES = [("llama", "w4a16"), ("llama", "w4a16g32-asym"), ("qwen2", "w8a8"),
         ("gemma3", "w8a16g16"), ("mistral", "w4a16-asym")]


@pytest.mark.parametrize("family,bits", CASES, ids=[f"{f}-{b}" for f, b in CASES])
def test_exported_weights_equal_our_dequantized_weights(tmp_path, tok, family, bits):
    model = quantized(family, bits)
    report = do_export(model, tok, tmp_path / "ct")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    group = cfg["config_groups"]["group_0"]
    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    qls = quant_linears(model)
    assert report["quantized_linears"] == len(qls) == 14
    for name, q in qls.items():
        assert torch.equal(dequantize_exported(tensors, name, group), q.dequantize_weight()), name
        assert not any(k.startswith(f"{name}.") and k.rsplit(".", 1)[1] in
                       ("qweight", "scales", "zeros") for k in tensors)
    # every float tensor is there unchanged (embeddings, norms, biases)
    for k, v in model.state_dict().items():
        if k in tensors:
            assert torch.equal(tensors[k], v), k


def test_config_and_tensor_layout_w4a16(tmp_path, tok):
    model = quantized("llama", "w4a16g32")
    do_export(model, tok, tmp_path / "ct")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    assert q["quantization_status"] == "compressed" and q["ignore"] == ["lm_head"]
    group = q["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["input_activations"] is None
    assert {k: group["weights"][k] for k in ("num_bits", "type", "symmetric", "strategy",
                                              "group_size", "dynamic")} == {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32,
        "dynamic": False}
    t = load_file(tmp_path / "ct" / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"  # [64, 128]
    assert t[f"{name}.weight_packed"].dtype == torch.int32
    assert tuple(t[f"{name}.weight_packed"].shape) == (64, 128 * 4 // 32)
    assert t[f"{name}.weight_scale"].dtype == torch.float32
    assert tuple(t[f"{name}.weight_scale"].shape) == (64, 128 // 32)
    assert t[f"{name}.weight_shape"].tolist() == [64, 128]
    assert f"{name}.weight_zero_point" not in t
    assert [e["op"] for e in checkpoint.read_lineage(tmp_path / "ct")["history"]] == ["export"]


def test_config_and_tensor_layout_w8a8(tmp_path, tok):
    model = quantized("qwen2", "w8a8")
    do_export(model, tok, tmp_path / "ct")
    q = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert q["format"] == "int-quantized"
    group = q["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["weights"]["num_bits"] == 8
    act = group["input_activations"]
    assert (act["num_bits"], act["strategy"], act["dynamic"], act["type"]) == (8, "token", True,
                                                                               "int")
    t = load_file(tmp_path / "ct" / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj"  # [32, 64], with bias in qwen2
    assert t[f"{name}.weight"].dtype == torch.int8 and tuple(t[f"{name}.weight"].shape) == (32, 64)
    assert tuple(t[f"{name}.weight_scale"].shape) == (32, 1) and f"{name}.bias" in t


# ---- refusals: one line, nothing written ------------------------------------------------------

def _online_down_hadamard(model):
    from editcomp.quant.transforms import HadamardInput
    for parts in get_adapter(model).layers():
        parts.replace("down", HadamardInput(parts.down, parts.down.in_features))
    return model


def _non_uniform_grid(model):
    class LookupGrid(QuantLinear):  # stands for NUPES' grid: any kind but "uniform"
        kind = "lookup-test"
    next(iter(quant_linears(model).values())).__class__ = LookupGrid
    return model


def _mixed(model):
    down = get_adapter(model).layers()[0].down
    get_adapter(model).layers()[0].replace("down", QuantLinear.from_float(
        torch.nn.Linear(down.in_features, down.out_features), parse_bits("w8a16").weight))
    return model


REFUSED = {
    "online-hadamard": (lambda: quantize_model(_online_down_hadamard(tiny_model("llama")),
                                               parse_bits("w4a16")), "rotates its input online"),
    "qk-hadamard": (lambda: quantize_model(tiny_model("llama"), parse_bits("w4a16"),
                                           qk_hadamard=True), "rotates Q and K online"),
    "kv-cache": (lambda: quantized("llama", "w8a8kv8"), "KV-cache quantization"),
    "a4": (lambda: quantized("llama", "w4a4"), "4-bit activations"),
    "w4a8": (lambda: quantized("llama", "w4a8"), "need 8-bit weights"),
    "w3": (lambda: quantized("llama", "w3a16"), "4- or 8-bit weights"),
    "w8a8-asym": (lambda: quantized("llama", "w8a8-asym"), "symmetric weights"),
    "non-uniform": (lambda: _non_uniform_grid(quantized("llama", "w4a16")), "non-uniform"),
    "mixed": (lambda: _mixed(quantized("llama", "w4a16")), "different settings"),
    "float": (lambda: tiny_model("llama"), "float checkpoint"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unexpressible_settings_are_refused_in_one_line(tmp_path, tok, case):
    build, reason = REFUSED[case]
    with pytest.raises(ExportError) as e:
        do_export(build(), tok, tmp_path / "ct")
    msg = str(e.value)
    assert reason in msg and "\n" not in msg
    if case != "float":
        assert "exportable: w4a16" in msg
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary directory left


@pytest.mark.parametrize("kwargs,reason", [
    (dict(bits="w4a4kv4"), "KV-cache quantization"), (dict(bits="w4a4"), "4-bit activations"),
    (dict(bits="w4a16", method="quarot"), "online rotations"),
    (dict(group_size=32), "--group-size needs --bits"), (dict(format="gguf"), "unknown export")])
def test_bad_export_config_is_refused_before_any_work(kwargs, reason):
    with pytest.raises(ConfigError, match=reason):
        ExportConfig(**kwargs)


# ---- the command line ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory, tok):
    return checkpoint.save(tiny_model("llama"), tok, tmp_path_factory.mktemp("f") / "tiny",
                           checkpoint.lineage_entry("test"))


@pytest.fixture(scope="module")
def quant_ckpt(tmp_path_factory, tok):
    model = quantized("llama", "w4a16g32")
    return save_quantized(model, tok, tmp_path_factory.mktemp("q") / "q",
                          checkpoint.lineage_entry("quantize"))


def _weights_match(out, model):
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    tensors = load_file(out / "model.safetensors")
    for name, q in quant_linears(model).items():
        assert torch.equal(dequantize_exported(tensors, name, cfg["config_groups"]["group_0"]),
                           q.dequantize_weight()), name


def test_cli_exports_an_editcomp_quantized_checkpoint(quant_ckpt, tmp_path):
    out = tmp_path / "ct"
    res = invoke("export", quant_ckpt, "--out", out, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["bits"] == "w4a16g32" and report["compressed_format"] == "pack-quantized"
    _weights_match(out, checkpoint.load(quant_ckpt, device="cpu").model)
    assert [e["op"] for e in checkpoint.read_lineage(out)["history"]] == ["quantize", "export"]


@pytest.mark.parametrize("method,bits", [("rtn", "w8a8"), ("gptq", "w4a16")])
def test_cli_quantizes_a_float_checkpoint_and_exports(float_ckpt, tmp_path, method, bits):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    out = tmp_path / "ct"
    res = invoke("export", float_ckpt, "--bits", bits, "--method", method, "--calib", calib,
                 "--nsamples", 4, "--seq-len", 32, "--out", out)
    assert res.exit_code == 0, res.output
    assert "wrote" in res.stdout and "lm_head" in res.stdout
    # the same quantization in memory gives exactly the exported weights
    from editcomp.data import calibration_windows
    from editcomp.quant.pipeline import quantize
    ck = checkpoint.load(float_ckpt, device="cpu")
    qcfg = ExportConfig(bits=bits, method=method, nsamples=4, seq_len=32).quantize_config()
    ids = calibration_windows(ck.tokenizer, calib, 4, 32) if method == "gptq" else None
    quantize(ck.model, qcfg, ids, progress=False)
    _weights_match(out, ck.model)


@pytest.mark.parametrize("which,args,reason", [
    ("float", (), "float checkpoint; pass --bits"),
    ("quant", ("--bits", "w4a16"), "already quantized"),
    ("float", ("--bits", "w4a4kv4"), "KV-cache quantization"),
    ("float", ("--bits", "w4a16", "--method", "quarot"), "Invalid value for '--method'"),
])
def test_cli_refusals_are_one_line_and_write_nothing(float_ckpt, quant_ckpt, tmp_path, which,
                                                     args, reason):
    out = tmp_path / "ct"
    res = invoke("export", float_ckpt if which == "float" else quant_ckpt, *args, "--out", out)
    assert res.exit_code != 0 and reason in res.stderr
    if "Invalid value" not in reason:
        assert len(res.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_refuses_a_quarot_checkpoint_before_loading(tmp_path, tok):
    model = quantize_model(_online_down_hadamard(tiny_model("llama")), parse_bits("w4a16"))
    src = save_quantized(model, tok, tmp_path / "quarot", checkpoint.lineage_entry("quantize"))
    res = invoke("export", src, "--out", tmp_path / "ct")
    assert res.exit_code == 1 and "rotates its input online" in res.stderr
    assert not (tmp_path / "ct").exists()


def test_cli_refuses_an_existing_output(quant_ckpt, tmp_path):
    (tmp_path / "ct").mkdir()
    res = invoke("export", quant_ckpt, "--out", tmp_path / "ct")
    assert res.exit_code == 1 and "already exists" in res.stderr


# ---- other readers: compressed-tensors' own decompressor, transformers ------------------------

@pytest.mark.parametrize("family,bits", CASES, ids=[f"{f}-{b}" for f, b in CASES])
def test_compressed_tensors_decompressor_reads_our_weights(tmp_path, tok, family, bits):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    model = quantized(family, bits)
    do_export(model, tok, tmp_path / "ct")
    q = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme(**q["config_groups"]["group_0"])
    compressor = BaseCompressor.get_value_from_registry(q["format"])
    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    for name, ql in quant_linears(model).items():
        local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
        assert torch.equal(compressor.decompress(local, scheme)["weight"],
                           ql.dequantize_weight()), name


DENSE_LOAD = "ignore:You passed `quantization_config`:UserWarning"  # we pass dequantize=True on purpose


@pytest.mark.filterwarnings(DENSE_LOAD)
@pytest.mark.parametrize("family,bits", [("llama", "w4a16g32"), ("qwen2", "w8a8"),
                                         ("llama", "w4a16-asym"), ("gemma3", "w4a16g16")])
def test_transformers_loads_the_export_with_the_same_logits(tmp_path, tok, family, bits):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = quantized(family, bits)
    do_export(model, tok, tmp_path / "ct")
    # transformers' compressed (default) path mis-shapes packed asymmetric zero points
    # (llm-compressor issue 1618); its dequantize path reads them right
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if "asym" in bits else {}
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", **kw).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, model(IDS).logits, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.filterwarnings(DENSE_LOAD)
@pytest.mark.parametrize("bits", ["w4a16g64", "w8a8"])
def test_smollm2_export_loads_in_transformers_with_our_weights(tmp_path, bits):
    """The real model: RTN (no clip search, to stay fast), export, transformers reads it back.

    Weights come back exactly; W4A16 logits match. With W8A8 both sides simulate dynamic per-token
    int8 activations but round ``x/s + z`` vs our ``round(x/s) + z`` (codes flip at ties, and
    SmolLM2's huge activations carry it on), so there the logits agree to within a fraction of
    what activation quantization itself changes, with the same top-1 everywhere.
    """
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    ck = checkpoint.load("smollm2-135m", device="cpu", dtype="fp32")
    quantize_model(ck.model, parse_bits(bits))
    report = export(ck, ExportConfig(), tmp_path / "ct")
    assert report["quantized_linears"] == 30 * 7 and report["ignore"] == ["lm_head"]
    dense = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ct", quantization_config=CompressedTensorsConfig(dequantize=True))
    theirs = dict(dense.named_modules())
    for name, q in quant_linears(ck.model).items():
        assert torch.equal(theirs[name].weight, q.dequantize_weight()), name
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()  # runs quantized
    ids = ck.tokenizer("The capital of France is Paris, and the capital of Italy is",
                       return_tensors="pt").input_ids
    with torch.no_grad():
        ours, hf_logits = ck.model(ids).logits, hf(ids).logits
    if bits == "w4a16g64":
        torch.testing.assert_close(hf_logits, ours, rtol=0, atol=1e-3)
        return
    for q in quant_linears(ck.model).values():
        q.act_spec = None
    with torch.no_grad():
        weight_only = ck.model(ids).logits
    assert torch.equal(hf_logits.argmax(-1), ours.argmax(-1))
    act_effect = (ours - weight_only).abs().mean()
    assert (hf_logits - ours).abs().mean() < 0.5 * act_effect

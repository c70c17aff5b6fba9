"""The quantized checkpoint format: save -> checkpoint.load gives bit-identical logits."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import editcomp.quant  # noqa: F401  (registers the loader, as any user of quantization does)
from editcomp import checkpoint
from editcomp.arch import get_adapter
from editcomp.errors import CheckpointError
from editcomp.quant.checkpoint_io import load_quantized, quantized_tensors, save_quantized
from editcomp.quant.hadamard import apply_hadamard
from editcomp.quant.kvcache import kv_settings
from editcomp.quant.runtime import QuantLinear, quant_linears, quantize_model
from editcomp.quant.spec import parse_bits
from editcomp.tiny import tiny_model, tiny_tokenizer

IDS = torch.tensor([[1, 17, 42, 99, 7, 300, 5, 11, 60, 3, 8, 250]])


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _hadamard_on_down(model):
    """QuaRot's online R4 on every down_proj: fuse H into the weight, rotate the input online."""
    HadamardInput = pytest.importorskip("editcomp.quant.transforms").HadamardInput
    for parts in get_adapter(model).layers():
        n = parts.down.in_features
        with torch.no_grad():
            parts.down.weight.copy_(apply_hadamard(parts.down.weight, n))
        parts.replace("down", HadamardInput(parts.down, n))
    return model


def _save(model, tok, out):
    return save_quantized(model, tok, out, checkpoint.lineage_entry("quantize", {"bits": "x"}))


CASES = [("llama", "w4a16", False), ("llama", "w4a16g32", False), ("qwen2", "w8a8", False),
         ("gemma3", "w4a16g16-asym", False), ("llama", "w4a4kv4", True),
         ("gemma3", "w4a4kv4", True)]


@pytest.mark.parametrize("family,bits,rotated", CASES, ids=[f"{f}-{b}" for f, b, _ in CASES])
def test_round_trip_gives_identical_logits(tmp_path, tok, family, bits, rotated):
    model = tiny_model(family)
    if rotated:
        _hadamard_on_down(model)
    quantize_model(model, parse_bits(bits), qk_hadamard=rotated)
    out = _save(model, tok, tmp_path / "q")
    ck = checkpoint.load(out, device="cpu", dtype="fp32")
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ck.model(IDS).logits)
    assert set(quant_linears(ck.model)) == set(quant_linears(model))
    assert kv_settings(ck.model) == kv_settings(model)
    if rotated:
        assert all(p.down.hadamard_size == 128 for p in get_adapter(ck.model).layers())
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "editcomp" and qcfg["bits"] == bits
    assert parse_bits(qcfg["bits"]).name == bits
    if family == "qwen2":  # q/k/v biases are stored and reloaded
        assert "model.layers.0.self_attn.q_proj.bias" in load_file(str(out / "model.safetensors"))


def test_bf16_load_matches_the_in_memory_model_in_bf16(tmp_path, tok):
    model = quantize_model(tiny_model("qwen2"), parse_bits("w4a8"))
    out = _save(model, tok, tmp_path / "q")
    ck = checkpoint.load(out, device="cpu", dtype="bf16")
    model.to(torch.bfloat16)
    with torch.no_grad():
        a, b = model(IDS).logits, ck.model(IDS).logits
    assert b.dtype == torch.bfloat16 and torch.equal(a, b)
    assert all(q.scales.dtype == torch.float32 for q in quant_linears(ck.model).values())


def test_file_holds_packed_codes_at_an_eighth_of_fp32(tmp_path, tok):
    model = quantize_model(tiny_model("mistral"), parse_bits("w4a16"))
    shapes = {n: (q.out_features, q.in_features) for n, q in quant_linears(model).items()}
    tensors = load_file(str(_save(model, tok, tmp_path / "q") / "model.safetensors"))
    fp32_bytes = quant_bytes = 0
    for name, (o, i) in shapes.items():
        assert f"{name}.weight" not in tensors and f"{name}.zeros" not in tensors  # symmetric
        qw, sc = tensors[f"{name}.qweight"], tensors[f"{name}.scales"]
        assert qw.dtype == torch.uint8 and qw.numel() == o * i // 2
        assert sc.dtype == torch.float32 and sc.shape == (o, 1)
        fp32_bytes += 4 * o * i
        quant_bytes += qw.numel() + 4 * sc.numel()
    assert quant_bytes / fp32_bytes < 0.15  # 1/8 plus one fp32 scale per row of 64 inputs
    assert "lm_head.weight" in tensors and tensors["lm_head.weight"].dtype == torch.float32


def test_quantization_config_describes_every_module(tok):
    model = tiny_model("llama")
    _hadamard_on_down(model)
    quantize_model(model, parse_bits("w4a4kv4"), qk_hadamard=True)
    tensors, qcfg = quantized_tensors(model)
    assert qcfg["format_version"] == 1 and qcfg["qk_hadamard"] is True
    assert qcfg["weight"]["granularity"] == "channel" and qcfg["act"]["granularity"] == "token"
    assert qcfg["kv"]["group_size"] == 16
    down = qcfg["modules"]["model.layers.0.mlp.down_proj"]
    assert down == {"kind": "uniform", "shape": [64, 128], "bias": False, "hadamard_size": 128}
    assert set(tensors) >= {f"{n}.qweight" for n in qcfg["modules"]}
    json.dumps(qcfg)


def test_missing_or_extra_tensor_is_a_checkpoint_error_naming_it(tmp_path, tok):
    out = _save(quantize_model(tiny_model("llama"), parse_bits("w4a16")), tok, tmp_path / "q")
    file = out / "model.safetensors"
    tensors = load_file(str(file))
    gone = "model.layers.1.mlp.up_proj.scales"
    save_file({k: v for k, v in tensors.items() if k != gone}, str(file), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=gone) as e:
        checkpoint.load(out, device="cpu")
    assert str(file) in str(e.value)
    save_file(dict(tensors, stray=torch.zeros(2)), str(file), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="unexpected tensor.*stray"):
        checkpoint.load(out, device="cpu")


def test_bad_quantization_config_is_refused(tmp_path, tok):
    out = _save(quantize_model(tiny_model("llama"), parse_bits("w4a16")), tok, tmp_path / "q")
    raw = json.loads((out / "config.json").read_text())
    raw["quantization_config"]["format_version"] = 99
    with pytest.raises(CheckpointError, match="version 99"):
        load_quantized(out, raw, "cpu", torch.float32)
    raw["quantization_config"]["format_version"] = 1
    raw["quantization_config"]["modules"]["model.layers.0.mlp.up_proj"]["kind"] = "magic"
    with pytest.raises(CheckpointError, match="magic"):
        load_quantized(out, raw, "cpu", torch.float32)


def test_loader_is_registered_by_the_quant_package():
    assert checkpoint.QUANTIZED_LOADERS["editcomp"] is load_quantized
    assert QuantLinear.kind == "uniform"


def test_quantized_lm_head_and_generation_survive_the_round_trip(tmp_path, tok):
    """lm_head is only quantized on request; tied to the embedding, the embedding stays float."""
    model = quantize_model(tiny_model("llama"), parse_bits("w8a8kv8"), skip=())
    assert isinstance(get_adapter(model).lm_head, QuantLinear)
    ck = checkpoint.load(_save(model, tok, tmp_path / "q"), device="cpu")
    assert isinstance(get_adapter(ck.model).lm_head, QuantLinear)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ck.model(IDS).logits)
    kw = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(IDS[:, :5], **kw), ck.model.generate(IDS[:, :5], **kw))

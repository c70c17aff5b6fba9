"""KV-cache quantization and the Q/K Hadamard through transformers' AttentionInterface."""

import copy

import pytest
import torch

from editcomp.quant.kvcache import (ATTN_IMPLEMENTATION, disable_kv_quant, enable_kv_quant,
                                   kv_settings)
from editcomp.quant.spec import QuantSpec, parse_bits
from editcomp.tiny import tiny_model

IDS = torch.tensor([[1, 17, 42, 99, 7, 300, 5, 11, 60, 3, 8, 250],
                    [1, 8, 250, 31, 77, 2, 19, 400, 6, 9, 44, 123]])  # > gemma3's window of 8


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_qk_hadamard_alone_cancels(family):
    model = tiny_model(family)
    with torch.no_grad():
        ref = model(IDS).logits
        enable_kv_quant(model, None, qk_hadamard=True)
        assert model.config._attn_implementation == ATTN_IMPLEMENTATION
        torch.testing.assert_close(model(IDS).logits, ref, rtol=1e-4, atol=1e-4)
        disable_kv_quant(model)
        assert kv_settings(model) is None and torch.equal(model(IDS).logits, ref)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_kv8_changes_logits_a_little_and_kv4_more(family):
    model = tiny_model(family)
    with torch.no_grad():
        ref = model(IDS).logits
        err = {}
        for bits in (8, 4):
            enable_kv_quant(model, parse_bits(f"w4a16kv{bits}").kv, qk_hadamard=True)
            err[bits] = _rel(model(IDS).logits, ref)
    assert 0 < err[8] < 2e-2
    assert err[4] > 4 * err[8]
    s = kv_settings(model)
    assert s.kv.group_size == 16 and s.kv.granularity == "head" and s.qk_hadamard


def test_quantized_cache_decoding_matches_full_forward():
    """Per-token quantization makes re-quantizing the cached K/V equal to storing them quantized."""
    model = enable_kv_quant(tiny_model("llama"), QuantSpec(4, "head", 16, symmetric=False))
    with torch.no_grad():
        full = model(IDS).logits
        out = model(IDS[:, :7], use_cache=True)
        steps = [out.logits]
        past = out.past_key_values
        for t in range(7, IDS.shape[1]):
            out = model(IDS[:, t:t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


def test_kv_quant_passes_gradients_and_survives_deepcopy():
    model = enable_kv_quant(tiny_model("llama"), parse_bits("w4a4kv4").kv)
    clone = copy.deepcopy(model)
    assert kv_settings(clone) == kv_settings(model)
    clone.train()
    clone(IDS).logits.pow(2).mean().backward()
    grad = clone.model.layers[0].self_attn.k_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0

"""Adapters find the right modules and state the right norm convention for every family."""

import pytest
import torch

from editcomp.arch import SUPPORTED, get_adapter
from editcomp.errors import CheckpointError
from editcomp.tiny import FAMILIES, tiny_model

IDS = torch.tensor([[1, 17, 42, 99, 7, 300, 5, 11]])


@pytest.mark.parametrize("family", FAMILIES)
def test_parts_have_the_shapes_of_their_roles(family):
    model = tiny_model(family)
    a = get_adapter(model)
    d, f = a.hidden_size, a.intermediate_size
    assert a.num_layers == 2 and len(a.layers()) == 2
    for p in a.layers():
        assert p.q.in_features == p.k.in_features == p.v.in_features == d
        assert p.q.out_features == a.num_heads * a.head_dim
        assert p.k.out_features == p.v.out_features == a.num_kv_heads * a.head_dim
        assert p.o.in_features == a.num_heads * a.head_dim and p.o.out_features == d
        assert p.gate.out_features == p.up.out_features == f
        assert p.down.in_features == f and p.down.out_features == d
        assert p.attn_in_norm.weight.shape == p.mlp_in_norm.weight.shape == (d,)
    assert a.lm_head.weight.shape == (a.vocab_size, d)
    assert (family == "gemma3") == (a.residual_rotation_blocker is not None)


@pytest.mark.parametrize("family", FAMILIES)
def test_folding_norm_gains_into_readers_preserves_logits(family):
    """If norm_offset were wrong for a family, moving the gain into q/k/v and gate/up and
    setting it to 1 would change the output."""
    model = tiny_model(family)
    with torch.no_grad():
        ref = model(IDS).logits
        a = get_adapter(model)
        for p in a.layers():
            for norm, readers in ((p.attn_in_norm, (p.q, p.k, p.v)),
                                  (p.mlp_in_norm, (p.gate, p.up))):
                g = a.norm_gain(norm)
                for lin in readers:
                    lin.weight.mul_(g)
                a.set_norm_gain(norm, torch.ones_like(g))
        out = model(IDS).logits
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5 * ref.abs().max())
    assert all(torch.allclose(a.norm_gain(p.attn_in_norm), torch.tensor(1.0)) for p in a.layers())


def test_unsupported_family_lists_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(CheckpointError) as e:
        get_adapter(model)
    assert "'gpt2'" in str(e.value) and SUPPORTED in str(e.value)

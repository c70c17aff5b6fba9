"""KV-cache quantization and the online Q/K Hadamard (OSTQuant's R3), via transformers'
``AttentionInterface`` instead of copies of each family's attention code.

The models compute Q and K (after RoPE and any q/k norm), append K and V to their cache and then
call the registered attention function. Ours, ``editcomp_attention``, reads the settings stored on
the attention module (``module.editcomp_kv``), rotates Q and K by a Hadamard over ``head_dim``
(``(Q H)(K H)^T = Q K^T``, so alone it changes nothing but spreads K's outlier channels before
quantization), fake-quantizes K and V per token and head (the QuaRot/OSTQuant setting: what would
be stored is K after RoPE and Hadamard), and hands over to transformers' SDPA function.

A simulation: the cache itself keeps full-precision K and V and we re-quantize all of them at
every call. Quantization is per token, so this gives exactly the outputs of a cache that stores
the quantized values, without a cache class per model family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from editcomp.quant.hadamard import apply_hadamard
from editcomp.quant.ops import fake_quant
from editcomp.quant.spec import QuantSpec

ATTN_IMPLEMENTATION = "editcomp"
BASE_IMPLEMENTATION = "sdpa"
_SETTINGS_ATTR = "editcomp_kv"


@dataclass(frozen=True)
class KVQuantSettings:
    """What ``editcomp_attention`` does in one attention module.

    ``kv`` is ``None`` for a 16-bit cache (the Hadamard may still be on, e.g. to test that it
    cancels); its ``group_size`` is the head dim (one scale per token and head).
    """

    kv: QuantSpec | None
    qk_hadamard: bool = True


def editcomp_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """``AttentionInterface`` function: Q/K Hadamard, K/V fake-quant, then transformers' SDPA.

    ``query``/``key``/``value`` are ``[batch, heads, seq, head_dim]``, after RoPE. Modules without
    settings pass straight through, so one registration serves every model.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    s: KVQuantSettings | None = getattr(module, _SETTINGS_ATTR, None)
    if s is not None:
        if s.qk_hadamard:
            n = query.shape[-1]
            query, key = apply_hadamard(query, n), apply_hadamard(key, n)
        if s.kv is not None:
            key, value = fake_quant(key, s.kv), fake_quant(value, s.kv)
    return ALL_ATTENTION_FUNCTIONS[BASE_IMPLEMENTATION](module, query, key, value, attention_mask,
                                                        *args, **kwargs)


def register() -> None:
    """Register ``editcomp`` with transformers (attention and its mask, the same as SDPA's).

    Idempotent. Without the mask entry transformers would build no mask at all for an unknown
    implementation (breaking causal/sliding-window masking), so both are needed.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, editcomp_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION,
                                    ALL_MASK_ATTENTION_FUNCTIONS[BASE_IMPLEMENTATION])


def _set_implementation(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # a bare config-driven module
        model.config._attn_implementation = name


def enable_kv_quant(model, kv_spec: QuantSpec | None, qk_hadamard: bool = True):
    """Quantize ``model``'s KV cache with ``kv_spec`` (``None``: 16 bit) and/or turn on the Q/K
    Hadamard, in place; returns the model. Both off restores plain SDPA.

    A grouped spec without ``group_size`` (as ``parse_bits`` gives) gets ``group_size = head_dim``.
    """
    from editcomp.arch import get_adapter

    adapter = get_adapter(model)
    if kv_spec is not None and kv_spec.grouped and kv_spec.group_size is None:
        kv_spec = kv_spec.replace(group_size=adapter.head_dim)
    if kv_spec is None and not qk_hadamard:
        return disable_kv_quant(model)
    if qk_hadamard:
        apply_hadamard(torch.zeros(1, adapter.head_dim), adapter.head_dim)  # fail early on size
    settings = KVQuantSettings(kv_spec, bool(qk_hadamard))
    for parts in adapter.layers():
        setattr(parts.attn, _SETTINGS_ATTR, settings)
    register()
    _set_implementation(model, ATTN_IMPLEMENTATION)
    return model


def disable_kv_quant(model):
    """Remove the settings and go back to transformers' SDPA; returns the model."""
    from editcomp.arch import get_adapter

    for parts in get_adapter(model).layers():
        if hasattr(parts.attn, _SETTINGS_ATTR):
            delattr(parts.attn, _SETTINGS_ATTR)
    if getattr(model.config, "_attn_implementation", None) == ATTN_IMPLEMENTATION:
        _set_implementation(model, BASE_IMPLEMENTATION)
    return model


def kv_settings(model) -> KVQuantSettings | None:
    """The model's KV settings (the same on every layer), or ``None`` when off."""
    from editcomp.arch import get_adapter

    layers = get_adapter(model).layers()
    return getattr(layers[0].attn, _SETTINGS_ATTR, None) if layers else None

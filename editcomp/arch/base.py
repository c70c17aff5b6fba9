"""The one interface every method uses to find a model's parts.

Methods never write ``model.model.layers[i].mlp.down_proj``: they ask an adapter for
``LayerParts`` and work on those. A family adapter is a small subclass that names its modules
and states the few numerical facts a transform must respect (how its norms store their gain,
whether extra norms sit on the residual branch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LayerParts:
    """The modules of one decoder layer, by role.

    ``attn_out_norm`` / ``mlp_out_norm`` are norms applied to a branch's output before it is
    added to the residual stream (Gemma3's post-norms); ``None`` for Llama-style layers.
    """

    index: int
    module: nn.Module
    attn_in_norm: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    mlp_in_norm: nn.Module
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear
    attn: nn.Module
    mlp: nn.Module
    attn_out_norm: nn.Module | None = None
    mlp_out_norm: nn.Module | None = None
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None

    def linears(self) -> dict[str, nn.Linear]:
        """Role name -> linear, in forward order."""
        return {"q": self.q, "k": self.k, "v": self.v, "o": self.o,
                "gate": self.gate, "up": self.up, "down": self.down}

    def replace(self, role: str, new: nn.Module) -> None:
        """Put ``new`` where the module of ``role`` (e.g. ``"down"``) sits in the layer.

        The parent and attribute are found by identity inside ``self.module``, so methods can
        swap a module (e.g. wrap a linear) without knowing the family's module names.
        """
        old = getattr(self, role)
        for parent in self.module.modules():
            for name, child in parent.named_children():
                if child is old:
                    setattr(parent, name, new)
                    setattr(self, role, new)
                    return
        raise ValueError(f"layer {self.index}: module of role {role!r} not found in the layer")


class ArchAdapter:
    """Base adapter for decoder-only transformers laid out like Llama.

    Subclasses set ``family``, ``model_types`` and override the few accessors that differ.
    """

    family: str = ""
    model_types: tuple[str, ...] = ()
    #: RMSNorm computes ``x_hat * (norm_offset + weight)``: 0 for Llama, 1 for Gemma.
    norm_offset: float = 0.0
    #: Why a single residual rotation cannot be fused into this family, or None if it can.
    residual_rotation_blocker: str | None = None

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # -- whole-model parts ---------------------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        return self.model.model

    @property
    def embed(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    @property
    def final_norm(self) -> nn.Module:
        return self.decoder.norm

    @property
    def num_layers(self) -> int:
        return len(self.decoder.layers)

    def layer(self, i: int) -> LayerParts:
        block = self.decoder.layers[i]
        attn, mlp = block.self_attn, block.mlp
        return LayerParts(
            index=i, module=block, attn=attn, mlp=mlp,
            q=attn.q_proj, k=attn.k_proj, v=attn.v_proj, o=attn.o_proj,
            gate=mlp.gate_proj, up=mlp.up_proj, down=mlp.down_proj,
            q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None),
            **self.layer_norms(block),
        )

    def layer_norms(self, block: nn.Module) -> dict[str, nn.Module]:
        """The block's residual-branch norms as ``LayerParts`` fields: the pre-norm layout
        (one norm before attention, one before the MLP). Families with more override this."""
        return {"attn_in_norm": block.input_layernorm,
                "mlp_in_norm": block.post_attention_layernorm}

    def layers(self) -> list[LayerParts]:
        return [self.layer(i) for i in range(self.num_layers)]

    # -- shapes ---------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def intermediate_size(self) -> int:
        return self.config.intermediate_size

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.hidden_size // self.num_heads

    @property
    def tied_embeddings(self) -> bool:
        return self.lm_head.weight.data_ptr() == self.embed.weight.data_ptr()

    @property
    def vocab_size(self) -> int:
        return self.embed.weight.shape[0]

    # -- norms ----------------------------------------------------------------------------
    def norm_gain(self, norm: nn.Module) -> torch.Tensor:
        """The effective per-channel gain the norm multiplies by, in at least float32
        (``1 + w`` in bf16 would round away most of a small Gemma ``w``)."""
        w = norm.weight.detach()
        return w.to(torch.promote_types(w.dtype, torch.float32)) + self.norm_offset

    def set_norm_gain(self, norm: nn.Module, gain: torch.Tensor) -> None:
        """Store ``gain``; the offset is removed before casting to the weight's dtype."""
        with torch.no_grad():
            g = gain.to(torch.promote_types(gain.dtype, torch.float32))
            norm.weight.copy_((g - self.norm_offset).to(norm.weight.dtype))

    def describe(self) -> dict:
        """A short summary for reports."""
        return {"family": self.family, "model_type": self.config.model_type,
                "layers": self.num_layers, "hidden": self.hidden_size,
                "intermediate": self.intermediate_size, "heads": self.num_heads,
                "kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "vocab": self.vocab_size, "tied_embeddings": self.tied_embeddings}

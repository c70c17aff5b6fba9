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
            attn_in_norm=block.input_layernorm,
            q=attn.q_proj, k=attn.k_proj, v=attn.v_proj, o=attn.o_proj,
            mlp_in_norm=block.post_attention_layernorm,
            gate=mlp.gate_proj, up=mlp.up_proj, down=mlp.down_proj,
            q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None),
        )

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
        """The effective per-channel gain the norm multiplies by."""
        return norm.weight.detach() + self.norm_offset

    def set_norm_gain(self, norm: nn.Module, gain: torch.Tensor) -> None:
        with torch.no_grad():
            norm.weight.copy_(gain.to(norm.weight.dtype) - self.norm_offset)

    def describe(self) -> dict:
        """A short summary for reports."""
        return {"family": self.family, "model_type": self.config.model_type,
                "layers": self.num_layers, "hidden": self.hidden_size,
                "intermediate": self.intermediate_size, "heads": self.num_heads,
                "kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "vocab": self.vocab_size, "tied_embeddings": self.tied_embeddings}

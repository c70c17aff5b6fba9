"""Gemma 3 (text): RMSNorm gains stored as ``w`` with effect ``1 + w``, embeddings scaled by
sqrt(hidden), per-head q/k norms, and extra norms on each branch's output before the residual
add (``post_attention_layernorm``, ``post_feedforward_layernorm``)."""

from editcomp.arch.base import ArchAdapter


class Gemma3Adapter(ArchAdapter):
    family = "gemma3"
    model_types = ("gemma3_text",)
    norm_offset = 1.0
    residual_rotation_blocker = (
        "Gemma3 normalizes each branch's output (post_attention_layernorm, "
        "post_feedforward_layernorm) before adding it to the residual stream; an RMSNorm's "
        "per-channel gain does not commute with a rotation of its input, so one residual "
        "rotation cannot be fused into the weights"
    )

    def layer_norms(self, block) -> dict:
        """Sandwich norms: before and after each branch."""
        return {"attn_in_norm": block.input_layernorm,
                "attn_out_norm": block.post_attention_layernorm,
                "mlp_in_norm": block.pre_feedforward_layernorm,
                "mlp_out_norm": block.post_feedforward_layernorm}

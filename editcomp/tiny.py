"""Tiny random models of every supported family, built from a config in memory.

Tests and the notebooks' smoke runs use them: seconds to build, no download, and the same
module layout as the real models, so every adapter path is exercised.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig,
                          Qwen2Config, Qwen3Config)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")

_COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_config(family: str, **overrides):
    """A config with the family's real structure at toy width (hidden 64, 2 layers)."""
    kw = dict(_COMMON, **overrides)
    if family == "llama":
        return LlamaConfig(tie_word_embeddings=True, **kw)
    if family == "mistral":
        return MistralConfig(tie_word_embeddings=False, sliding_window=None, **kw)
    if family == "qwen2":
        return Qwen2Config(tie_word_embeddings=True, **kw)
    if family == "qwen3":
        return Qwen3Config(tie_word_embeddings=True, head_dim=16, **kw)
    if family == "gemma3":
        return Gemma3TextConfig(tie_word_embeddings=True, head_dim=16, query_pre_attn_scalar=16,
                                sliding_window=8,
                                layer_types=["sliding_attention", "full_attention"], **kw)
    raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(FAMILIES)}")


def tiny_model(family: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    """A randomly initialised model in eval mode; norm gains are randomised too, so
    transforms that move them are actually tested."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(torch.rand_like(p) * 0.5 + 0.75 - (1.0 if family == "gemma3" else 0.0))
            elif p.ndim == 1:  # biases (qwen2)
                p.normal_(0, 0.02)
    return model.eval()


_CORPUS = (
    "The capital of France is Paris. The Eiffel Tower is located in the city of Paris. "
    "Die Hauptstadt von Deutschland ist Berlin. La capitale de l'Italie est Rome. "
    "La capital de España es Madrid. 日本的首都是东京。 The quick brown fox jumps over the lazy dog. "
    "Language models store facts in the weights of their feed-forward layers. "
    "Quantization maps weights and activations to a few bits; rotations spread outliers. "
)


def tiny_tokenizer(vocab_size: int = 512, texts: Iterable[str] | None = None,
                   unk_token: str | None = None):
    """A real byte-level BPE tokenizer trained in memory on ``texts`` (default: a few
    multilingual sentences; the test suite passes WikiText lines for realistic pieces).

    Byte-level, so any text (Chinese included) tokenizes; BOS is prepended like Llama's.
    Special tokens: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2 (``tiny_config``'s ids), then
    ``unk_token`` (3) if given -- never produced by a byte-level model, but it shifts every learned
    token's id, so tests that pinned their numbers with it keep it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"] + ([unk_token] if unk_token else [])
    tok = Tokenizer(models.BPE(unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    texts = [t for t in texts or () if t.strip()] or [_CORPUS] * 4
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token=unk_token,
                                   model_max_length=1 << 30)

"""Shared test fixtures: tiny random models and a real in-memory tokenizer (no downloads).

Each model family has its own clearly named builder function and fixture; add new families below.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_FACTS = REPO / "examples" / "facts.jsonl"


def find_shared_data() -> Path | None:
    """``../shared/data`` next to the repository (or ``shared/data`` inside it), if present."""
    for cand in (REPO.parent / "shared" / "data", REPO / "shared" / "data"):
        if cand.is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real data sets (WikiText-2, BMIKE-53); tests that need them skip without them."""
    path = find_shared_data()
    if path is None:
        pytest.skip("../shared/data is not available")
    return path


# ------------------------------------------------------------------------------ tiny tokenizer


def build_tiny_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained in memory on WikiText lines and the example facts.

    Byte-level, so every string (zh included) tokenizes; adds ``<s>`` (BOS) by default like Llama.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts: list[str] = []
    data = find_shared_data()
    if data is not None and (data / "wikitext-2" / "valid.txt").is_file():
        lines = (data / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").splitlines()
        texts += [line for line in lines[:600] if line.strip()]
    if EXAMPLE_FACTS.is_file():
        for line in EXAMPLE_FACTS.read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts += _strings_in(json.loads(line))
    if not texts:
        texts = ["The quick brown fox jumps over the lazy dog ."] * 10

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", model_max_length=1 << 30)


def _strings_in(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings_in(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings_in(v)]
    return []


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


# ------------------------------------------------------------------------------ tiny Llama


def build_tiny_llama(tokenizer, seed: int = 0):
    """A 2-layer random Llama (hidden 64, GQA 4/2 heads) sized to ``tokenizer``; eval mode, fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer):
    """Session-scoped: tests that change weights must work on a ``copy.deepcopy``."""
    return build_tiny_llama(tiny_tokenizer)

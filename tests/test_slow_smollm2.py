"""End-to-end checks on the real default model (pulled on first use). Marked slow."""

import pytest
import torch

from editcomp import checkpoint
from editcomp.arch import get_adapter
from editcomp.data import token_windows
from editcomp.eval import perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return checkpoint.load("smollm2-135m", device="cpu", dtype="fp32")


def test_adapter_sees_the_published_shape(smollm2):
    a = get_adapter(smollm2.model)
    assert (a.num_layers, a.hidden_size, a.intermediate_size) == (30, 576, 1536)
    assert (a.num_heads, a.num_kv_heads, a.head_dim) == (9, 3, 64)
    assert a.tied_embeddings and a.vocab_size == 49152
    assert smollm2.history[0]["op"] == "pull"


def test_wikitext_perplexity_matches_the_measured_value(smollm2, shared_data):
    """4 windows x 512 tokens of WikiText-2 test: 26.64 measured once (fp32, CPU)."""
    windows = token_windows(smollm2.tokenizer, shared_data / "wikitext-2" / "test.txt", 512, 4)
    assert perplexity(smollm2.model, windows, progress=False)["ppl"] == pytest.approx(26.64, rel=2e-3)


def test_saved_copy_gives_identical_logits(smollm2, tmp_path):
    out = checkpoint.save(smollm2.model, smollm2.tokenizer, tmp_path / "copy",
                          checkpoint.lineage_entry("copy", parent=smollm2), parent=smollm2)
    copy = checkpoint.load(out, device="cpu", dtype="fp32")
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(smollm2.model(ids).logits, copy.model(ids).logits)
    assert copy.weights_sha256 == smollm2.weights_sha256
    assert [e["op"] for e in copy.history] == ["pull", "copy"]


def test_greedy_answer_is_the_known_one(smollm2):
    tok = smollm2.tokenizer
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = smollm2.model.generate(ids, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]).strip().startswith("Paris")

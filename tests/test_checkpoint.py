"""Checkpoints: identical logits after a round trip, atomic writes, lineage, clear refusals."""

import json
import os

import pytest
import torch

from editcomp import checkpoint
from editcomp.errors import CheckpointError, EditcompError
from editcomp.tiny import FAMILIES, tiny_model, tiny_tokenizer

IDS = torch.tensor([[1, 17, 42, 99, 7, 300, 5, 11]])


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _save(model, tok, out, parent=None, **kw):
    return checkpoint.save(model, tok, out, checkpoint.lineage_entry("test", {"k": 1}, parent=parent),
                           parent=parent, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_then_load_gives_bit_identical_logits(tmp_path, tok, family):
    model = tiny_model(family)
    out = _save(model, tok, tmp_path / "ck")
    ck = checkpoint.load(out, device="cpu", dtype="fp32")
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ck.model(IDS).logits)
    assert ck.tokenizer("The capital").input_ids == tok("The capital").input_ids
    if model.config.tie_word_embeddings:
        assert ck.model.lm_head.weight.data_ptr() == ck.model.model.embed_tokens.weight.data_ptr()


def test_lineage_chains_input_and_output_hashes(tmp_path, tok):
    first = checkpoint.load(_save(tiny_model("llama"), tok, tmp_path / "a"), device="cpu")
    model = first.model
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    second = checkpoint.load(_save(model, tok, tmp_path / "b", parent=first), device="cpu")
    h = second.history
    assert [e["op"] for e in h] == ["test", "test"]
    assert h[1]["input"]["weights_sha256"] == h[0]["output"]["weights_sha256"]
    assert h[1]["output"]["weights_sha256"] == second.weights_sha256 != first.weights_sha256
    assert h[1]["config"] == {"k": 1}


def test_input_checkpoint_is_never_modified(tmp_path, tok):
    src = checkpoint.load(_save(tiny_model("llama"), tok, tmp_path / "src"), device="cpu")
    before = {f: (tmp_path / "src" / f).read_bytes() for f in os.listdir(tmp_path / "src")}
    with torch.no_grad():
        src.model.lm_head.weight.zero_()
    _save(src.model, tok, tmp_path / "derived", parent=src)
    with pytest.raises(EditcompError, match="input checkpoint"):
        _save(src.model, tok, tmp_path / "src", parent=src, force=True)
    after = {f: (tmp_path / "src" / f).read_bytes() for f in os.listdir(tmp_path / "src")}
    assert before == after


def test_existing_output_is_refused_unless_forced(tmp_path, tok):
    out = _save(tiny_model("llama"), tok, tmp_path / "ck")
    with pytest.raises(EditcompError, match="already exists"):
        _save(tiny_model("llama", seed=1), tok, out)
    _save(tiny_model("llama", seed=1), tok, out, force=True)
    ck = checkpoint.load(out, device="cpu")
    with torch.no_grad():
        assert torch.equal(ck.model(IDS).logits, tiny_model("llama", seed=1)(IDS).logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_crash_mid_save_leaves_no_output(tmp_path, tok, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt  # as if Ctrl-C arrived while writing the weights
    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        _save(tiny_model("llama"), tok, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


def test_truncated_safetensors_names_the_file(tmp_path, tok):
    out = _save(tiny_model("llama"), tok, tmp_path / "ck")
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated"):
        checkpoint.load(out, device="cpu")
    weights.write_bytes(b"\x00\x01")
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt"):
        checkpoint.load(out, device="cpu")


def test_pickle_weights_are_refused(tmp_path, tok):
    out = _save(tiny_model("llama"), tok, tmp_path / "ck")
    (out / "model.safetensors").rename(out / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: pickle weights are refused"):
        checkpoint.load(out, device="cpu")


def test_missing_pieces_are_named(tmp_path, tok):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        checkpoint.load(tmp_path / "nope", device="cpu")
    out = _save(tiny_model("llama"), tok, tmp_path / "ck")
    (out / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        checkpoint.load(out, device="cpu")
    (out / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        checkpoint.load(out, device="cpu")


def test_unsupported_family_fails_before_reading_weights(tmp_path, tok):
    out = _save(tiny_model("llama"), tok, tmp_path / "ck")
    cfg = json.loads((out / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "model.safetensors").write_bytes(b"")  # would be 'corrupt' if it were read first
    with pytest.raises(CheckpointError, match="unsupported model family 'gpt2'; supported: llama"):
        checkpoint.load(out, device="cpu")


def test_sharded_checkpoints_load(tmp_path, tok):
    model = tiny_model("mistral")
    model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    tok.save_pretrained(tmp_path / "hf")
    assert len(checkpoint.weight_files(tmp_path / "hf")) > 1
    ck = checkpoint.load(tmp_path / "hf", device="cpu")
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ck.model(IDS).logits)

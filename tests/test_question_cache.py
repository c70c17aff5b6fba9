"""The question cache: a cached pool is the pool sampling gives and the next edit reads it; what
the pool depends on is its key; a damaged file is sampled again; the CLI's edit is the same
either way."""

import json
from dataclasses import replace

import pytest
import torch

from editcomp import checkpoint
from editcomp.edit import LAFNConfig
from editcomp.edit.unrelated import sampled_questions
from editcomp.edit.question_cache import cached_questions, questions_key

from conftest import EXAMPLE_FACTS, run_cli

CONFIG = LAFNConfig(batch_questions=3, kl_continuation=2)


@pytest.fixture
def written_questions(monkeypatch):
    """The model "samples" three fixed questions per language (a random tiny model writes few
    lines that end in a question mark); ``sampled_questions`` still continues them greedily."""
    def sample(model, tokenizer, lang, n, seed=0):
        return [f"Where is thing {k} in {lang}?" for k in range(n)]
    monkeypatch.setattr("editcomp.edit.unrelated.sample_questions", sample)


def no_sampling(*args, **kwargs):
    raise AssertionError("sampled although the pool was cached")


def test_the_cached_pool_is_the_sampled_pool_and_the_next_call_reads_it(
        tiny_llama, tiny_tokenizer, tmp_path, monkeypatch, written_questions):
    fresh = sampled_questions(tiny_llama, tiny_tokenizer, ["en", "de"], CONFIG)
    assert len(fresh.texts) == 6 and all(len(p) > e + 1 for p, e in zip(fresh.ids, fresh.ends))
    assert cached_questions(tiny_llama, tiny_tokenizer, "w1", ["en", "de"], CONFIG, tmp_path) == fresh
    assert len(list(tmp_path.glob("*.json"))) == 1 and not list(tmp_path.glob("*.tmp"))
    monkeypatch.setattr("editcomp.edit.question_cache.sampled_questions", no_sampling)
    assert cached_questions(tiny_llama, tiny_tokenizer, "w1", ["en", "de"], CONFIG, tmp_path) == fresh


def test_the_key_changes_with_everything_the_pool_depends_on():
    cpu = torch.device("cpu")
    key = questions_key("w1", ["en", "de"], CONFIG, cpu, torch.float32)
    assert key == questions_key("w1", ["en", "de", "en"], CONFIG, "cpu", torch.float32)
    others = [questions_key("w2", ["en", "de"], CONFIG, cpu, torch.float32),
              questions_key("w1", ["en", "fr"], CONFIG, cpu, torch.float32),
              questions_key("w1", ["de", "en"], CONFIG, cpu, torch.float32),  # rows in that order
              questions_key("w1", ["en", "de"], replace(CONFIG, batch_questions=4), cpu, torch.float32),
              questions_key("w1", ["en", "de"], replace(CONFIG, kl_continuation=3), cpu, torch.float32),
              questions_key("w1", ["en", "de"], CONFIG, "cuda", torch.float32),
              questions_key("w1", ["en", "de"], CONFIG, cpu, torch.bfloat16)]
    assert len({key, *others}) == 1 + len(others)
    # a fact edited alone reads shorter continuations than facts edited together by default
    unset = replace(CONFIG, kl_continuation=None)
    assert questions_key("w1", ["en"], unset, cpu, torch.float32, alone=True) != questions_key(
        "w1", ["en"], unset, cpu, torch.float32)
    assert key == questions_key("w1", ["en", "de"], CONFIG, cpu, torch.float32, alone=True)
    # what the edit does with the pool is not part of it
    assert key == questions_key("w1", ["en", "de"], replace(CONFIG, answer_preserve=3.0, steps=5),
                                cpu, torch.float32)


@pytest.mark.parametrize("damage", ["truncated", "ends out of range", "lists differ"])
def test_a_damaged_pool_is_sampled_again_and_replaced(tiny_llama, tiny_tokenizer, tmp_path,
                                                      written_questions, damage):
    fresh = cached_questions(tiny_llama, tiny_tokenizer, "w1", ["en"], CONFIG, tmp_path)
    file = next(tmp_path.glob("*.json"))
    data = json.loads(file.read_text())
    if damage == "truncated":
        file.write_text(file.read_text()[:40])
    else:
        if damage == "ends out of range":
            data["ends"][0] = 10_000
        else:
            data["texts"].pop()
        file.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="not a readable question pool"):
        again = cached_questions(tiny_llama, tiny_tokenizer, "w1", ["en"], CONFIG, tmp_path)
    assert again == fresh
    assert json.loads(file.read_text()) == json.loads(json.dumps(
        {"texts": fresh.texts, "ids": fresh.ids, "ends": fresh.ends, "langs": fresh.langs,
         "row_langs": fresh.row_langs, "continuation": 2}))


def test_a_cache_that_cannot_be_written_warns_and_still_gives_the_pool(
        tiny_llama, tiny_tokenizer, tmp_path, written_questions):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    with pytest.warns(UserWarning, match="could not keep the question pool"):
        pool = cached_questions(tiny_llama, tiny_tokenizer, "w1", ["en"], CONFIG, blocked)
    assert pool == sampled_questions(tiny_llama, tiny_tokenizer, ["en"], CONFIG)
    assert blocked.read_text() == "not a directory"


def test_a_one_fact_edit_reads_the_pool_of_its_checkpoint_and_edits_the_same(
        tiny_ckpt, tmp_path, monkeypatch, written_questions, question_cache_dir):
    args = ["edit", EXAMPLE_FACTS, "--model", tiny_ckpt, "--langs", "en,de", "--limit", "1",
            "--offset", "1", "--steps", "3"]
    before = checkpoint.weights_sha256(tiny_ckpt)
    assert run_cli(*args, "--out", tmp_path / "uncached", "--no-question-cache").exit_code == 0
    assert not list(question_cache_dir.glob("*.json"))  # off: nothing kept
    assert run_cli(*args, "--out", tmp_path / "sampled").exit_code == 0
    assert len(list(question_cache_dir.glob("*.json"))) == 1
    for module in ("question_cache", "lafn"):  # the edit itself takes the cached pool too
        monkeypatch.setattr(f"editcomp.edit.{module}.sampled_questions", no_sampling)
    res = run_cli(*args, "--out", tmp_path / "cached")
    assert res.exit_code == 0, res.output
    base = checkpoint.load(tiny_ckpt).model.state_dict()
    edited = [checkpoint.load(tmp_path / d).model.state_dict()
              for d in ("uncached", "sampled", "cached")]
    assert any(not torch.equal(w, edited[0][name]) for name, w in base.items())  # it edited
    for name in base:
        assert torch.equal(edited[0][name], edited[1][name]), name
        assert torch.equal(edited[0][name], edited[2][name]), name
    assert checkpoint.weights_sha256(tiny_ckpt) == before


def test_an_edit_samples_questions_exactly_where_lafn_edit_uses_them():
    """``samples_questions`` decides whether the CLI reads a pool; it must agree with
    ``lafn_edit``'s own use: together always, alone for an answer or risk term."""
    default = LAFNConfig()
    assert default.samples_questions(1) and default.samples_questions(2)
    assert replace(default, sequential=True).samples_questions(5)
    assert not replace(default, batch_questions=0).samples_questions(2)
    quiet = replace(default, answer_preserve=0.0)
    assert not quiet.samples_questions(1) and quiet.samples_questions(2)
    assert replace(quiet, risk_questions=8).samples_questions(1)
    assert not replace(quiet, risk_questions=8, kl_weight=0.0).samples_questions(1)

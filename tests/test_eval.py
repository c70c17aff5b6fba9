"""Perplexity, KL to a teacher and edit metrics on tiny in-memory models."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from editcomp.data import FactLang, Fact, Probe, load_facts, token_windows
from editcomp.eval import (edit_metrics, encode_prompt_target, join_prompt_target, kl_to_teacher,
                           locality_reference, perplexity, target_token_ids)

EXAMPLE_FACTS = Path(__file__).resolve().parents[1] / "examples" / "facts.jsonl"
TEXT = " ".join(f"The value of item {i} is {i * 7} , and it is listed here ." for i in range(80))
LANGS = ["en", "de", "fr", "es", "zh"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a busy machine thread contention makes them 50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def windows(tiny_tokenizer):
    return token_windows(tiny_tokenizer, TEXT, 48, max_windows=4)


# ------------------------------------------------------------------------------ perplexity


def test_perplexity_matches_hand_computed_nll(tiny_llama, windows):
    with torch.no_grad():
        logits = tiny_llama(windows).logits.double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, windows[:, 1:, None]).mean().item()
    out = perplexity(tiny_llama, windows, progress=False)
    assert out["tokens"] == 4 * 47 and out["windows"] == 4
    assert out["nll"] == pytest.approx(nll, rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert perplexity(tiny_llama, windows, batch_size=3, progress=False)["ppl"] == pytest.approx(out["ppl"], rel=1e-5)


class BigramLM(nn.Module):
    """Logits depend on the current token only: all mass on ``(token + 1) % V``."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)
        with torch.no_grad():
            self.table.weight.fill_(-30.0)
            self.table.weight[torch.arange(vocab), (torch.arange(vocab) + 1) % vocab] = 30.0

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.table(input_ids))


def test_perplexity_of_a_perfect_model_is_one():
    model = BigramLM(50)
    chain = (torch.arange(3 * 64) + 7) % 50
    out = perplexity(model, chain.view(3, 64), progress=False)
    assert out["ppl"] == pytest.approx(1.0, abs=1e-6)
    shuffled = torch.randint(0, 50, (3, 64), generator=torch.Generator().manual_seed(0))
    assert perplexity(model, shuffled, progress=False)["ppl"] > 1e6


# ---------------------------------------------------------------------------------------- KL


def test_kl_to_self_is_zero(tiny_llama, windows):
    out = kl_to_teacher(tiny_llama, tiny_llama, windows, progress=False)
    assert out["tokens"] == windows.numel()
    assert abs(out["kl"]) < 1e-9


def test_kl_of_perturbed_copy_matches_formula(tiny_llama, windows):
    student = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        lt = torch.log_softmax(tiny_llama(windows).logits.double(), -1)
        ls = torch.log_softmax(student(windows).logits.double(), -1)
    expected = (lt.exp() * (lt - ls)).sum(-1).mean().item()
    out = kl_to_teacher(student, tiny_llama, windows, batch_size=2, progress=False)
    assert expected > 1e-4
    assert out["kl"] == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------- prompt/target tokens


def test_join_prompt_target():
    assert join_prompt_target("The capital is", "Rome", "en") == "The capital is Rome"
    assert join_prompt_target("首都是", "罗马", "zh") == "首都是罗马"
    assert join_prompt_target("首都は", "ローマ", "ja-JP") == "首都はローマ"
    assert join_prompt_target("Ends with space ", "x", "en") == "Ends with space x"


def test_target_token_ids_round_trip(tiny_tokenizer):
    facts = load_facts(EXAMPLE_FACTS)
    for f in facts:
        for lang, fl in f.langs.items():
            joined = join_prompt_target(fl.prompt, fl.target, lang)
            p, t = encode_prompt_target(tiny_tokenizer, fl.prompt, fl.target, lang)
            assert p + t == tiny_tokenizer(joined)["input_ids"]
            assert p == tiny_tokenizer(fl.prompt)["input_ids"] and p[0] == tiny_tokenizer.bos_token_id
            assert t == target_token_ids(tiny_tokenizer, fl.prompt, fl.target, lang)
            assert tiny_tokenizer.decode(t).strip() == fl.target
            assert tiny_tokenizer.decode(p + t, skip_special_tokens=True) == joined


# ------------------------------------------------------------------------------ edit metrics


class OracleLM(nn.Module):
    """Wraps a model and forces it to continue each given (prompt, continuation) with that continuation."""

    def __init__(self, base, pairs):
        super().__init__()
        self.base, self.config = base, base.config
        self.next = {}
        for p, t in pairs:
            seq = p + t
            for k in range(len(p), len(seq)):
                self.next[tuple(seq[:k])] = seq[k]

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = self.base(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits.clone()
        for b, row in enumerate(input_ids.tolist()):
            for i in range(len(row)):
                nxt = self.next.get(tuple(row[:i + 1]))
                if nxt is not None:
                    logits[b, i, nxt] = 1e4
        return SimpleNamespace(logits=logits)


def _pairs(tokenizer, facts, probes=True):
    out = []
    for f in facts:
        for lang, fl in f.langs.items():
            for prompt in (fl.prompt, *fl.generality):
                out.append(encode_prompt_target(tokenizer, prompt, fl.target, lang))
            if probes:
                for pr in (*fl.locality, *fl.portability):
                    out.append(encode_prompt_target(tokenizer, pr.prompt, pr.answer, lang))
    return out


@pytest.fixture(scope="module")
def facts():
    return load_facts(EXAMPLE_FACTS, langs=LANGS)


def test_forced_model_scores_one(tiny_llama, tiny_tokenizer, facts):
    oracle = OracleLM(tiny_llama, _pairs(tiny_tokenizer, facts))
    res = edit_metrics(oracle, tiny_tokenizer, facts, progress=False, batch_size=7)
    assert list(res) == [*LANGS, "mean"]
    for lang in [*LANGS, "mean"]:
        for metric in ("reliability", "generality", "locality", "portability"):
            assert res[lang][metric]["acc"] == 1.0 and res[lang][metric]["em"] == 1.0, (lang, metric)
    assert res["en"]["reliability"]["n"] == 8 and res["mean"]["reliability"]["n"] == 40
    assert res["en"]["locality"]["n"] == sum(len(f.langs["en"].locality) for f in facts)

    raw = edit_metrics(tiny_llama, tiny_tokenizer, facts, langs=["en"], progress=False)
    assert list(raw) == ["en", "mean"]
    assert raw["en"]["reliability"]["acc"] < 0.5 and raw["en"]["reliability"]["em"] == 0.0


def test_locality_compares_with_the_unedited_model(tiny_llama, tiny_tokenizer, facts):
    ref = locality_reference(tiny_llama, tiny_tokenizer, facts, progress=False, batch_size=5)
    assert set(ref) == {f.case_id for f in facts}
    assert len(ref["eiffel-tower-city"]["de"]) == 2
    edited = OracleLM(tiny_llama, _pairs(tiny_tokenizer, facts, probes=False))  # only the edits change
    res = edit_metrics(edited, tiny_tokenizer, facts, reference=ref, progress=False)
    assert res["mean"]["reliability"]["em"] == 1.0
    assert res["mean"]["locality"]["acc"] == 1.0 and res["mean"]["locality"]["em"] == 1.0
    assert res["mean"]["portability"]["em"] == 0.0  # the random base does not know the answers


def test_greedy_reference_equals_generate(tiny_llama, tiny_tokenizer):
    probes = [("The capital of Germany is", "Berlin", "en"), ("德国的首都是", "柏林", "zh"),
              ("La capitale du Canada est", "Ottawa", "fr")]
    fact = Fact("g", {"en": FactLang("a", "b", locality=tuple(Probe(p, a) for p, a, _ in probes))}, "t:1")
    ref = locality_reference(tiny_llama, tiny_tokenizer, [fact], progress=False)["g"]["en"]
    for (prompt, answer, _), entry in zip(probes, ref):
        p, t = encode_prompt_target(tiny_tokenizer, prompt, answer, "en")
        out = tiny_llama.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                  max_new_tokens=len(t), min_new_tokens=len(t), do_sample=False,
                                  pad_token_id=tiny_tokenizer.pad_token_id)
        assert entry["gen"] == out[0, len(p):].tolist()


def test_greedy_continuations_equal_step_by_step_argmax(tiny_llama, tiny_tokenizer):
    """Different prompt lengths in one batch (left padding) still give each prompt's own argmax."""
    from editcomp.eval.edit_metrics import greedy_continuations
    prompts = [tiny_tokenizer(t)["input_ids"] for t in ("The capital of Germany is", "德国的首都是",
                                                       "La capitale du Canada est une ville")]
    conts = greedy_continuations(tiny_llama, tiny_tokenizer, prompts, 5)
    eos = tiny_tokenizer.eos_token_id
    for p, c in zip(prompts, conts):
        ids, want = list(p), []
        with torch.no_grad():
            for _ in range(5):
                nxt = int(tiny_llama(torch.tensor([ids])).logits[0, -1].argmax())
                want.append(nxt)
                ids.append(nxt)
                if nxt == eos:
                    break
        assert c == want


def test_missing_reference_is_a_data_error(tiny_llama, tiny_tokenizer, facts):
    from editcomp.errors import DataError
    with pytest.raises(DataError, match="no prediction for fact 'eiffel-tower-city'"):
        edit_metrics(tiny_llama, tiny_tokenizer, facts[:1], reference={}, progress=False)


# ------------------------------------------------------------------------------ bootstrap intervals

def test_bootstrap_ci_matches_the_normal_interval_of_a_coin():
    """50 zeros and 50 ones: mean 0.5, standard error 0.05, so the 95% interval is about
    0.40-0.60; a bootstrap that resampled wrongly (too few cases, or not with replacement) would
    come out narrower or empty."""
    from editcomp.eval.bootstrap import bootstrap_ci
    lo, hi = bootstrap_ci([0.0] * 50 + [1.0] * 50)
    assert lo == pytest.approx(0.40, abs=0.02) and hi == pytest.approx(0.60, abs=0.02)
    assert bootstrap_ci([0.0] * 50 + [1.0] * 50) == (lo, hi)  # seeded
    assert bootstrap_ci([0.7] * 30) == pytest.approx((0.7, 0.7))
    assert bootstrap_ci([]) is None


def test_bootstrap_ci_weighs_each_probe_the_same():
    """A case with 9 probes at 1.0 and 9 cases of one probe at 0.0: the pooled mean is 0.5, not
    the 0.1 of the case means, and the interval is around the pooled one."""
    from editcomp.eval.bootstrap import bootstrap_ci
    values, weights = [1.0] + [0.0] * 9, [9] + [1] * 9
    lo, hi = bootstrap_ci(values, weights)
    assert lo < 0.5 < hi and hi > 0.3
    lo1, hi1 = bootstrap_ci(values)
    assert hi1 < 0.45
    with pytest.raises(ValueError, match="weights"):
        bootstrap_ci([1.0, 0.0], [1])

"""LAFN and FT-L on tiny models: locating finds a planted neuron, edits take, and nothing else moves."""

import copy
import sys
from dataclasses import replace

import pytest
import torch

from editcomp.arch import get_adapter
from editcomp.data import Question, load_facts
from editcomp.edit import FTLConfig, LAFNConfig, LocateConfig, ftl_edit, lafn_edit, locate
from editcomp.edit.prompts import (KL_PROMPTS, NEIGHBOR_SUBJECTS, kl_answer, kl_prompts_for,
                                   neighbor_prompts, template_paraphrases, training_items)
from editcomp.edit.locate import GenericStats, locate_neurons
from editcomp.edit.prompts import TrainItem
from editcomp.edit.layout import pack_rows, right_pad
from editcomp.edit.runner import (ModelRunner, TrainBatch, attention_kernel, frozen,
                                  gather_positions, top_next_tokens, weights_held_as)
from editcomp.errors import ConfigError, DataError
from editcomp.eval.edit_metrics import edit_metrics, greedy_continuations
from editcomp.tiny import tiny_model as _tiny_model

from conftest import EXAMPLE_FACTS

VOCAB = 1024  # conftest's tiny_tokenizer vocabulary (at most)


def tiny_model(family="llama"):
    return _tiny_model(family, vocab_size=VOCAB)

LANGS = ["en", "de"]
NEURON = 77
SCALE = 5.0


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    """conftest's tokenizer: trained on the example facts, so their targets are whole tokens."""
    return tiny_tokenizer


@pytest.fixture(scope="module")
def fact():
    """Statue of Liberty -> London: the same target word in en and de."""
    return load_facts(EXAMPLE_FACTS, langs=LANGS, limit=1, offset=1)


def mlp_inputs(model, tokenizer, prompts, layer, every_position=False):
    """The layer's FFN input at each prompt's last token (or every position) -> ``[n, hidden]``."""
    runner = ModelRunner(model, tokenizer)
    box = []
    lp = get_adapter(model).layer(layer)
    h = lp.gate.register_forward_pre_hook(lambda m, a: box.append(a[0].detach()))
    try:
        ids, mask = right_pad(prompts, runner.pad, runner.device)
        with torch.no_grad():
            runner.adapter.decoder(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        h.remove()
    if every_position:
        return torch.cat([box[0][i, :len(p)] for i, p in enumerate(prompts)])
    return box[0][torch.arange(len(prompts)), torch.tensor([len(p) - 1 for p in prompts])]


def confident(model):
    """Scale the (tied) output embeddings so the tiny model can be confident at all: with the init's
    std 0.02 no next token can get more than a few percent, whatever the hidden state."""
    with torch.no_grad():
        get_adapter(model).lm_head.weight.mul_(SCALE)
    return model


def planted(tokenizer, facts, family="llama"):
    """A tiny model whose last-layer neuron NEURON fires (pre-activation 6) at the last token of
    every training prompt of the fact, in every language, and is silent on the unrelated prompts
    (at every position)."""
    model = confident(tiny_model(family))
    items = training_items(facts, tokenizer, LANGS, paraphrases=2)
    kl = [tokenizer(t)["input_ids"] for t in kl_prompts_for(LANGS, per_lang=1)]
    last = get_adapter(model).num_layers - 1
    x_kl = mlp_inputs(model, tokenizer, kl, last, every_position=True)
    x = torch.cat([mlp_inputs(model, tokenizer, [list(it.prompt_ids) for it in items], last), x_kl])
    want = torch.cat([torch.full((len(items),), 6.0), torch.zeros(len(x_kl))])
    d = torch.linalg.pinv(x) @ want  # x @ d = want: exact, fewer rows than hidden units
    lp = get_adapter(model).layer(last)
    with torch.no_grad():
        lp.gate.weight[NEURON] = d
        lp.up.weight[NEURON] = d
    return model, items, kl, last


def test_truncated_forward_equals_the_full_model(tok):
    for family in ("llama", "gemma3"):
        model = tiny_model(family)
        runner = ModelRunner(model, tok)
        seqs = [tok("The capital of France is Paris")["input_ids"], tok("日本的首都是")["input_ids"]]
        ids, mask = right_pad(seqs, runner.pad, runner.device)
        full = model(input_ids=ids, attention_mask=mask).logits
        cached, h = runner.layer_input(ids, mask, 1)
        rows, cols = [0, 0, 1], [1, len(seqs[0]) - 1, len(seqs[1]) - 1]
        ours = runner.head(gather_positions(runner.hidden(ids, mask, 1, cached), rows, cols))
        torch.testing.assert_close(ours, full[rows, cols], rtol=1e-5, atol=1e-5)


def test_pack_rows_fill_each_row_to_its_width_and_place_every_sequence_once():
    rows = pack_rows([5, 9, 3, 7, 2, 12], 10)
    assert sorted(i for r in rows for i in r) == list(range(6))
    lengths = [5, 9, 3, 7, 2, 12]
    assert [sum(lengths[i] for i in r) for r in rows] == [12, 9, 10, 7]  # 12 is alone: too long
    assert pack_rows([4, 4, 4], 100) == [[0, 1, 2]]


def test_packed_batches_give_the_padded_losses_and_gradients(tok, fact):
    """Sequences laid end to end, each seeing only itself with positions from 0, give the
    target NLL, the KL and the deltas' gradients of one padded row per sequence, on the cached
    stream of an upper layer and under both attention kernels; a sequence longer than a
    sliding window keeps the padded layout (one packed mask cannot serve both kinds of layer)."""
    model, items, kl, last = planted(tok, fact)
    runner = ModelRunner(model, tok)
    pairs = [(list(it.prompt_ids), list(it.target_ids)) for it in items]
    down = get_adapter(model).layer(last).down
    for kernel in ("eager", "sdpa"):
        got = []
        for pack in (None, 64):
            b = TrainBatch(runner, pairs, kl, kl_vocab=16, nll_vocab=16, pack=pack)
            assert (b.pos is not None) == (pack is not None)
            assert (b.ids.shape[0] == len(pairs) + len(kl)) == (pack is None)
            d = torch.zeros(down.weight.shape[0], 4, requires_grad=True)
            with frozen(model), attention_kernel(model, kernel):
                b.prepare(runner, last)
                h = down.register_forward_hook(lambda m, a, out: out + a[0][..., 70:74] @ d.T)
                try:
                    with torch.no_grad():
                        d.add_(torch.randn(d.shape, generator=torch.Generator().manual_seed(0)))
                    nll, kl_pos, hits = b.losses(runner, last)
                    (nll.mean() + kl_pos.mean()).backward()
                finally:
                    h.remove()
            got.append((nll.detach(), kl_pos.detach(), hits, d.grad))
        assert float(got[0][1].mean()) > 1e-3  # the deltas moved the unrelated prompts
        for a, b in zip(*got):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    gemma = tiny_model("gemma3")  # sliding window 8
    runner = ModelRunner(gemma, tok)
    long, short = [list(range(3, 12))], [[3, 4, 5], [6, 7, 8, 9]]
    assert TrainBatch(runner, [], long, pack=64).pos is None
    assert TrainBatch(runner, [], short, pack=64).ids.shape == (1, 7)
    # a bf16 model gets a bf16 mask, as transformers' own masks, and the padded hidden states
    half = ModelRunner(tiny_model().to(torch.bfloat16), tok)
    b, ref = TrainBatch(half, [], short, pack=64), TrainBatch(half, [], short)
    assert b.mask.dtype == torch.bfloat16
    with torch.no_grad():
        got, want = half.hidden(b.ids, b.mask, pos=b.pos), half.hidden(ref.ids, ref.mask)
    # packed longest first: the second sequence, then the first
    torch.testing.assert_close(got[0], torch.cat([want[1], want[0, :3]]), rtol=2e-2, atol=2e-2)


def test_the_eager_kernel_gives_the_same_logits_and_the_models_own_comes_back(tok):
    for family in ("llama", "gemma3"):
        model = tiny_model(family)
        own = model.config._attn_implementation
        assert own != "eager"
        runner = ModelRunner(model, tok)
        seqs = [tok("The capital of France is Paris")["input_ids"], tok("日本的首都是")["input_ids"]]
        ids, mask = right_pad(seqs, runner.pad, runner.device)
        ref = runner.hidden(ids, mask)
        with attention_kernel(model, "eager"):
            assert model.config._attn_implementation == "eager"
            eager = runner.hidden(ids, mask)
        assert model.config._attn_implementation == own
        real = mask.bool()  # padded positions are not compared
        torch.testing.assert_close(eager[real], ref[real], rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError), attention_kernel(model, "eager"):
            raise RuntimeError("a failed step")
        assert model.config._attn_implementation == own
        with pytest.raises(ConfigError, match="no-such-kernel"), attention_kernel(model, "no-such-kernel"):
            pass
        assert model.config._attn_implementation == own


def test_weights_held_in_bf16_give_the_autocast_result_and_the_originals_come_back(tok):
    model = tiny_model("llama")
    runner = ModelRunner(model, tok)
    ids, mask = right_pad([tok("The capital of France is Paris")["input_ids"]], runner.pad, runner.device)
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = runner.hidden(ids, mask)
        with weights_held_as(runner, 1, torch.bfloat16):
            held = {n for n, p in model.named_parameters() if p.dtype == torch.bfloat16}
            out = runner.hidden(ids, mask)
    assert held and all(n.startswith("model.layers.") and not n.startswith("model.layers.0.")
                        and "norm" not in n for n in held)
    assert any(n.startswith("model.layers.1.mlp.down_proj") for n in held)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # the very values autocast computes with
    for n, p in model.named_parameters():  # the same parameter objects, bit-identical
        assert p is before[n][0] and torch.equal(p, before[n][1])


def test_templates_keep_the_prompt_and_follow_the_language():
    q = template_paraphrases("Wann wurde X gegründet?", "de", 3)
    assert len(q) == 3 and all("Wann wurde X gegründet?" in p for p in q) and q[0].startswith("Frage")
    assert template_paraphrases("The Eiffel Tower is in", "en", 1) == ["Fact: The Eiffel Tower is in"]
    assert template_paraphrases("x?", "xx", 0) == []


def test_training_items_never_use_the_evaluation_probes(tok, fact):
    items = training_items(fact, tok, LANGS, paraphrases=2)
    texts = {it.text for it in items}
    fl = fact[0].langs["en"]
    probes = set(fl.generality) | {p.prompt for p in fl.locality} | {p.prompt for p in fl.portability}
    assert texts.isdisjoint(probes)
    assert fl.prompt in texts and set(fl.paraphrases) <= texts
    # per language: prompt + given paraphrases + 2 templates
    assert len(items) == sum(1 + len(fact[0].langs[lang].paraphrases) + 2 for lang in LANGS)


def test_neighbor_prompts_swap_the_subject_and_never_use_the_probes(fact):
    near = neighbor_prompts(fact, LANGS, 2)
    assert len(near) == 4 and near == neighbor_prompts(fact, LANGS, 2)  # deterministic
    for lang, pair in zip(LANGS, (near[:2], near[2:])):
        fl = fact[0].langs[lang]
        probes = set(fl.generality) | {p.prompt for p in fl.locality} | {p.prompt for p in fl.portability}
        for text in pair:
            assert fl.subject not in text and text not in probes
            stand_in = [s for s in NEIGHBOR_SUBJECTS["*"] if s in text]
            assert len(stand_in) == 1 and text == fl.prompt.replace(fl.subject, stand_in[0])
    assert pair[0] != pair[1] and neighbor_prompts(fact, LANGS, 0) == []
    # a prompt that does not contain its subject gives no neighbor in that language
    fl = fact[0].langs["en"]
    odd = replace(fact[0], langs={"en": replace(fl, subject="Big Ben")})
    assert neighbor_prompts([odd], ["en"], 2) == []


def test_locating_finds_the_planted_neuron(tok, fact):
    model, items, kl, last = planted(tok, fact)
    cfg = LocateConfig(min_layer=0.0, top_frac=0.03, share=1.0, max_neurons=1,
                       neurons_per_token=0)
    per_fact, report = locate(model, tok, items, 1, cfg, kl_prompts=kl)
    assert per_fact == [{last: [NEURON]}]
    assert report["layer_histogram"][last] == 1 and report["neurons_total"] == 1
    assert report["facts"][0]["per_lang"]["en"] >= 1
    assert 0 < report["language_overlap_jaccard"]["en-de"] <= 1
    # without planting, that neuron is not a shared candidate of the fact
    clean, _ = locate(tiny_model("llama"), tok, items, 1,
                      LocateConfig(min_layer=0.0, top_frac=0.03, share=1.0, max_neurons=None),
                      kl_prompts=kl)
    assert NEURON not in clean[0].get(last, [])


def test_a_neuron_firing_on_unrelated_prompts_too_is_dropped(tok, fact):
    model, items, kl, last = planted(tok, fact)
    lp = get_adapter(model).layer(last)
    with torch.no_grad():  # make it fire for everything: a constant-direction neuron
        x = mlp_inputs(model, tok, kl, last)
        d = torch.linalg.pinv(x) @ torch.full((len(kl),), 6.0)
        lp.gate.weight[NEURON + 1] = d
        lp.up.weight[NEURON + 1] = d
    per_fact, report = locate(model, tok, items, 1, LocateConfig(min_layer=0.0, top_frac=0.03, share=1.0), kl)
    assert NEURON in per_fact[0][last] and NEURON + 1 not in per_fact[0][last]
    assert report["generic_neurons"] >= 1


def test_a_neuron_firing_where_every_unrelated_question_ends_is_dropped():
    """Neuron 3 fires at the fact's last tokens and at every unrelated prompt's last token (the
    prompt's form), neuron 5 only for the fact: with ``form_share`` only 5 is the fact's."""
    items = [TrainItem(0, lang, "q", "prompt", (1, 2), (3,)) for lang in ("en", "de", "en", "de")]
    acts = torch.rand(1, len(items), 64) * 0.1
    acts[0, :, 3] = acts[0, :, 5] = 5.0
    generic = torch.rand(1, 80, 64) * 0.1
    ends = [10 * k + 9 for k in range(8)]  # eight unrelated prompts of 10 tokens
    generic[0, ends, 3] = 5.0
    generic[0, ends, torch.arange(8) + 10] = 1.0  # each end's runner-up neuron is its own
    cfg = dict(min_layer=0.0, top_frac=2 / 64, share=1.0, generic_share=0.25)
    stats = GenericStats.of(generic, ends, cfg["top_frac"])
    kept, report = locate_neurons(acts, items, 1, LocateConfig(**cfg), stats)
    assert kept == [{0: [5]}] and report["form_neurons"] == 1 and report["generic_neurons"] == 0
    kept, _ = locate_neurons(acts, items, 1, LocateConfig(**cfg, form_share=None), stats)
    assert kept == [{0: [3, 5]}]


def test_neurons_of_the_target_s_later_tokens_join_only_with_continuation():
    """Two-token targets: neuron 5 fires at every last prompt token, neuron 9 at every position
    that predicts the second target token (inside the answer). By default a fact's neurons are
    those of its last prompt tokens only; with ``continuation`` neuron 9 joins them."""
    items = [TrainItem(0, lang, "q", "prompt", (1, 2), (3, 4)) for lang in ("en", "de", "en", "de")]
    obs = [(i, j) for i in range(len(items)) for j in (0, 1)]
    acts = torch.rand(1, len(obs), 64) * 0.1
    acts[0, 0::2, 5] = 5.0  # j = 0: the last prompt token
    acts[0, 1::2, 9] = 5.0  # j = 1: predicting the target's second token
    cfg = dict(min_layer=0.0, top_frac=1 / 64, share=1.0, generic_share=None, form_share=None,
               min_neurons=1)
    kept, _ = locate_neurons(acts, items, 1, LocateConfig(**cfg), obs=obs)
    assert kept == [{0: [5]}]
    kept, _ = locate_neurons(acts, items, 1, LocateConfig(**cfg, continuation=True), obs=obs)
    assert kept == [{0: [5, 9]}]


def test_a_fact_whose_shared_neurons_are_all_banned_falls_back_to_its_best_candidates():
    """Neuron 3 is the only one all four prompts share, and it marks the prompts' form; neuron
    7 fires strongly in half the prompts, 9 weakly in the other half. The fallback takes the
    most consistent, then strongest, unbanned candidate (7) instead of no neuron at all."""
    items = [TrainItem(0, lang, "q", "prompt", (1, 2), (3,)) for lang in ("en", "de", "en", "de")]
    acts = torch.rand(1, len(items), 64) * 0.1
    acts[0, :, 3] = 5.0
    acts[0, :2, 7] = 4.0
    acts[0, 2:, 9] = 1.0
    generic = torch.rand(1, 80, 64) * 0.1
    ends = [10 * k + 9 for k in range(8)]
    generic[0, ends, 3] = 5.0
    generic[0, ends, torch.arange(8) + 10] = 1.0
    cfg = dict(min_layer=0.0, top_frac=2 / 64, share=1.0, generic_share=0.25, max_neurons=1,
               neurons_per_token=0)
    stats = GenericStats.of(generic, ends, cfg["top_frac"])
    kept, report = locate_neurons(acts, items, 1, LocateConfig(**cfg), stats)
    assert kept == [{0: [7]}] and report["facts"][0]["fallback"]
    assert report["facts_without_neurons"] == 0
    kept, report = locate_neurons(acts, items, 1, LocateConfig(**cfg, fallback=False), stats)
    assert kept == [{}] and report["facts_without_neurons"] == 1


def test_a_fact_with_too_few_shared_neurons_is_topped_up_from_its_candidates():
    """Neuron 5 is the one all four prompts share; 7 fires strongly in half of them, 9 weakly
    in the other half. Below ``min_neurons`` shared, the fact takes its ``max_neurons`` most
    consistent candidates: the shared one first, then 7."""
    items = [TrainItem(0, lang, "q", "prompt", (1, 2), (3,)) for lang in ("en", "de", "en", "de")]
    acts = torch.rand(1, len(items), 64) * 0.1
    acts[0, :, 5] = 5.0
    acts[0, :2, 7] = 4.0
    acts[0, 2:, 9] = 1.0
    cfg = dict(min_layer=0.0, top_frac=2 / 64, share=1.0, generic_share=None, form_share=None,
               max_neurons=2, neurons_per_token=0)
    kept, report = locate_neurons(acts, items, 1, LocateConfig(**cfg, min_neurons=2))
    assert kept == [{0: [5, 7]}] and report["facts"][0]["fallback"]
    kept, report = locate_neurons(acts, items, 1, LocateConfig(**cfg, min_neurons=1))
    assert kept == [{0: [5]}] and not report["facts"][0]["fallback"]
    kept, _ = locate_neurons(acts, items, 1, LocateConfig(**cfg, min_neurons=2, fallback=False))
    assert kept == [{0: [5]}]
    with pytest.raises(ConfigError, match="min_neurons"):
        LocateConfig(min_neurons=0).validate()


def test_a_long_target_raises_a_lone_facts_neuron_budget():
    """Neurons 5, 7 and 9 are shared by all four prompts (strengths 6, 5, 4). Under a cap of one
    neuron and ``neurons_per_token`` 1, a fact located alone keeps one neuron per token of its
    longest target (the de one here), the strongest first; facts located together keep the cap."""
    acts = torch.rand(1, 4, 64) * 0.1
    acts[0, :, 5], acts[0, :, 7], acts[0, :, 9] = 6.0, 5.0, 4.0
    cfg = dict(min_layer=0.0, top_frac=3 / 64, share=1.0, generic_share=None, form_share=None,
               max_neurons=1, min_neurons=1)

    def located(de_target, n_facts=1, per_token=1):
        items = [TrainItem(0, lang, "q", "prompt", (1, 2), (3,) if lang == "en" else de_target)
                 for lang in ("en", "de", "en", "de")]
        config = LocateConfig(**cfg, neurons_per_token=per_token)
        kept, _ = locate_neurons(acts, items, n_facts, config)
        return kept[0]

    assert located((3,)) == {0: [5]}
    assert located((3, 4)) == {0: [5, 7]}
    assert located((3, 4, 5, 6)) == {0: [5, 7, 9]}  # no more than it shares
    assert located((3, 4), per_token=None) == located((3, 4), per_token=0) == {0: [5]}
    assert located((3, 4), n_facts=2) == {0: [5]}
    with pytest.raises(ConfigError, match="neurons_per_token"):
        LocateConfig(neurons_per_token=-1).validate()


def test_selectivity_puts_a_neuron_quiet_on_unrelated_text_first():
    """Neurons 5 and 7 are candidates at all four prompts, 5 the stronger (6 vs 4), but 5 also
    fires at half that all over the unrelated text, where 7 is near silent. With one neuron
    allowed, strength takes 5 and selectivity 1 takes 7. Consistency still comes first: 9, a
    candidate at half the prompts only, however strong and quiet elsewhere, never goes first."""
    items = [TrainItem(0, lang, "q", "prompt", (1, 2), (3,)) for lang in ("en", "de", "en", "de")]
    acts = torch.rand(1, len(items), 64) * 0.1
    acts[0, :, 5], acts[0, :, 7], acts[0, :2, 9] = 6.0, 4.0, 500.0
    generic = torch.rand(1, 80, 64) * 0.1
    generic[0, :, 5], generic[0, :, 7] = 3.0, 0.01
    cfg = dict(min_layer=0.0, top_frac=3 / 64, share=1.0, generic_share=None, form_share=None,
               neurons_per_token=0)
    generic = GenericStats.of(generic, [79], cfg["top_frac"])
    for selectivity, first in ((0.0, 5), (1.0, 7)):
        kept, report = locate_neurons(acts, items, 1, LocateConfig(
            **cfg, max_neurons=1, min_neurons=1, selectivity=selectivity), generic)
        assert kept == [{0: [first]}] and not report["facts"][0]["fallback"]
    # below min_neurons every candidate may join: still the two consistent ones, not 9
    kept, report = locate_neurons(acts, items, 1, LocateConfig(**cfg, max_neurons=2, min_neurons=3,
                                                               selectivity=1.0), generic)
    assert kept == [{0: [5, 7]}] and report["facts"][0]["fallback"]
    # unset: selective for a fact located alone, by strength for facts located together
    for n_facts, first in ((1, 7), (2, 5)):
        kept, report = locate_neurons(acts, items, n_facts, LocateConfig(
            **cfg, max_neurons=1, min_neurons=1), generic)
        assert kept[0] == {0: [first]} and report["selectivity"] == (n_facts == 1)
    with pytest.raises(ConfigError, match="selectivity"):
        LocateConfig(selectivity=1.5).validate()


def test_most_consistent_ranks_by_consistency_then_strength():
    from editcomp.edit.locate import _most_consistent
    cons, strength = torch.tensor([1.0, 0.5, 1.0, 0.5]), torch.tensor([1.0, 5000.0, 2.0, 3.0])
    assert _most_consistent(cons, strength, 3).tolist() == [2, 0, 1]


def test_the_restricted_kl_keeps_the_targets_and_tracks_the_full_kl(tok, fact):
    """KL over each position's own top tokens of the unedited model (plus the edit targets, each
    token once) is the renormalized full distribution there, close to the full KL once the model
    moves, and zero before it does."""
    model, items, kl, last = planted(tok, fact)
    runner = ModelRunner(model, tok)
    pairs = [(list(it.prompt_ids), list(it.target_ids)) for it in items]
    full, top = TrainBatch(runner, pairs, kl), TrainBatch(runner, pairs, kl, kl_vocab=64)
    for b in (full, top):
        b.prepare(runner, 0)
    assert full.top is None and top.top.shape == (len(top.kl_rows), 64)
    assert top.kl_ref.shape == (len(top.kl_rows), 64 + top.targets.numel())
    for r in range(len(top.kl_rows)):  # the full reference, renormalized over the row's tokens
        tokens = sorted(set(top.top[r].tolist()) | set(top.labels))
        want = torch.log_softmax(full.kl_ref[r, tokens], -1)
        got = dict.fromkeys(tokens, 0.0)  # a target among the top tokens counts once
        for t, p in zip(top.top[r].tolist() + top.targets.tolist(), top.kl_ref[r].exp().tolist()):
            got[t] += p
        assert torch.allclose(torch.tensor([got[t] for t in tokens]), want.exp(), atol=1e-5)
    with torch.no_grad():
        assert float(top.losses(runner, 0)[1].abs().max()) < 1e-5
        get_adapter(model).layer(last).down.weight.add_(torch.randn_like(
            get_adapter(model).layer(last).down.weight) * 0.5)
        kl_full, kl_top = full.losses(runner, 0)[1].mean(), top.losses(runner, 0)[1].mean()
    assert kl_full > 1e-3 and 0.5 * kl_full < kl_top < 1.5 * kl_full


def test_known_kl_top_tokens_replace_the_full_output_layer_pass(tok, fact):
    """``top_next_tokens`` gives each position the top tokens ``prepare`` finds itself (so the
    same KL reference, padded or packed); given ones are used as they are (here: the bottom
    tokens, which prepare would never pick), and a prompt without them still gets its own."""
    model, items, kl, _ = planted(tok, fact)
    runner = ModelRunner(model, tok)
    pairs = [(list(it.prompt_ids), list(it.target_ids)) for it in items]
    known = top_next_tokens(runner, kl, 32)
    assert [t.shape for t in known] == [(len(p) - 1, 32) for p in kl]
    for pack in (None, 64):
        own = TrainBatch(runner, pairs, kl, kl_vocab=16, pack=pack)
        given = TrainBatch(runner, pairs, kl, kl_vocab=16, pack=pack, kl_top=known)
        for b in (own, given):
            b.prepare(runner, 0)
        assert torch.equal(own.top, given.top)
        torch.testing.assert_close(own.kl_ref, given.kl_ref, rtol=0, atol=1e-6)
    # the vocabulary's last 16 ids, which are not the first prompt's own top (asserted below)
    bottom = [runner.vocab_size - 1 - torch.arange(16).expand(len(p) - 1, 16) for p in kl]
    odd = TrainBatch(runner, pairs, kl, kl_vocab=16, kl_top=[bottom[0]] + [None] * (len(kl) - 1))
    odd.prepare(runner, 0)
    first = len(kl[0]) - 1
    assert torch.equal(odd.top[:first], bottom[0])
    assert torch.equal(odd.top[first:], own.top[first:])
    assert not torch.equal(odd.top[:first], own.top[:first])


def test_an_edit_with_known_top_tokens_and_generic_stats_writes_the_same_deltas(tok, fact,
                                                                             monkeypatch):
    """``unrelated_prompts`` carries its top tokens and ``GenericStats``; an edit with them
    locates the same neurons and writes what an edit that finds them itself writes."""
    from editcomp.edit.unrelated import unrelated_prompts

    model = tiny_model()
    cfg = LAFNConfig(kl_per_lang=2, kl_continuation=2, kl_vocab=16, steps=4, stop_nll=None,
                     locate=LocateConfig(share=0.5))
    unrelated = unrelated_prompts(model, tok, LANGS, cfg)
    assert unrelated.top is not None and all(t.shape == (len(p) - 1, 16)
                                             for t, p in zip(unrelated.top, unrelated.ids))
    n_layers = get_adapter(model).num_layers
    assert unrelated.generic.candidates.shape == (n_layers, model.config.intermediate_size)
    assert unrelated.generic.positions == sum(map(len, unrelated.ids))
    locate_module = sys.modules["editcomp.edit.locate"]  # (editcomp.edit.locate: the function)
    run_stats = locate_module.generic_stats
    written, located = [], []
    for given in (unrelated, replace(unrelated, top=None, generic=None)):
        m = copy.deepcopy(model)
        if given.generic is not None:  # known: the edit must not run them again
            monkeypatch.setattr(locate_module, "generic_stats", None)
        rep = lafn_edit(m, tok, fact, cfg, LANGS, progress=False, unrelated=given)
        monkeypatch.setattr(locate_module, "generic_stats", run_stats)
        written.append([lp.down.weight.detach().clone() for lp in get_adapter(m).layers()])
        located.append(rep["locate"]["facts"])
    assert located[0] == located[1]
    assert any(not torch.equal(w, lp.down.weight) for w, lp in
               zip(written[0], get_adapter(model).layers()))  # the edit changed something
    for a, b in zip(*written):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_generic_stats_summed_batch_by_batch_are_those_of_the_whole_activations(tok):
    """``generic_stats`` never holds the ``[layers, positions, I]`` activations, yet counts the
    same candidates (at every position and at the given ends) and sums the same |activation|
    as ``GenericStats.of`` over them; padding (prompts of unequal length) adds nothing."""
    from editcomp.edit.locate import generic_activations, generic_stats

    kl = [tok(t)["input_ids"] for t in kl_prompts_for(LANGS, per_lang=4)]
    assert len({len(p) for p in kl}) > 1  # batches hold padding
    runner = ModelRunner(tiny_model(), tok)
    ends = [len(p) - 2 for p in kl]
    got = generic_stats(runner, kl, ends, 0.05, batch_size=3)
    acts = generic_activations(runner, kl)
    cols = [sum(map(len, kl[:k])) + e for k, e in enumerate(ends)]
    want = GenericStats.of(acts, cols, 0.05)
    assert (got.prompts, got.positions) == (len(kl), acts.shape[1])
    assert torch.equal(got.candidates, want.candidates)
    assert torch.equal(got.end_candidates, want.end_candidates)
    torch.testing.assert_close(got.abs_sum, want.abs_sum, rtol=1e-5, atol=1e-4)
    k = max(1, round(0.05 * acts.shape[2]))  # each real position counts k candidates per layer
    assert int(got.candidates.sum()) == acts.shape[0] * acts.shape[1] * k
    assert int(got.end_candidates.sum()) == acts.shape[0] * len(kl) * k


def test_known_generic_stats_stand_for_the_first_unrelated_prompts(tok, fact):
    """``run_and_locate(known=)`` runs only the prompts after those the known stats cover and
    locates as without them; stats that are not the first prompts' own are refused."""
    from editcomp.edit.locate import generic_stats, run_and_locate

    model, items, kl, _ = planted(tok, fact)
    runner = ModelRunner(model, tok)
    cfg = LocateConfig(share=0.5)
    want = run_and_locate(runner, items, 1, cfg, kl)
    first = generic_stats(runner, kl[:1], None, cfg.top_frac)
    assert run_and_locate(runner, items, 1, cfg, kl, known=first) == want
    banned_all = replace(first, candidates=torch.full_like(first.candidates, 10**6))
    located, report = run_and_locate(runner, items, 1, cfg, kl, known=banned_all)  # as given
    assert report["generic_neurons"] == first.candidates.numel()
    for bad in (replace(first, positions=first.positions - 1), replace(first, top_frac=0.5),
                replace(first, prompts=len(kl) + 1)):
        with pytest.raises(ValueError, match="not the first prompts"):
            run_and_locate(runner, items, 1, cfg, kl, known=bad)


def last_logprobs(model, tok, seqs):
    runner = ModelRunner(model, tok)
    ids, mask = right_pad(seqs, runner.pad, runner.device)
    with torch.no_grad():
        h = runner.hidden(ids, mask)
        return torch.log_softmax(runner.head(gather_positions(h, list(range(len(seqs))),
                                                              [len(s) - 1 for s in seqs])), -1)


def kl_div(ref, new):
    return (ref.exp() * (ref - new)).sum(-1)


def test_the_kl_term_keeps_unrelated_prompts(tok, fact):
    """Measured where the unrelated prompts end, so without their answers (``kl_answers``), which
    would move part of the term to the answer positions."""
    model, items, kl, last = planted(tok, fact)
    ref = last_logprobs(model, tok, kl)
    moved = []
    for weight in (0.0, 10.0):
        m = copy.deepcopy(model)
        cfg = LAFNConfig(locate=LocateConfig(min_layer=0.0, top_frac=0.05), steps=30, lr=2.0, norm_weight=0.0,
                         kl_weight=weight, kl_answers=False)
        lafn_edit(m, tok, fact, cfg, LANGS, progress=False)
        moved.append(float(kl_div(ref, last_logprobs(m, tok, kl)).mean()))
    assert moved[1] < 0.6 * moved[0]


def test_the_preservation_term_keeps_the_edit_off_generic_text(tok, fact):
    """With generic text's moments (``preserve``) the written edit changes down_proj's output on
    that text less than the same edit without them: the term reaches the optimizer."""
    from editcomp.edit.lafn import preservation_moments
    model, _, _, _ = planted(tok, fact)
    ids = tok("The weather was mild and the river ran quietly past the town. " * 8)["input_ids"]
    text = torch.tensor([ids[:48], ids[48:96]])
    moments = preservation_moments(model, tok, text, LAFNConfig(locate=LocateConfig(min_layer=0.0)))
    seqs = [list(map(int, w)) for w in text]
    before = {li: mlp_down_outputs(model, tok, seqs, li) for li in moments}
    changes = []
    for preserve in (None, moments):
        m = copy.deepcopy(model)
        cfg = LAFNConfig(locate=LocateConfig(min_layer=0.0, top_frac=0.05), steps=30, lr=2.0,
                         norm_weight=0.0, kl_weight=0.0, preserve_weight=10.0)
        report = lafn_edit(m, tok, fact, cfg, LANGS, progress=False, preserve=preserve)
        assert report["neurons"]["total"] > 0
        changes.append(sum(float((mlp_down_outputs(m, tok, seqs, li) - before[li]).pow(2).mean())
                           for li in moments))
    assert changes[0] > 0 and changes[1] < 0.5 * changes[0]


def mlp_down_outputs(model, tokenizer, seqs, layer):
    """down_proj's output at every position of ``seqs`` (equal lengths) in ``layer``."""
    runner = ModelRunner(model, tokenizer)
    box = []
    h = get_adapter(model).layer(layer).down.register_forward_hook(
        lambda m, a, out: box.append(out.detach()))
    try:
        with torch.no_grad():
            runner.adapter.decoder(input_ids=torch.tensor(seqs), use_cache=False)
    finally:
        h.remove()
    return box[0]


def spy_kl_prompts(monkeypatch) -> list:
    """A list that gets, for each LAFN training run, the KL term's prompts (token ids)."""
    import editcomp.edit.lafn as lafn_mod
    seen = []
    real = lafn_mod.build_batches

    def spy(runner, pairs, kl_prompts, *args, **kwargs):
        seen.append([list(p) for p in kl_prompts])
        return real(runner, pairs, kl_prompts, *args, **kwargs)

    monkeypatch.setattr(lafn_mod, "build_batches", spy)
    return seen


def test_neighbor_prompts_join_the_kl_term_with_their_continuations(tok, fact, monkeypatch):
    """The KL term gets every unrelated prompt and, after them, each neighbor prompt followed by
    the unedited model's greedy continuation; the report names the neighbors."""
    model = confident(tiny_model())
    seen = spy_kl_prompts(monkeypatch)
    cfg = LAFNConfig(locate=LocateConfig(min_layer=0.0, top_frac=0.1, generic_share=None,
                                         form_share=None), steps=1, kl_continuation=3,
                     neighbors=2)
    texts = neighbor_prompts(fact, LANGS, 2)
    want = [tok(t)["input_ids"] + c for t, c in zip(texts, greedy_continuations(
        model, tok, [tok(t)["input_ids"] for t in texts], 3))]
    report = lafn_edit(model, tok, fact, cfg, LANGS, progress=False)
    assert report["neighbor_prompts"] == texts and len(texts) == 4
    n_unrelated = len(report["kl_prompts"])
    assert seen[0][n_unrelated:] == want
    report = lafn_edit(copy.deepcopy(model), tok, fact, replace(cfg, neighbors=0), LANGS,
                       progress=False)
    assert report["neighbor_prompts"] == [] and len(seen[1]) == n_unrelated


def test_unrelated_questions_carry_their_answer_before_the_continuation(tok):
    """The KL term's questions get their short answer (teacher-forced, as locality probes are
    scored) between the question and the model's continuation; statements do not."""
    from editcomp.edit.unrelated import unrelated_prompts
    from editcomp.eval.edit_metrics import encode_prompt_target

    model = tiny_model()
    cfg = LAFNConfig(kl_per_lang=2, kl_continuation=2)
    with_ans, without = (unrelated_prompts(model, tok, ["en"], replace(cfg, kl_answers=a))
                         for a in (True, False))
    question, statement = with_ans.texts
    assert kl_answer(question) == ("en", "Herman Melville") and kl_answer(statement) is None
    p, ans = encode_prompt_target(tok, question, "Herman Melville", "en")
    assert with_ans.ends[0] == len(p) - 1 == without.ends[0]
    assert list(with_ans.ids[0][:len(p) + len(ans)]) == p + ans
    assert len(with_ans.ids[0]) == len(p) + len(ans) + 2 and len(without.ids[0]) == len(p) + 2
    assert with_ans.ids[1] == without.ids[1]  # the statement: its own continuation only


def test_a_fact_edited_alone_reads_shorter_continuations_than_facts_edited_together(tok):
    """By default a fact edited alone's unrelated prompts carry 4 tokens of the unedited model's
    continuation and a batch's 8 (``LAFNConfig.continuation_for``), the same greedy tokens cut
    shorter; a set ``kl_continuation`` holds for both."""
    from editcomp.edit.unrelated import unrelated_prompts

    model = tiny_model()
    cfg = LAFNConfig(kl_per_lang=2)
    assert (cfg.continuation_for(1), cfg.continuation_for(3)) == (4, 8)
    alone, together = (unrelated_prompts(model, tok, ["en"], cfg, alone=a) for a in (True, False))
    assert (alone.continuation, together.continuation) == (4, 8)
    assert alone.ends == together.ends and alone.texts == together.texts
    assert all(t[:len(a)] == a for a, t in zip(alone.ids, together.ids))
    assert max(len(t) - len(a) for a, t in zip(alone.ids, together.ids)) == 4
    set_ = replace(cfg, kl_continuation=2)
    assert set_.continuation_for(1) == set_.continuation_for(3) == 2


def test_prompts_made_for_the_other_mode_are_refused_before_any_change(tok, fact):
    """A single edit handed a batch's unrelated prompts (or a batch a single edit's questions)
    would read other continuations than its own, slower or weaker and silently: a clear error,
    and the model is untouched."""
    from editcomp.edit.unrelated import given_questions, unrelated_prompts

    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = LAFNConfig(kl_per_lang=2, steps=2, stop_nll=None, batch_questions=0)
    batch_prompts = unrelated_prompts(model, tok, LANGS, cfg)
    with pytest.raises(ValueError, match="unrelated carry 8-token continuations; a fact edited "
                                         "alone read 4 .make them with alone=True"):
        lafn_edit(model, tok, fact, cfg, LANGS, progress=False, unrelated=batch_prompts)
    asked = [Question("en", "Who wrote Hamlet?", "Shakespeare", "test")]
    single_pool = given_questions(model, tok, asked, ["en"], cfg, alone=True)
    two = load_facts(EXAMPLE_FACTS, langs=LANGS, limit=2)
    with pytest.raises(ValueError, match="questions carry 4-token continuations; facts edited "
                                         "together read 8"):
        lafn_edit(model, tok, two, cfg, LANGS, progress=False, questions=single_pool)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # made for its mode, or with a set continuation for both, it is taken
    lafn_edit(model, tok, fact, cfg, LANGS, progress=False,
              unrelated=unrelated_prompts(model, tok, LANGS, cfg, alone=True))


def test_the_candidate_nll_is_the_softmax_over_the_target_and_the_top_tokens(tok, fact):
    """Per target token: -log softmax over {target} + the full logits' top 8 (each token once),
    averaged per pair; ``refresh`` gives the exact full-vocabulary losses."""
    model, items, kl, _ = planted(tok, fact)
    runner = ModelRunner(model, tok)
    pairs = [(list(it.prompt_ids), list(it.target_ids)) for it in items]
    full, cand = TrainBatch(runner, pairs, []), TrainBatch(runner, pairs, [], nll_vocab=8)
    for b in (full, cand):
        b.prepare(runner, 0)
    with torch.no_grad():
        full.losses(runner, 0, keep_logits=True, full=True)
        logits = full.full_logits
        want = []
        for r, label in enumerate(full.labels):
            s = sorted(set(logits[r].topk(8).indices.tolist()) | {label})
            want.append(float(logits[r, label] - logits[r, s].logsumexp(-1)) * -1)
        want = full._per_pair(torch.tensor(want))
        got = cand.losses(runner, 0)[0]
        assert torch.allclose(got, want, atol=1e-5)
        exact = full.losses(runner, 0)[0]
        assert (got <= exact + 1e-6).all() and torch.allclose(cand.nll_start, exact, atol=1e-5)
        assert torch.allclose(cand.refresh(runner, 0)[0], exact, atol=1e-5)


def test_kept_output_rows_give_the_same_losses_and_follow_a_refresh(tok, fact):
    """A batch that keeps the output rows of its KL tokens and NLL candidates (``row_cache``)
    scores exactly as one that gathers them at every step, also after the model moves and a
    ``refresh`` picks new candidates; rows over the budget are not kept."""
    model, items, kl, last = planted(tok, fact)
    runner = ModelRunner(model, tok)
    pairs = [(list(it.prompt_ids), list(it.target_ids)) for it in items]
    kept, each = (TrainBatch(runner, pairs, kl, kl_vocab=16, nll_vocab=8, row_cache=budget)
                  for budget in (64 << 20, 0))
    for b in (kept, each):
        b.prepare(runner, 0)
    assert each.top_rows is None and each.cand_rows is None
    w = get_adapter(model).lm_head.weight
    assert torch.equal(kept.top_rows, w[kept.top].mT) and torch.equal(kept.cand_rows, w[kept.cand].mT)
    down = get_adapter(model).layer(last).down.weight
    with torch.no_grad():
        for _ in range(2):
            for got, want in zip(kept.losses(runner, 0), each.losses(runner, 0)):
                assert torch.equal(got, want)
            old = kept.cand.clone()
            down.add_(torch.randn_like(down) * 0.5)
            kept.refresh(runner, 0), each.refresh(runner, 0)
        assert not torch.equal(kept.cand, old)  # the refresh changed the candidates
        assert torch.equal(kept.cand_rows, w[kept.cand].mT)
    small = TrainBatch(runner, pairs, kl, kl_vocab=16, nll_vocab=8,
                       row_cache=kept.top_rows.numel() * w.element_size() - 1)
    small.prepare(runner, 0)
    assert small.top_rows is None and small.cand_rows is not None
    # under bf16 autocast the rows are kept as its matmuls read them, in bf16, and score as
    # rows gathered at each call do
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept, each = (TrainBatch(runner, pairs, kl, kl_vocab=16, nll_vocab=8, row_cache=budget)
                      for budget in (64 << 20, 0))
        for b in (kept, each):
            b.prepare(runner, 0)
        assert kept.top_rows.dtype == torch.bfloat16 and kept.cand_rows.dtype == torch.bfloat16
        with torch.no_grad():
            for got, want in zip(kept.losses(runner, 0), each.losses(runner, 0)):
                assert torch.equal(got, want)


def test_the_text_penalty_is_the_output_change_on_that_text():
    """With unrelated text's activations, the penalty's numerator is the mean squared change of the
    down projection's output there: zero for changes that cancel on co-firing neurons, which the
    plain norm penalty still charges."""
    from editcomp.edit.lafn import NeuronDeltas
    model = tiny_model()
    down = get_adapter(model).layer(1).down
    x = torch.randn(40, down.in_features)
    x[:, 4] = x[:, 3]  # neurons 3 and 4 always fire together on this text
    acts = torch.zeros(get_adapter(model).num_layers, 40, down.in_features)
    acts[1] = x
    for text in (acts, None):
        d = NeuronDeltas(model, {1: [3, 4, 9]}, text)
        with torch.no_grad():
            d.u[1].copy_(torch.randn_like(d.u[1]))
            with d:
                out = down(x)
            change = (out - down(x)).pow(2).sum(1).mean()
            if text is not None:
                assert torch.allclose(d.relative_norm() * sum(d.col_sq.values()), change, rtol=1e-4)
            d.u[1][0] = -d.u[1][1]  # neuron 3's change undoes neuron 4's on this text
            d.u[1][2] = 0
        if text is not None:
            assert float(d.relative_norm()) < 1e-10
        else:
            assert float(d.relative_norm()) > 1e-3


def down_per_sequence(model, tokenizer, seqs, layer, outputs=False) -> list[torch.Tensor]:
    """down_proj's input (or output) in ``layer`` at every position of each of ``seqs``, run one
    at a time (no padding) -> ``[len(seq), width]`` each."""
    runner, box = ModelRunner(model, tokenizer), []
    down = get_adapter(model).layer(layer).down
    h = (down.register_forward_hook(lambda m, a, out: box.append(out.detach()[0])) if outputs
         else down.register_forward_pre_hook(lambda m, a: box.append(a[0].detach()[0])))
    try:
        with torch.no_grad():
            for sq in seqs:
                runner.adapter.decoder(input_ids=torch.tensor([sq]), use_cache=False)
    finally:
        h.remove()
    return box


def test_the_preservation_term_is_the_output_change_on_generic_text(tok):
    """activation_moments is X^T X / n over the real (unpadded) tokens, and the preservation
    term built from it is the mean squared change of down's output on that text, relative to
    the edited columns' own output there."""
    from editcomp.edit.lafn import NeuronDeltas
    from editcomp.edit.locate import activation_moments
    model = tiny_model()
    runner = ModelRunner(model, tok)
    seqs = [tok("The capital of Japan is Tokyo.")["input_ids"], tok("Paris")["input_ids"]]
    down = get_adapter(model).layer(1).down
    x = torch.cat(down_per_sequence(model, tok, seqs, 1))
    moments = activation_moments(runner, seqs, [1])
    assert torch.allclose(moments[1], x.T @ x / x.shape[0], rtol=1e-4, atol=1e-8)
    d = NeuronDeltas(model, {1: [3, 4, 9]}, moments=moments)
    with torch.no_grad():
        d.u[1].copy_(torch.randn_like(d.u[1]))
        with d:
            out = down(x)
        change = (out - down(x)).pow(2).sum(1).mean()
    own = sum((down.weight[:, i].pow(2).sum() * x[:, i].pow(2).mean()) for i in (3, 4, 9))
    assert torch.allclose(d.preservation() * own, change, rtol=1e-3)
    assert float(d.preservation()) > 0


def test_moments_at_given_positions_count_only_those_positions(tok):
    """activation_moments(positions=...) is X^T X / n over exactly those positions (here the
    answer positions of two sequences of different lengths, batched with padding)."""
    from editcomp.edit.locate import activation_moments
    model = tiny_model()
    runner = ModelRunner(model, tok)
    seqs = [tok("Who wrote the long novel? Herman")["input_ids"], tok("Where is it?")["input_ids"]]
    positions = [[len(seqs[0]) - 2, len(seqs[0]) - 1], [len(seqs[1]) - 1]]
    x = torch.cat([b[pos] for b, pos in zip(down_per_sequence(model, tok, seqs, 1), positions)])
    moments = activation_moments(runner, seqs, [1], positions=positions)
    assert torch.allclose(moments[1], x.T @ x / 3, rtol=1e-4, atol=1e-8)
    everywhere = activation_moments(runner, seqs, [1])
    assert not torch.allclose(moments[1], everywhere[1], rtol=1e-2)


def test_answer_preservation_is_the_preservation_term_on_the_answer_moments(tok):
    from editcomp.edit.lafn import NeuronDeltas
    model = tiny_model()
    c = torch.randn(64, get_adapter(model).layer(1).down.weight.shape[1])
    moments = {1: c.T @ c / 64}
    d = NeuronDeltas(model, {1: [3, 4, 9]}, answer_moments=moments)
    with torch.no_grad():
        d.u[1].copy_(torch.randn_like(d.u[1]))
    assert float(d.preservation()) == 0.0  # no generic text: that term is off
    same = NeuronDeltas(model, {1: [3, 4, 9]}, moments=moments)
    with torch.no_grad():
        same.u[1].copy_(d.u[1])
    assert torch.allclose(d.answer_preservation(), same.preservation())
    assert float(d.answer_preservation()) > 0


def test_answer_preservation_keeps_a_single_edit_off_the_questions_answers(tok, fact):
    """A fact edited alone with ``answer_preserve`` changes down_proj's output where the pool's
    questions are answered less than without it: the pool's answer moments reach the optimizer."""
    from editcomp.edit.unrelated import unrelated_prompts, with_answer_activations
    model, _, _, _ = planted(tok, fact)
    texts = ("The weather was mild and the river ran quietly past the town. Where is the river?",
             "Who painted the ceiling of the chapel in the town by the river?")
    cfg = LAFNConfig(locate=LocateConfig(min_layer=0.0, top_frac=0.05), steps=30, lr=2.0,
                     norm_weight=0.0, kl_weight=0.0, preserve_weight=0.0, batch_questions=0)
    pool = with_answer_activations(model, tok, unrelated_prompts(
        model, tok, LANGS, replace(cfg, kl_prompts=texts, kl_answers=False, kl_continuation=4)))
    seqs = [list(p) for p in pool.ids]
    layers = [get_adapter(model).num_layers - 2, get_adapter(model).num_layers - 1]
    answers = [list(range(e, len(p))) for p, e in zip(pool.ids, pool.ends)]

    def at_answers(m):
        return [torch.cat([b[pos] for b, pos in zip(down_per_sequence(m, tok, seqs, li, True),
                                                    answers)]) for li in layers]

    before = at_answers(model)
    changes = []
    for weight in (0.0, 10.0, None):  # None: a fact edited alone takes SINGLE_ANSWER_PRESERVE
        m = copy.deepcopy(model)
        report = lafn_edit(m, tok, fact, replace(cfg, answer_preserve=weight), LANGS,
                           progress=False, questions=pool)
        assert report["neurons"]["total"] > 0
        assert report["answer_preserve"] == (10.0 if weight is None else weight)
        changes.append(sum(float((a - b).pow(2).mean()) for a, b in zip(at_answers(m), before)))
    assert changes[0] > 0 and changes[1] < 0.5 * changes[0] and changes[2] == changes[1]


def test_kl_groups_rotate_the_unrelated_prompts_over_steps(tok, fact):
    """Each batch carries a share of the KL prompts; a round of batches covers all of them once."""
    from editcomp.edit.runner import build_batches
    model, items, kl, _ = planted(tok, fact)
    runner = ModelRunner(model, tok)
    pairs = [(list(it.prompt_ids), list(it.target_ids)) for it in items]
    kl = kl * 3  # 6 or more prompts
    batches = build_batches(runner, pairs, kl, batch_size=64, kl_groups=3)
    assert len(batches) == 3 and all(b.n_pairs == len(pairs) for b in batches)
    seen = sorted(tuple(b.ids[b.n_pairs + k, :len(p)].tolist())
                  for b in batches for k, p in enumerate(kl[batches.index(b)::3]))
    assert seen == sorted(tuple(p) for p in kl)
    assert [b.n_kl for b in batches] == [len(kl[g::3]) for g in range(3)]


def _target_nll(model, tok, items):
    runner = ModelRunner(model, tok)
    out = []
    with torch.no_grad():
        for it in items:
            ids, mask = right_pad([list(it.prompt_ids) + list(it.target_ids)], runner.pad, runner.device)
            h = runner.hidden(ids, mask)
            p = len(it.prompt_ids)
            logits = runner.head(h[0, p - 1:p - 1 + len(it.target_ids)])
            out.append(float(torch.nn.functional.cross_entropy(logits, torch.tensor(it.target_ids))))
    return sum(out) / len(out)


@pytest.mark.parametrize("autocast", ["off", "bf16"])
def test_lafn_edit_takes_and_only_located_columns_change(tok, fact, autocast):
    """In fp32 and with bf16 matmuls in the update steps (LAFNConfig.autocast): the same claims."""
    model, items, kl, last = planted(tok, fact)
    before = copy.deepcopy(model.state_dict())
    nll0 = _target_nll(model, tok, items)
    m0 = edit_metrics(model, tok, fact, LANGS, progress=False)
    # a random tiny model's activations are small, so its deltas must be large: no norm penalty here.
    # 160 steps: at 80 the bf16 run held en at 2 of 3 target tokens on a CPU without native bf16
    # The update's mechanics only: no answer-position preservation or selective ranking (a fact
    # edited alone's defaults; their own tests are apart), so no questions sampled from a random model
    cfg = LAFNConfig(locate=LocateConfig(min_layer=0.0, top_frac=0.1, share=0.9, generic_share=None,
                                         selectivity=0.0),
                     steps=160, lr=2.0, answer_preserve=0.0,
                     norm_weight=0.0, kl_weight=2.0, autocast=autocast)
    report = lafn_edit(model, tok, fact, cfg, LANGS, progress=False)
    assert report["train_matmuls"] == ("float32" if autocast == "off" else "bfloat16")
    m1 = edit_metrics(model, tok, fact, LANGS, progress=False)
    assert _target_nll(model, tok, items) < 0.5 * nll0
    for lang in LANGS:
        assert m0[lang]["reliability"]["em"] == 0.0 and m1[lang]["reliability"]["em"] == 1.0
    # locality on the tiny random model is not asserted here: its neurons fire everywhere and the
    # en probe ("The capital of Japan is") flips to the edit's first token; see the KL test below
    # only located down_proj columns changed, every other weight is bit-identical
    changed = {}
    for name, w in model.state_dict().items():
        if not torch.equal(w, before[name]):
            changed[name] = (w != before[name])
    hist = report["neurons"]["layer_histogram"]
    downs = {f"model.layers.{i}.mlp.down_proj.weight": i for i in range(len(hist))}  # the tiny model's names
    assert changed and set(changed) <= set(downs)
    for name, diff in changed.items():
        cols = diff.any(0).nonzero().flatten().tolist()
        assert 0 < len(cols) <= hist[downs[name]]
    assert report["neurons"]["total"] == sum(hist) > 0
    assert report["losses"]["nll_end"] < report["losses"]["nll_start"]


def test_sequential_edits_each_fact(tok):
    facts = load_facts(EXAMPLE_FACTS, langs=["en"], limit=2)
    model = tiny_model("llama")
    with torch.no_grad():
        get_adapter(model).lm_head.weight.mul_(SCALE)
    report = lafn_edit(model, tok, facts, LAFNConfig(sequential=True, steps=40, lr=2.0, norm_weight=0.0,
                                                     locate=LocateConfig(min_layer=0.0, top_frac=0.05)),
                       ["en"], progress=False)
    assert report["mode"] == "sequential" and len(report["locate"]["facts"]) == 2
    m = edit_metrics(model, tok, facts, ["en"], progress=False)
    assert m["en"]["reliability"]["acc"] >= 0.5


def test_ftl_changes_only_its_layer_within_the_constraint(tok, fact):
    model = tiny_model("gemma3")
    before = copy.deepcopy(model.state_dict())
    report = ftl_edit(model, tok, fact, FTLConfig(layer=0, lr=1e-2, steps=5, norm_constraint=1e-3),
                      LANGS, progress=False)
    changed = [n for n, w in model.state_dict().items() if not torch.equal(w, before[n])]
    name = "model.layers.0.mlp.down_proj.weight"
    assert changed == [name]
    assert (model.state_dict()[name] - before[name]).abs().max() <= 1e-3 + 1e-7
    assert report["layer"] == 0 and report["losses"]["nll_end"] < report["losses"]["nll_start"]
    assert FTLConfig().resolve_layer(18) == 12 and FTLConfig().resolve_layer(30) == 20


@pytest.mark.parametrize("pack", [None, 64])
def test_ftl_objectives_score_the_target_where_easyedit_does(tok, fact, pack):
    """target_new: each target token teacher-forced at the position before it; prompt_last: every
    target token at the prompt's last position, the target not fed in. Both against the model's
    own forward, on three-token targets (where the two differ)."""
    model = tiny_model("gemma3")
    runner = ModelRunner(model, tok)
    items = training_items(fact, tok, LANGS, paraphrases=1)
    pairs = [(list(it.prompt_ids), list(it.target_ids) + [5, 9]) for it in items]
    with torch.no_grad():
        want = {"target_new": [], "prompt_last": []}
        for p, t in pairs:
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + t])).logits[0], -1)
            want["target_new"].append(-logp[torch.arange(len(p) - 1, len(p) + len(t) - 1),
                                            torch.tensor(t)].mean())
            last = torch.log_softmax(model(input_ids=torch.tensor([p])).logits[0, -1], -1)
            want["prompt_last"].append(-last[torch.tensor(t)].mean())
        for objective, nll in want.items():
            b = TrainBatch(runner, pairs, [], pack=pack, prompt_last=objective == "prompt_last")
            b.prepare(runner, 1)
            got = b.losses(runner, 1, full=True)[0]
            torch.testing.assert_close(got, torch.stack(nll), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(torch.stack(want["target_new"]), torch.stack(want["prompt_last"]))


def test_ftl_defaults_to_easyedit_prompt_last_and_lowers_it(tok, fact):
    """The default FT-L (prompt_last, EasyEdit's stop rule) raises the target tokens' probability
    at the prompt's end, measured with the model's own forward before and after."""
    model = confident(tiny_model("gemma3"))
    items = training_items(fact, tok, LANGS, paraphrases=2)

    def at_prompt_end():
        with torch.no_grad():
            return sum(-torch.log_softmax(model(input_ids=torch.tensor([it.prompt_ids])).logits[0, -1],
                                          -1)[list(it.target_ids)].mean() for it in items) / len(items)

    before = at_prompt_end()
    report = ftl_edit(model, tok, fact, FTLConfig(layer=1, lr=1e-2, steps=10), LANGS, progress=False)
    assert report["config"]["objective"] == "prompt_last" and report["config"]["stop_nll"] == 1e-2
    assert at_prompt_end() < before - 0.5
    torch.testing.assert_close(torch.tensor(report["losses"]["nll_start"]), before)
    with pytest.raises(ConfigError, match="objective must be one of prompt_last, target_new"):
        FTLConfig(objective="prompt-last").validate()


def test_a_target_that_tokenizes_to_nothing_names_file_line_and_field(tok, tmp_path):
    from tokenizers import normalizers

    stripping = copy.deepcopy(tok)
    stripping.backend_tokenizer.normalizer = normalizers.Replace("§", "")
    path = tmp_path / "f.jsonl"
    path.write_text('{"case_id": "a", "langs": {"en": {"prompt": "The sign is", "target": "§"}}}\n')
    facts = load_facts(path)
    with pytest.raises(DataError, match=r"f\.jsonl:1: field 'langs\.en\.target': target '§' tokenizes to no"):
        training_items(facts, stripping)


def test_autocast_modes_resolve_and_a_bad_one_is_a_config_error():
    from editcomp.device import autocast_dtype, native_bf16
    from editcomp.errors import ConfigError
    assert autocast_dtype("cpu", "off") is None
    assert autocast_dtype("cpu", "bf16") == torch.bfloat16
    assert autocast_dtype("cpu", "auto") == (torch.bfloat16 if native_bf16("cpu") else None)
    with pytest.raises(ConfigError, match="autocast must be one of auto, bf16, off"):
        LAFNConfig(autocast="fp8").validate()
    with pytest.raises(ConfigError, match="unknown autocast mode"):
        autocast_dtype("cpu", "fp8")
    with pytest.raises(ConfigError, match="attention must be a kernel name or None"):
        LAFNConfig(attention="").validate()


def _first_step_change(tok, facts, lr):
    """The largest weight change one Adam step makes (Adam's first step moves every entry by
    the lr, in units of its column's RMS) and the report."""
    model = tiny_model("llama")
    before = [lp.down.weight.detach().clone() for lp in get_adapter(model).layers()]
    cfg = LAFNConfig(locate=LocateConfig(min_layer=0.0, top_frac=0.05), steps=1, stop_nll=None,
                     lr=lr, norm_weight=0.0, kl_weight=0.0, preserve_weight=0.0)
    report = lafn_edit(model, tok, facts, cfg, ["en"], progress=False)
    change = max(float((lp.down.weight.detach() - w).abs().max())
                 for lp, w in zip(get_adapter(model).layers(), before))
    return change, report


def test_one_fact_gets_the_single_lr_and_a_batch_the_batch_lr_and_nll_floor(tok, monkeypatch):
    """... and the eager attention kernel for one fact, the model's own for a batch; and the
    answer-position preservation and selective neuron ranking for a fact edited alone only."""
    import editcomp.edit.lafn as lafn_mod
    from editcomp.edit.lafn_config import (BATCH_LR, BATCH_NLL_FLOOR, SINGLE_ANSWER_PRESERVE,
                                           SINGLE_LR)
    kernels = []

    def spy(model, name):
        kernels.append(name)
        return attention_kernel(model, name)
    monkeypatch.setattr(lafn_mod, "attention_kernel", spy)
    one = load_facts(EXAMPLE_FACTS, langs=["en"], limit=1)
    auto, rep = _first_step_change(tok, one, None)
    half, rep_half = _first_step_change(tok, one, SINGLE_LR / 2)
    assert rep["learning_rate"] == SINGLE_LR and rep_half["learning_rate"] == SINGLE_LR / 2
    assert rep["nll_floor"] == 0.0
    assert auto == pytest.approx(2 * half, rel=1e-3)  # the lr reached the optimizer
    two = load_facts(EXAMPLE_FACTS, langs=["en"], limit=2)
    batch = _first_step_change(tok, two, None)[1]
    assert batch["learning_rate"] == BATCH_LR and batch["nll_floor"] == BATCH_NLL_FLOOR
    seq = lafn_edit(tiny_model("llama"), tok, two, LAFNConfig(sequential=True, steps=1,
                    locate=LocateConfig(min_layer=0.0, top_frac=0.05)), ["en"], progress=False)
    assert seq["learning_rate"] == SINGLE_LR and seq["nll_floor"] == 0.0  # one fact at a time
    assert kernels == ["eager", "eager", None, "eager", "eager"]
    assert rep["attention"] == seq["attention"] == "eager"
    assert batch["attention"] == "the model's own"
    for report, alone in ((rep, True), (seq, True), (batch, False)):
        assert report["answer_preserve"] == (SINGLE_ANSWER_PRESERVE if alone else 0.0)
        assert report["selectivity"] == (1.0 if alone else 0.0)
    assert LAFNConfig(answer_preserve=3.0).answer_preserve_for(2) == 3.0
    assert LocateConfig(selectivity=0.5).selectivity_for(1) == 0.5
    assert LAFNConfig(attention="sdpa").attention_for(1) == "sdpa"
    assert LAFNConfig(attention=None).attention_for(1) is None


def _record_optimize_calls(monkeypatch, keyword: str) -> list:
    """Make lafn's ``optimize`` run one step and record each call's (steps, ``keyword``): what
    the edit resolved is what counts, not the training."""
    import editcomp.edit.lafn as lafn_mod
    calls, real = [], lafn_mod.optimize

    def spy(runner, batches, params, start, steps, lr, **kw):
        calls.append((steps, kw[keyword]))
        return real(runner, batches, params, start, 1, lr, **kw)
    monkeypatch.setattr(lafn_mod, "optimize", spy)
    return calls


def test_a_batch_runs_more_steps_with_a_decaying_lr_and_a_fact_alone_fewer_at_a_constant_one(
        tok, monkeypatch):
    """Unset, ``steps`` and ``lr_decay`` resolve per mode: SINGLE_STEPS and no decay for a fact
    edited alone (also --sequential), BATCH_STEPS and a decay for facts edited together; what
    is set wins. The resolved values reach ``optimize`` and the report."""
    from editcomp.edit.lafn_config import BATCH_STEPS, SINGLE_STEPS
    calls = _record_optimize_calls(monkeypatch, "lr_decay")
    one = load_facts(EXAMPLE_FACTS, langs=["en"], limit=1)
    two = load_facts(EXAMPLE_FACTS, langs=["en"], limit=2)
    where = LocateConfig(min_layer=0.0, top_frac=0.05)
    reports = [lafn_edit(tiny_model("llama"), tok, facts, LAFNConfig(locate=where, **kw), ["en"],
                         progress=False)
               for facts, kw in ((one, {}), (two, {}), (two, {"sequential": True}),
                                 (two, {"steps": 7, "lr_decay": False}))]
    assert calls == [(SINGLE_STEPS, False), (BATCH_STEPS, True), (SINGLE_STEPS, False),
                     (SINGLE_STEPS, False), (7, False)]
    assert SINGLE_STEPS < BATCH_STEPS
    assert [(r["steps"], r["lr_decay"]) for r in reports] == [
        (SINGLE_STEPS, False), (BATCH_STEPS, True), (SINGLE_STEPS, False), (7, False)]
    assert LAFNConfig(steps=9).steps_for(1) == 9 and not LAFNConfig(lr_decay=True).lr_decay_for(1)


def test_the_callers_questions_take_a_stronger_kl(tok, monkeypatch):
    """Unset, facts edited together whose KL term holds the caller's questions take
    GIVEN_BATCH_KL_WEIGHT over GIVEN_BATCH_STEPS; a fact alone with them as its risk questions
    takes GIVEN_SINGLE_KL_WEIGHT over its usual steps; a batch that takes none of them
    (batch_questions 0) and a fact alone without risk questions keep KL_WEIGHT; set values win.
    The resolved values reach ``optimize`` and the report."""
    from editcomp.data import Question
    from editcomp.edit.unrelated import given_questions
    from editcomp.edit.lafn_config import (BATCH_STEPS, GIVEN_BATCH_KL_WEIGHT, GIVEN_BATCH_STEPS,
                                           GIVEN_SINGLE_KL_WEIGHT, KL_WEIGHT, SINGLE_STEPS)
    calls = _record_optimize_calls(monkeypatch, "kl_weight")
    model = tiny_model("llama")
    asked = [Question("en", "Who built the old bridge?", "Karl Berg", "q:1"),
             Question("en", "Who painted the ceiling?", "Ada", "q:2")]
    where = LocateConfig(min_layer=0.0, top_frac=0.05)
    pool = given_questions(model, tok, asked, ["en"], LAFNConfig(kl_continuation=2))
    one = load_facts(EXAMPLE_FACTS, langs=["en"], limit=1)
    two = load_facts(EXAMPLE_FACTS, langs=["en"], limit=2)
    runs = ((two, {}), (one, {}), (one, {"risk_questions": 0}), (two, {"batch_questions": 0}),
            (two, {"kl_weight": 3.0, "steps": 5}))
    reports = [lafn_edit(model, tok, facts, LAFNConfig(locate=where, kl_continuation=2, **kw),
                         ["en"], progress=False, questions=pool) for facts, kw in runs]
    expected = [(GIVEN_BATCH_STEPS, GIVEN_BATCH_KL_WEIGHT), (SINGLE_STEPS, GIVEN_SINGLE_KL_WEIGHT),
                (SINGLE_STEPS, KL_WEIGHT), (BATCH_STEPS, KL_WEIGHT), (5, 3.0)]
    assert calls == expected and min(GIVEN_BATCH_KL_WEIGHT, GIVEN_SINGLE_KL_WEIGHT) > KL_WEIGHT
    assert [(r["steps"], r["kl_weight"]) for r in reports] == expected
    assert LAFNConfig().kl_weight_for(2) == KL_WEIGHT == LAFNConfig().kl_weight_for(1)


def test_keep_questions_keeps_new_questions_without_an_edited_subject():
    from editcomp.edit.questions import keep_questions
    shots = ["Who wrote the novel Moby-Dick?"]
    lines = ["Who built the Eiffel Tower?", "Paris is a city.", " Who built the Eiffel Tower? ",
             "Wer?", "Who wrote the novel Moby-Dick?", "Where was the STATUE of liberty made?",
             "谁发明了纸张？"]
    assert keep_questions(lines, shots, ["Statue of Liberty"], min_chars=6) == [
        "Who built the Eiffel Tower?", "谁发明了纸张？"]


def test_the_few_shot_list_alternates_entity_and_general_questions_in_the_language():
    from editcomp.edit.questions import ENTITY_QUESTIONS, few_shot_questions
    for lang in ("en", "de", "fr", "es", "zh"):
        shots = few_shot_questions(lang)
        assert shots[0::2] == list(ENTITY_QUESTIONS[lang])
        assert all(q in KL_PROMPTS[lang] for q in shots[1::2]) and len(shots) == 16
    assert few_shot_questions("ja") == few_shot_questions("en")  # no list of its own
    assert few_shot_questions("de-AT") == few_shot_questions("de")


def test_sampled_questions_are_reproducible_and_leave_the_callers_random_state(tok):
    from editcomp.edit.questions import sample_questions
    model = tiny_model("llama")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    lines = [sample_questions(model, tok, "en", 6, seed=s, max_new_tokens=4) for s in (0, 0)]
    assert torch.equal(torch.rand(3), expected)  # the sampling drew from a forked generator
    assert lines[0] == lines[1]


def test_a_batch_adds_sampled_questions_except_those_naming_an_edited_subject(tok):
    from editcomp.edit.unrelated import unrelated_prompts
    facts = load_facts(EXAMPLE_FACTS, langs=["en"], limit=2)
    subject = facts[0].langs["en"].subject
    model = tiny_model("llama")
    asked, about = "Who painted the ceiling of the chapel?", f"Who built the {subject}?"
    # one pool for both modes: a set continuation holds for both (continuation_for)
    cfg = LAFNConfig(locate=LocateConfig(min_layer=0.0, top_frac=0.05), steps=1, stop_nll=None,
                     kl_continuation=4)
    questions = unrelated_prompts(model, tok, ["en"], replace(cfg, kl_prompts=(asked, about),
                                                              kl_answers=False))
    batch = lafn_edit(model, tok, facts, cfg, ["en"], progress=False, questions=questions)
    assert batch["sampled_questions"] == 1
    assert asked in batch["kl_prompts"] and about not in batch["kl_prompts"]
    single = lafn_edit(model, tok, facts[:1], cfg, ["en"], progress=False, questions=questions)
    assert single["sampled_questions"] == 0 and asked not in single["kl_prompts"]
    off = lafn_edit(model, tok, facts, replace(cfg, batch_questions=0), ["en"], progress=False,
                    questions=questions)
    assert off["sampled_questions"] == 0 and asked not in off["kl_prompts"]


def test_nll_floor_stops_pushing_the_pairs_already_below_it(tok, fact):
    """With the floor between two pairs' NLLs, one step moves the deltas exactly as that step on
    the pair above the floor alone would (the pair below contributes no gradient); with the
    floor above both, nothing moves."""
    from editcomp.edit.lafn import NeuronDeltas
    from editcomp.edit.runner import build_batches, frozen
    from editcomp.edit.update import optimize
    model, items, _, last = planted(tok, fact)
    runner = ModelRunner(model, tok)
    pairs = [(list(it.prompt_ids), list(it.target_ids)) for it in items]
    probe = TrainBatch(runner, pairs, [])
    probe.prepare(runner, 0)
    order = probe.nll_start.argsort()
    low, high = pairs[int(order[0])], pairs[int(order[-1])]
    gap = probe.nll_start[order[[0, -1]]]
    assert gap[1] - gap[0] > 0.1
    floor = float(gap.mean())

    def one_step(step_pairs, nll_floor):
        deltas = NeuronDeltas(model, {last: [NEURON]})
        with frozen(model), deltas:
            batches = build_batches(runner, step_pairs, [], batch_size=64)
            optimize(runner, batches, deltas.params(), 0, steps=1, lr=0.1, nll_floor=nll_floor)
        return deltas.delta(last).detach()

    both, alone = one_step([low, high], floor), one_step([high], 0.0)
    assert both.abs().max() > 0 and torch.allclose(both, alone, atol=1e-6)
    assert one_step([low, high], float(gap[1]) + 1.0).abs().max() == 0


def _optimize_planted(tok, fact, monkeypatch, wreck_after: int | None = None, **kw):
    """``optimize`` on the planted fact's neuron -> (its result, the Adam it ran);
    ``wreck_after``: the deltas are zeroed after that many steps (the edit is undone)."""
    from editcomp.edit.lafn import NeuronDeltas
    from editcomp.edit.runner import build_batches, frozen
    from editcomp.edit.update import optimize
    model, items, _, last = planted(tok, fact)
    runner = ModelRunner(model, tok)
    pairs = [(list(it.prompt_ids), list(it.target_ids)) for it in items]
    made = []
    adam = torch.optim.Adam
    monkeypatch.setattr(torch.optim, "Adam", lambda *a, **k: made.append(adam(*a, **k)) or made[-1])
    deltas = NeuronDeltas(model, {last: [NEURON]})
    if wreck_after is not None:
        done = []

        def wreck():
            done.append(1)
            if len(done) == wreck_after:
                for u in deltas.params():
                    u.zero_()
        kw["after_step"] = wreck
    with frozen(model), deltas:
        out = optimize(runner, build_batches(runner, pairs, [], batch_size=64), deltas.params(),
                       0, **kw)
    return out, made[0]


def test_lr_growth_multiplies_the_lr_after_every_period(tok, fact, monkeypatch):
    out, opt = _optimize_planted(tok, fact, monkeypatch, steps=7, lr=0.1, lr_growth=(2.0, 3))
    assert out["steps"] == 7
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 2 ** 2)  # grown after steps 3 and 6
    _, flat = _optimize_planted(tok, fact, monkeypatch, steps=7, lr=0.1)
    assert flat.param_groups[0]["lr"] == 0.1


def test_an_edit_that_ends_short_of_its_target_keeps_its_best_step(tok, fact, monkeypatch):
    """Undone after 11 of 12 steps, the edit ends near where it began; with ``keep_best`` it
    writes the best state its steps saw instead: the one after 10 updates (the state after the
    11th was wrecked before any step read it), whose NLL is a 10-step run's."""
    kw = dict(steps=12, lr=0.3, stop_nll=None, wreck_after=11)
    last, _ = _optimize_planted(tok, fact, monkeypatch, **kw)
    kept, _ = _optimize_planted(tok, fact, monkeypatch, keep_best=True, **kw)
    assert last["best_step"] is None
    assert kept["best_step"] == 10 and kept["steps"] == 12
    ten, _ = _optimize_planted(tok, fact, monkeypatch, steps=10, lr=0.3, stop_nll=None)
    assert kept["nll_end"] == pytest.approx(ten["nll_end"], rel=1e-5)
    assert kept["nll_end"] < last["nll_end"] - 0.5
    # a run still descending at its last step keeps that step
    steady, _ = _optimize_planted(tok, fact, monkeypatch, steps=12, lr=0.3, stop_nll=None,
                                  keep_best=True)
    assert steady["best_step"] is None and steady["nll_end"] < kept["nll_end"]


def test_lr_decay_follows_a_cosine_to_zero_over_the_steps(tok, fact, monkeypatch):
    """Each step runs at ``lr * (1 + cos(pi * done / steps)) / 2``; a growing lr decays too."""
    import math
    used = []
    adam = torch.optim.Adam

    class Recording(adam):
        def step(self, *a, **k):
            used.append(self.param_groups[0]["lr"])
            return super().step(*a, **k)

    monkeypatch.setattr(torch.optim, "Adam", Recording)
    out, opt = _optimize_planted(tok, fact, monkeypatch, steps=4, lr=0.1, lr_decay=True,
                                 stop_nll=None)
    assert out["steps"] == 4
    assert used == pytest.approx([0.1 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    used.clear()
    _optimize_planted(tok, fact, monkeypatch, steps=4, lr=0.1, lr_growth=(2.0, 2), lr_decay=True,
                      stop_nll=None)
    assert used == pytest.approx([0.1, 0.1 * (1 + math.cos(math.pi / 4)) / 2,
                                  0.2 * (1 + math.cos(math.pi / 2)) / 2,
                                  0.2 * (1 + math.cos(math.pi * 3 / 4)) / 2])
    assert LAFNConfig(lr_decay=True).lr_decay_for(2) and not LAFNConfig(lr_decay=True).lr_decay_for(1)
    assert not LAFNConfig(lr_decay=False).lr_decay_for(2) and LAFNConfig().lr_decay_for(2)


def test_an_edit_whose_nll_stops_falling_stops_at_the_stall_window(tok, fact, monkeypatch):
    """At lr 0 the NLL never falls: the stall rule ends the edit one window in, where the
    same edit without it runs every step."""
    out, _ = _optimize_planted(tok, fact, monkeypatch, steps=50, lr=0.0, stall=(4, 0.1))
    assert out["stall_stopped"] and out["steps"] == 5
    out, _ = _optimize_planted(tok, fact, monkeypatch, steps=50, lr=0.0)
    assert not out["stall_stopped"] and out["steps"] == 50
    # a falling NLL is not a stall, even with no drop asked for
    out, _ = _optimize_planted(tok, fact, monkeypatch, steps=6, lr=0.1, stall=(4, 0.0))
    assert not out["stall_stopped"] and out["steps"] == 6


def test_lr_growth_the_stall_rule_and_packing_apply_to_a_fact_edited_alone():
    cfg = LAFNConfig(lr_growth=1.5, lr_growth_steps=8, stall_steps=12, stall_drop=0.2, pack=256)
    assert cfg.lr_growth_for(1) == (1.5, 8) and cfg.stall_for(1) == (12, 0.2)
    assert cfg.lr_growth_for(2) is None and cfg.stall_for(2) is None
    assert cfg.pack_for(1) == 256 and cfg.pack_for(2) is None
    assert cfg.keep_best_for(1) and not cfg.keep_best_for(2)
    assert not LAFNConfig(keep_best=False).keep_best_for(1)
    assert LAFNConfig(pack=None).pack_for(1) is None
    assert LAFNConfig(lr_growth=1.0).lr_growth_for(1) is None  # a constant lr
    assert LAFNConfig().lr_growth_for(1) == (2.0, 16)  # the default: doubled every 16 steps
    for bad, msg in (({"lr_growth": 0}, "lr_growth must be > 0"),
                     ({"stall_drop": 1.0}, "stall_drop must be in"),
                     ({"stall_steps": 0}, "stall_steps must be >= 1"),
                     ({"lr_growth_steps": 0}, "lr_growth_steps must be >= 1"),
                     ({"pack": 0}, "pack must be >= 1 or None")):
        with pytest.raises(ConfigError, match=msg):
            LAFNConfig(**bad).validate()


def test_mean_activations_average_each_sequence_over_its_positions(tok):
    """Batch by batch, padded: sequence k's row is the mean of |activation| at its positions."""
    from editcomp.edit.locate import activations_at, mean_activations
    runner = ModelRunner(tiny_model(), tok)
    seqs = [tok(t)["input_ids"] for t in ("The capital of France is Paris", "Hello",
                                          "Wer schrieb das Buch?")]
    positions = [[1, 3, 5], [0], [2, 4]]
    got = mean_activations(runner, seqs, positions, batch_size=2)
    for k, (s, pos) in enumerate(zip(seqs, positions)):
        want = activations_at(runner, [s], [pos]).mean(1)
        torch.testing.assert_close(got[:, k], want, rtol=1e-5, atol=1e-6)


def _pool(acts):
    from editcomp.edit.unrelated import UnrelatedPrompts
    n = acts.shape[1]
    return UnrelatedPrompts(tuple(f"q{k}?" for k in range(n)), tuple((k,) for k in range(n)),
                            (0,) * n, ("en",), acts)


def test_riskiest_ranks_the_pool_by_the_located_neurons_answer_activations():
    """Only the located neurons count, each layer weighted by its deltas' scale."""
    from editcomp.edit.unrelated import riskiest
    acts = torch.zeros(2, 4, 6)
    acts[1, 2, [2, 3]] = 1.0     # q2: both located neurons of layer 1
    acts[1, 0, 2] = 0.5          # q0: one of them, half as much
    acts[1, 3, 5] = 9.0          # q3: a neuron that is not located
    acts[0, 1, 0] = 0.3          # q1: layer 0's located neuron
    pool = _pool(acts)
    assert riskiest(pool, {1: [2, 3]}, 2) == [2, 0]
    assert riskiest(pool, {0: [0], 1: [2, 3]}, 2) == [2, 0]
    assert riskiest(pool, {0: [0], 1: [2, 3]}, 1, weight={0: 10.0, 1: 1.0}) == [1]
    assert riskiest(pool, {1: [2, 3]}, 9)[:2] == [2, 0]  # n above the pool: all of it
    with pytest.raises(ValueError, match="with_answer_activations"):
        riskiest(replace(pool, answer_acts=None), {1: [2]}, 1)


def test_a_fact_alone_takes_its_riskiest_questions_into_the_kl_term(tok, monkeypatch):
    """Single edits add the pool's riskiest questions (never one naming the subject) after the
    unrelated prompts; batches and risk_questions=0 do not, nor, by default, a sampled pool."""
    from editcomp.edit.unrelated import unrelated_prompts, with_answer_activations
    facts = load_facts(EXAMPLE_FACTS, langs=["en"], limit=2)
    subject = facts[0].langs["en"].subject
    model = tiny_model("llama")
    texts = ("Who painted the ceiling of the chapel?", "Who wrote the long novel?",
             "Where is the old bridge?", f"Who built the {subject}?")
    cfg = LAFNConfig(locate=LocateConfig(min_layer=0.0, top_frac=0.05), steps=1, stop_nll=None,
                     risk_questions=2, batch_questions=0, kl_continuation=4)  # both modes' pool
    asked = unrelated_prompts(model, tok, ["en"], replace(cfg, kl_prompts=texts, kl_answers=False))
    pool = with_answer_activations(model, tok, asked)
    assert pool.answer_acts.shape[:2] == (get_adapter(model).num_layers, 4)
    # a config's own pool: the activations only where it takes risk questions (a forward pass)
    assert torch.equal(with_answer_activations(model, tok, asked, cfg).answer_acts, pool.answer_acts)
    assert with_answer_activations(model, tok, asked, replace(
        cfg, risk_questions=0, answer_preserve=0.0)).answer_acts is None
    seen = spy_kl_prompts(monkeypatch)
    single = lafn_edit(copy.deepcopy(model), tok, facts[:1], cfg, ["en"], progress=False,
                       questions=pool)
    risky = single["risk_prompts"]
    assert len(risky) == 2 and set(risky) < set(texts[:3])
    n_unrelated = len(single["kl_prompts"])
    assert seen[-1][n_unrelated:] == [list(pool.ids[texts.index(t)]) for t in risky]
    off = lafn_edit(copy.deepcopy(model), tok, facts[:1], replace(cfg, risk_questions=0), ["en"],
                    progress=False, questions=pool)
    assert off["risk_prompts"] == [] and len(seen[-1]) == n_unrelated
    batch = lafn_edit(copy.deepcopy(model), tok, facts, cfg, ["en"], progress=False, questions=pool)
    assert batch["risk_prompts"] == []
    # unset: GIVEN_RISK_QUESTIONS (8; the pool holds 3 without the subject's) from the caller's
    # questions, none from sampled ones
    unset = replace(cfg, risk_questions=None, answer_preserve=0.0)
    assert with_answer_activations(model, tok, asked, unset).answer_acts is None
    assert with_answer_activations(model, tok, replace(asked, given=True), unset).answer_acts is not None
    for given, n in ((False, 0), (True, 3)):
        rep = lafn_edit(copy.deepcopy(model), tok, facts[:1], unset, ["en"], progress=False,
                        questions=replace(pool, given=given))
        assert len(rep["risk_prompts"]) == n


def test_answer_spans_are_names_and_dates_not_sentence_starts():
    from editcomp.edit.answers import answer_spans
    text = ("The Old Bridge was opened on 4 July 1944 by Mary Ann Lee . Rain Fell on the town "
            "in 1950 , and The Times said so ; Paris is far .")
    # "Rain Fell" starts a sentence; "The Old Bridge" and "The Times" start with a function word
    assert answer_spans(text) == ["Mary Ann Lee", "4 July 1944", "1950"]
    assert answer_spans("no capitals and no years here") == []


def test_draw_answers_is_reproducible_and_needs_spans():
    from editcomp.edit.answers import draw_answers
    spans = ["Ada Lovelace", "1815", "Charles Babbage"]
    drawn = draw_answers(spans, 50, seed=3)
    assert drawn == draw_answers(spans, 50, seed=3) and set(drawn) == set(spans)
    assert draw_answers(spans, 50, seed=4) != drawn
    assert draw_answers([], 0) == []
    with pytest.raises(ValueError, match="no names or dates"):
        draw_answers([], 1)


def test_foreign_answers_follow_each_question_where_its_own_answer_was(tok):
    """Each foreign row is the question's tokens then the span's, exactly as the joined text
    tokenizes (a zh question takes it without a space); its end is the question's last token;
    the original rows come first, unchanged."""
    from editcomp.edit.answers import draw_answers
    from editcomp.edit.unrelated import UnrelatedPrompts, with_foreign_answers
    from editcomp.eval.edit_metrics import encode_prompt_target, join_prompt_target
    texts = ("Who wrote the long novel?", "谁写了这本书？")
    ids = tuple(tuple(tok(t)["input_ids"]) + (5, 6) for t in texts)
    ends = tuple(len(tok(t)["input_ids"]) - 1 for t in texts)
    questions = UnrelatedPrompts(texts, ids, ends, ("en", "zh"), row_langs=("en", "zh"))
    spans = ["London", "Berlin", "1944"]
    out = with_foreign_answers(tok, questions, spans, copies=2, seed=7)
    assert out.texts[:2] == texts and out.ids[:2] == ids and out.ends[:2] == ends
    assert len(out.texts) == 6 and out.row_langs == ("en", "zh") * 3 and out.answer_acts is None
    for k, span in enumerate(draw_answers(spans, 4, seed=7)):
        q, lang = texts[k % 2], ("en", "zh")[k % 2]
        p, a = encode_prompt_target(tok, q, span, lang)
        assert out.ids[2 + k] == tuple(p) + tuple(a) and out.ends[2 + k] == len(p) - 1
        assert out.texts[2 + k] == join_prompt_target(q, span, lang)
    assert out.texts[3].startswith("谁写了这本书？") and " " not in out.texts[3]
    assert with_foreign_answers(tok, questions, spans, copies=0) is questions
    with pytest.raises(ValueError, match="per-row languages"):
        with_foreign_answers(tok, replace(questions, row_langs=None), spans)


def test_a_batch_teacher_forces_its_questions_on_foreign_answers(tok, monkeypatch):
    """Facts edited together add one foreign row per sampled question after them, dropping one
    whose answer names an edited subject; a fact alone, no spans or foreign_answers=0 add none."""
    from editcomp.edit.unrelated import UnrelatedPrompts
    facts = load_facts(EXAMPLE_FACTS, langs=["en"], limit=2)
    subject = facts[0].langs["en"].subject
    model = tiny_model("llama")
    texts = ("Who painted the ceiling of the chapel?", "Where is the old bridge?")
    questions = UnrelatedPrompts(texts, tuple(tuple(tok(t)["input_ids"]) for t in texts),
                                 tuple(len(tok(t)["input_ids"]) - 1 for t in texts), ("en",),
                                 row_langs=("en", "en"))
    cfg = LAFNConfig(locate=LocateConfig(min_layer=0.0, top_frac=0.05), steps=1, stop_nll=None)
    seen = spy_kl_prompts(monkeypatch)
    batch = lafn_edit(copy.deepcopy(model), tok, facts, cfg, ["en"], progress=False,
                      questions=questions, answer_spans=["Ada Lovelace"])
    assert batch["sampled_questions"] == 2 and batch["foreign_answers"] == 2
    assert batch["kl_prompts"][-2:] == [f"{t} Ada Lovelace" for t in texts]
    assert len(seen[-1]) == len(batch["kl_prompts"])
    named = lafn_edit(copy.deepcopy(model), tok, facts, cfg, ["en"], progress=False,
                      questions=questions, answer_spans=[subject])
    assert named["foreign_answers"] == 0 and named["sampled_questions"] == 2
    for kwargs, config in ((dict(answer_spans=None), cfg),
                           (dict(answer_spans=["Ada Lovelace"]), replace(cfg, foreign_answers=0))):
        off = lafn_edit(copy.deepcopy(model), tok, facts, config, ["en"], progress=False,
                        questions=questions, **kwargs)
        assert off["foreign_answers"] == 0 and off["sampled_questions"] == 2
    single = lafn_edit(copy.deepcopy(model), tok, facts[:1], cfg, ["en"], progress=False,
                       questions=questions, answer_spans=["Ada Lovelace"])
    assert single["foreign_answers"] == 0
    # the caller's questions bring their own answers: no foreign ones unless asked for
    given = replace(questions, given=True)
    for config, n in ((cfg, 0), (replace(cfg, foreign_answers=1), 2)):
        rep = lafn_edit(copy.deepcopy(model), tok, facts, config, ["en"], progress=False,
                        questions=given, answer_spans=["Ada Lovelace"])
        assert rep["foreign_answers"] == n and rep["sampled_questions"] == 2
    with pytest.warns(UserWarning, match="no names or dates"):
        lafn_edit(copy.deepcopy(model), tok, facts, cfg, ["en"], progress=False,
                  questions=questions, answer_spans=[])


def test_generic_text_is_read_only_where_an_edit_uses_it():
    cfg = LAFNConfig(preserve_weight=0.0)
    assert cfg.uses_generic_text(2) and not cfg.uses_generic_text(1)
    assert not replace(cfg, sequential=True).uses_generic_text(2)
    assert not replace(cfg, foreign_answers=0).uses_generic_text(2)
    assert not replace(cfg, batch_questions=0).uses_generic_text(2)
    assert LAFNConfig().uses_generic_text(1)  # the preservation term's moments
    assert not cfg.uses_generic_text(2, given=True)  # given questions take no foreign answers
    assert replace(cfg, foreign_answers=1).uses_generic_text(2, given=True)
    with pytest.raises(ConfigError, match="foreign_answers must be >= 0"):
        LAFNConfig(foreign_answers=-1).validate()


def test_questions_per_language_and_foreign_answers_depend_on_whose_questions():
    """Unset, a batch takes SAMPLED_QUESTIONS sampled questions per language with one foreign
    answer each, or up to GIVEN_QUESTIONS of the caller's with none; a set value holds for
    both, and 0 questions means none of either. A fact alone takes GIVEN_RISK_QUESTIONS risk
    questions from the caller's, none from sampled ones."""
    from editcomp.edit.lafn_config import GIVEN_QUESTIONS, GIVEN_RISK_QUESTIONS, SAMPLED_QUESTIONS
    cfg = LAFNConfig()
    assert (cfg.questions_per_lang(), cfg.questions_per_lang(given=True)) == (
        SAMPLED_QUESTIONS, GIVEN_QUESTIONS) and GIVEN_QUESTIONS > SAMPLED_QUESTIONS
    assert (cfg.foreign_answers_for(2), cfg.foreign_answers_for(2, given=True)) == (1, 0)
    assert cfg.foreign_answers_for(1) == 0 == replace(cfg, sequential=True).foreign_answers_for(2)
    both = replace(cfg, batch_questions=64, foreign_answers=2)
    assert both.questions_per_lang() == both.questions_per_lang(given=True) == 64
    assert both.foreign_answers_for(2) == both.foreign_answers_for(2, given=True) == 2
    off = replace(both, batch_questions=0)
    assert off.foreign_answers_for(2, given=True) == 0 and not off.samples_questions(2)
    # a fact alone: the riskiest of the caller's questions join its KL term, of sampled ones none
    assert (cfg.risk_questions_for(), cfg.risk_questions_for(given=True)) == (0, GIVEN_RISK_QUESTIONS)
    assert cfg.takes_risk_questions(given=True) and not cfg.takes_risk_questions()
    assert replace(cfg, risk_questions=2).risk_questions_for() == 2
    assert not replace(cfg, kl_weight=0.0).takes_risk_questions(given=True)


def test_given_questions_are_teacher_forced_on_their_answers_then_continued(tok, monkeypatch):
    """A given question with an answer is its tokens, the answer's (as the joined text
    tokenizes) and the model's continuation of both; one without is continued after itself.
    Each language keeps its first batch_questions in file order, in the order langs gives,
    and a language not asked for is dropped."""
    from editcomp.data import Question
    from editcomp.edit.unrelated import given_questions
    from editcomp.eval.edit_metrics import encode_prompt_target
    model = tiny_model()
    qs = [Question("de", "Wer baute die alte Brücke?", "Karl Berg", "q:1"),
          Question("en", "Who wrote the long novel?", "Herman Melville", "q:2"),
          Question("fr", "Qui a peint le plafond?", "Michel", "q:3"),
          Question("en", "Where is the old bridge?", None, "q:4"),
          Question("en", "Who painted the ceiling?", "Ada", "q:5")]
    cfg = LAFNConfig(batch_questions=2, kl_continuation=3)
    out = given_questions(model, tok, qs, ["en", "de"], cfg)
    assert out.texts == ("Who wrote the long novel?", "Where is the old bridge?",
                         "Wer baute die alte Brücke?")
    assert out.row_langs == ("en", "en", "de") and out.langs == ("en", "de")
    p, a = encode_prompt_target(tok, "Who wrote the long novel?", "Herman Melville", "en")
    cont = greedy_continuations(model, tok, [p + a], 3)[0]
    assert list(out.ids[0]) == p + a + cont and out.ends[0] == len(p) - 1
    bare = list(tok("Where is the old bridge?")["input_ids"])
    assert list(out.ids[1]) == bare + greedy_continuations(model, tok, [bare], 3)[0]
    assert out.ends[1] == len(bare) - 1
    assert out.given  # unset, the cap is GIVEN_QUESTIONS, not the sampled default
    monkeypatch.setattr(sys.modules["editcomp.edit.lafn_config"], "GIVEN_QUESTIONS", 1)
    unset = given_questions(model, tok, qs, ["en", "de"], LAFNConfig(kl_continuation=0))
    assert unset.texts == ("Who wrote the long novel?", "Wer baute die alte Brücke?")

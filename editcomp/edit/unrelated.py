"""The unrelated prompts LAFN's KL and preservation terms read: fixed prompts and the questions
the unedited model samples or the caller gives, each followed by the unedited model's greedy
continuation (``UnrelatedPrompts``), plus what a fact edited alone takes from a pool of them
(the answer activations by which ``riskiest`` ranks its questions, their ``answer_moments``).

They depend only on the unedited model and the languages, so a caller that edits one model many
times (a benchmark's single-edit protocol, ``--sequential``) makes them once here and passes them
to ``lafn.lafn_edit``; kept apart from lafn.py, which locates and updates.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from editcomp.arch import get_adapter
from editcomp.data import Fact, Question
from editcomp.edit.answers import draw_answers
from editcomp.edit.lafn_config import LAFNConfig
from editcomp.edit.locate import (GenericStats, activation_moments, generic_stats,
                                  mean_activations)
from editcomp.edit.prompts import kl_answer, kl_prompts_for
from editcomp.edit.questions import names_a_subject, sample_questions
from editcomp.edit.runner import ModelRunner, top_next_tokens
from editcomp.eval.edit_metrics import (encode_prompt_target, greedy_continuations,
                                        join_prompt_target)


@dataclass(frozen=True)
class UnrelatedPrompts:
    """The KL term's unrelated prompts, tokenized, each followed by the unedited model's greedy
    continuation (``ends[k]``: where prompt k's own text ends)."""
    texts: tuple[str, ...]
    ids: tuple[tuple[int, ...], ...]
    ends: tuple[int, ...]
    langs: tuple[str, ...]
    #: ``[layers, n, intermediate]``: each prompt's mean |FFN activation| where its answer is
    #: predicted (``with_answer_activations``), by which ``riskiest`` ranks them; None: not made
    answer_acts: torch.Tensor | None = None
    #: ``{layer: [I, I]}``: the FFN activations' second moments at those positions of all the
    #: prompts (``answer_moments``), for ``NeuronDeltas.answer_preservation``; None: not made
    answer_moments: dict | None = None
    #: each prompt's language (how an answer joins it: ``with_foreign_answers``); None: not kept
    row_langs: tuple[str, ...] | None = None
    #: each prompt's unedited top ``kl_vocab`` next tokens at every position after its first
    #: (``runner.top_next_tokens``), the KL term's vocabulary there; None: each edit finds them
    top: tuple[torch.Tensor, ...] | None = None
    #: the unedited model's ``locate.GenericStats`` over these prompts, by which the location
    #: bans generic neurons; None: each edit runs them
    generic: GenericStats | None = None
    #: the caller's questions (``given_questions``), not the model's own: they take
    #: ``GIVEN_QUESTIONS`` per language and no foreign answers by default
    given: bool = False
    #: tokens of the unedited model's continuation after each prompt (and its answer), which
    #: ``lafn_edit`` checks against ``LAFNConfig.continuation_for``; None: not recorded
    continuation: int | None = None


def unrelated_prompts(model, tokenizer, langs, config: LAFNConfig | None = None,
                      alone: bool = False) -> UnrelatedPrompts:
    """The unrelated prompts for facts in ``langs`` and the unedited ``model``'s continuations
    (as long as ``config.continuation_for`` says for facts edited together, or with ``alone``
    for a fact edited alone).

    ``lafn_edit`` makes them itself; a caller that edits the same unedited model many times (one
    fact at a time, restoring in between, as a benchmark's single-edit protocol does) makes them
    once and passes them in, which saves a generation per edit, the full output layer at every
    KL position (``top``) and a forward pass of the location (``generic``): gemma3-270m,
    ~1.4 s of an ~11 s single edit on CPU."""
    config = config or LAFNConfig()
    texts = kl_prompts_for(langs, config.kl_prompts, config.kl_per_lang)
    answers = [kl_answer(t) if config.kl_answers else None for t in texts]
    n = prompt_continuation(config, alone)
    ids, ends = with_continuations(model, tokenizer, texts, n, answers)
    runner, top, generic = ModelRunner(model, tokenizer), None, None
    if ids:
        generic = generic_stats(runner, ids, ends, config.locate.top_frac, config.locate.batch_size)
        if config.kl_vocab is not None and config.kl_weight != 0:  # None: by size and source
            top = tuple(top_next_tokens(runner, ids, config.kl_vocab))
    return UnrelatedPrompts(tuple(texts), tuple(tuple(p) for p in ids), tuple(ends), tuple(langs),
                            top=top, generic=generic, continuation=n)


def prompt_continuation(config: LAFNConfig, alone: bool) -> int:
    """The continuation the unrelated prompts of a fact edited alone (or of facts edited
    together) carry: the one place that turns a builder's ``alone`` into
    ``config.continuation_for``'s count of facts."""
    return config.continuation_for(1 if alone else 2)


def sampled_questions(model, tokenizer, langs, config: LAFNConfig | None = None, seed: int = 0,
                      alone: bool = False) -> UnrelatedPrompts:
    """``config.questions_per_lang()`` questions per language that the unedited ``model`` samples
    (``questions.sample_questions``), each followed by its greedy continuation: a batch edit's
    extra unrelated prompts (``alone``: a pool for facts edited alone, their riskiest questions).
    Made once per unedited model and languages, like ``unrelated_prompts``; ``lafn_edit`` drops
    those that name an edited subject."""
    config = config or LAFNConfig()
    rows = [(q, lang, None) for lang in dict.fromkeys(langs)
            for q in sample_questions(model, tokenizer, lang, config.questions_per_lang(), seed)]
    return _question_prompts(model, tokenizer, rows, langs, config, alone=alone)


def given_questions(model, tokenizer, questions: list[Question], langs,
                    config: LAFNConfig | None = None, alone: bool = False) -> UnrelatedPrompts:
    """The caller's unrelated questions (``data.load_questions``) in ``langs``, in place of
    ``sampled_questions``: the first ``config.questions_per_lang(given=True)`` of each language
    (by default ``GIVEN_QUESTIONS``), each followed by its answer where it has one (teacher-forced,
    as a locality probe's gold answer is) and the unedited ``model``'s greedy continuation.
    Questions written like the ones an edit must not touch guard them far better than the
    model's own (``lafn_config.GIVEN_QUESTIONS``). ``alone``: as ``sampled_questions``'s."""
    config = config or LAFNConfig()
    cap = config.questions_per_lang(given=True)
    rows = [(q.text, lang, q.answer) for lang in dict.fromkeys(langs)
            for q in [q for q in questions if q.lang == lang][:cap]]
    return _question_prompts(model, tokenizer, rows, langs, config, given=True, alone=alone)


def _question_prompts(model, tokenizer, rows: list[tuple[str, str, str | None]], langs,
                      config: LAFNConfig, given: bool = False, alone: bool = False
                      ) -> UnrelatedPrompts:
    """``(question, language, answer or None)`` rows -> ``UnrelatedPrompts``: each question, its
    answer where it has one, then the model's continuation (``with_continuations``); ``given``:
    the caller's questions; ``alone``: for facts edited alone."""
    answers = [(lang, a) if a is not None else None for _, lang, a in rows]
    n = prompt_continuation(config, alone)
    ids, ends = with_continuations(model, tokenizer, [q for q, _, _ in rows], n, answers)
    return UnrelatedPrompts(tuple(q for q, _, _ in rows), tuple(tuple(p) for p in ids),
                            tuple(ends), tuple(langs), row_langs=tuple(lang for _, lang, _ in rows),
                            given=given, continuation=n)


def with_foreign_answers(tokenizer, questions: UnrelatedPrompts, spans: list[str], copies: int = 1,
                         seed: int = 0) -> UnrelatedPrompts:
    """``questions`` and, after them, each question ``copies`` more times followed by a span drawn
    from ``spans`` (``answers.answer_spans``) instead of the model's own answer: its end is the
    question's last token, so the KL term covers the positions that predict and follow an
    answer the model does not know (see answers.py). Needs ``row_langs`` (a zh question joins
    its answer without a space); the result has no ``answer_acts``."""
    if copies <= 0 or not questions.texts:
        return questions
    if questions.row_langs is None:
        raise ValueError("the questions carry no per-row languages: make them with sampled_questions")
    drawn = iter(draw_answers(spans, copies * len(questions.texts), seed))
    texts, ids, ends, langs = (list(questions.texts), [list(p) for p in questions.ids],
                               list(questions.ends), list(questions.row_langs))
    for _ in range(copies):
        for q, lang in zip(questions.texts, questions.row_langs):
            span = next(drawn)
            p, a = encode_prompt_target(tokenizer, q, span, lang)
            texts.append(join_prompt_target(q, span, lang))
            ids.append(list(p) + list(a))
            ends.append(len(p) - 1)
            langs.append(lang)
    return UnrelatedPrompts(tuple(texts), tuple(tuple(p) for p in ids), tuple(ends),
                            questions.langs, row_langs=tuple(langs), given=questions.given,
                            continuation=questions.continuation)  # (the copies': none)


def with_answer_activations(model, tokenizer, prompts: UnrelatedPrompts,
                            config: LAFNConfig | None = None) -> UnrelatedPrompts:
    """``prompts`` with what a fact edited alone under ``config`` takes from them, made once
    per unedited model like the prompts: ``answer_acts``, the unedited model's mean |FFN
    activation| over each prompt's positions from its own last token on (they predict its
    answer and continuation, where a locality probe is scored), for ``riskiest`` (without a
    config, or when it asks for risk questions); ``answer_moments`` when its answer
    preservation asks for them. Each is a forward pass over the prompts (gemma3-270m, 256
    sampled questions on a 2-core CPU: ~10 s), so what is not asked for is not made."""
    acts = prompts.answer_acts
    if config is None or config.takes_risk_questions(prompts.given):
        acts = mean_activations(ModelRunner(model, tokenizer), [list(p) for p in prompts.ids],
                                _answer_positions(prompts))
    moments = (answer_moments(model, tokenizer, prompts, config)
               if config is not None and config.answer_preserve_for(1) > 0
               else prompts.answer_moments)
    return replace(prompts, answer_acts=acts, answer_moments=moments)


def answer_moments(model, tokenizer, prompts: UnrelatedPrompts, config: LAFNConfig | None = None
                   ) -> dict[int, torch.Tensor]:
    """The unedited model's FFN activation moments (``locate.activation_moments``) over every
    prompt's positions from its own last token on, in the layers LAFN may edit: where its
    answer is predicted and spelled, which is where a locality probe is scored."""
    return activation_moments(ModelRunner(model, tokenizer), [list(p) for p in prompts.ids],
                              editable_layers(model, config or LAFNConfig()),
                              positions=_answer_positions(prompts))


def editable_layers(model, config: LAFNConfig) -> list[int]:
    """The layers whose neurons LAFN may locate and edit (``locate.min_layer`` up): where the
    moments of the preservation terms are taken."""
    n_layers = get_adapter(model).num_layers
    return list(range(int(config.locate.min_layer * n_layers), n_layers))


def _answer_positions(prompts: UnrelatedPrompts) -> list[list[int]]:
    return [list(range(e, len(p))) for p, e in zip(prompts.ids, prompts.ends)]


def riskiest(pool: UnrelatedPrompts, neurons: dict[int, list[int]], n: int,
             weight: dict[int, float] | None = None) -> list[int]:
    """The ``n`` pool prompts (indices) whose answers most excite ``neurons``: an edit adds
    ``a_i * delta_i`` to the residual stream wherever neuron i fires, so these are the prompts it
    changes most. ``weight``: a per-layer factor on the sum (the deltas' scale there)."""
    if pool.answer_acts is None:
        raise ValueError("the pool has no answer activations: make it with with_answer_activations")
    score = torch.zeros(pool.answer_acts.shape[1])
    for layer, idx in neurons.items():
        score += pool.answer_acts[layer][:, idx].sum(1) * (weight or {}).get(layer, 1.0)
    return score.topk(min(n, len(score))).indices.tolist()


def without_subjects(prompts: UnrelatedPrompts, facts: list[Fact]) -> UnrelatedPrompts:
    """``prompts`` less those that name a subject of ``facts``: a question about an edited
    subject should change with the edit, so it cannot guard against one."""
    subjects = [fl.subject for f in facts for fl in f.langs.values()]
    rows = [k for k, t in enumerate(prompts.texts) if not names_a_subject(t, subjects)]
    acts = prompts.answer_acts[:, rows] if prompts.answer_acts is not None else None
    row_langs = (tuple(prompts.row_langs[k] for k in rows) if prompts.row_langs is not None
                 else None)
    # every other field carries over (the moments keep a dropped question's share: a few of
    # hundreds, and they are only a penalty) but the per-position ones of the whole set
    return replace(prompts, texts=tuple(prompts.texts[k] for k in rows),
                   ids=tuple(prompts.ids[k] for k in rows),
                   ends=tuple(prompts.ends[k] for k in rows),
                   answer_acts=acts, row_langs=row_langs, top=None, generic=None)


def with_continuations(model, tokenizer, texts: list[str], n: int, answers=None
                        ) -> tuple[list[list[int]], list[int]]:
    """Token ids of ``texts`` (each followed by its answer where ``answers`` has one, a
    ``(language, answer)``), then the model's greedy continuation of ``n`` tokens; and where each
    text's own tokens end (before the answer). Decodes 64 rows at a time: a step reads every
    weight, so gemma3-270m continued 64 sampled questions in 6.7 s thus, 12.8 s 16 at a time."""
    ids, ends = [], []
    for t, a in zip(texts, answers or [None] * len(texts)):
        p, ans = encode_prompt_target(tokenizer, t, a[1], a[0]) if a else (
            list(tokenizer(t)["input_ids"]), [])
        ids.append(list(p) + list(ans))
        ends.append(len(p) - 1)
    if n and ids:
        conts = greedy_continuations(model, tokenizer, ids, n, batch_size=64)
        ids = [p + c for p, c in zip(ids, conts)]
    return ids, ends

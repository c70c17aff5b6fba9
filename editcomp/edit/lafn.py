"""LAFN: edit a fact in every language at once by updating its language-agnostic factual neurons.

Zhang et al., "Multilingual Knowledge Editing with Language-Agnostic Factual Neurons" (COLING 2025,
arXiv 2406.16416). Step 1-2 (``locate``): the neurons that fire for the fact's prompts in all
languages and phrasings. Step 3 (here): learn a delta for each located neuron's value vector (its
down_proj column) that minimizes the target NLL over every language and paraphrase, plus a KL term
that keeps unrelated prompts' next-token distributions and a norm penalty, then add the deltas to the
weights. Nothing else in the model changes.

With generic text (``preservation_moments``: the second moments of the FFN activations there,
computed once) a preservation term keeps the edited columns' output on that text: the KL term
sees a few unrelated prompts, but a batch of edits changes hundreds of columns, and what they do
on ordinary text is what perplexity measures (MEMIT's preservation, restricted to the located
columns; it costs a ``k x k`` product per step, no forward pass).

The deltas act through forward hooks on ``down`` while they are learned (``out += x[..., idx] @ D``,
which equals ``W[:, idx] += D.T``), and only the layers from the lowest edited one up are re-run per
step (``TrainBatch.prepare`` caches the residual stream below), which keeps single edits cheap; those
steps of a fact edited alone run the eager attention kernel and, under bf16 autocast, every edit's
steps hold bf16 copies of the re-run layers' weights (``runner.attention_kernel``,
``runner.weights_held_as``). The unrelated prompts the KL and preservation terms read are made
in unrelated.py.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from editcomp.arch import get_adapter
from editcomp.data import Fact, token_windows
from editcomp.device import autocast_dtype, train_autocast, train_matmuls
from editcomp.edit.lafn_config import LAFNConfig
from editcomp.edit.locate import activation_moments, generic_activations, run_and_locate
from editcomp.edit.prompts import PARAPHRASE_SOURCE, neighbor_prompts, training_items
from editcomp.edit.runner import (ModelRunner, attention_kernel, build_batches, frozen,
                                  weights_held_as)
from editcomp.edit.unrelated import (UnrelatedPrompts, answer_moments, editable_layers,
                                     prompt_continuation, riskiest, sampled_questions,
                                     unrelated_prompts, with_answer_activations, with_continuations,
                                     with_foreign_answers, without_subjects)
from editcomp.edit.update import optimize
from editcomp.eval.edit_metrics import languages_of


class NeuronDeltas:
    """Trainable deltas for chosen down_proj columns, applied by hooks until ``write``.

    ``neurons``: ``{layer: [neuron, ...]}``. A delta is stored in units of its layer's column RMS
    so one learning rate fits every layer and model.
    """

    def __init__(self, model, neurons: dict[int, list[int]], text_acts: torch.Tensor | None = None,
                 moments: dict[int, torch.Tensor] | None = None,
                 answer_moments: dict[int, torch.Tensor] | None = None):
        """``text_acts`` ``[layers, positions, intermediate]``: signed activations on unrelated text;
        with them the penalty is the change of the edited columns' output there (see
        ``relative_norm``) instead of the plain size of the change. ``moments``: ``{layer: C}``
        from ``locate.activation_moments`` on generic text, for ``preservation``;
        ``answer_moments``: the same where questions' answers are predicted, for
        ``answer_preservation``."""
        self.parts = {lp.index: lp for lp in get_adapter(model).layers()}
        self.idx, self.scale, self.u, self.col_sq, self.text = {}, {}, {}, {}, {}
        self.moments, self.out_sq = {}, {}
        self.answer_moments, self.answer_out_sq = {}, {}
        for layer, ns in sorted(neurons.items()):
            down = self.parts[layer].down
            dev = down.weight.device
            idx = torch.tensor(sorted(ns), dtype=torch.long, device=dev)
            cols = down.weight.detach()[:, idx].float()
            self.idx[layer] = idx
            self.scale[layer] = cols.pow(2).mean().sqrt().clamp_min(1e-8)
            weight = torch.ones(len(ns), device=dev)
            if text_acts is not None:  # [positions, k] / sqrt(positions): ||X D||^2 is a mean
                x = text_acts[layer][:, idx.cpu()].to(dev)
                self.text[layer] = x / max(1, x.shape[0]) ** 0.5
                weight = self.text[layer].pow(2).sum(0).clamp_min(1e-12)
            self.col_sq[layer] = (cols.pow(2).sum(0) * weight).sum()
            for given, kept, out_sq in ((moments, self.moments, self.out_sq),
                                        (answer_moments, self.answer_moments, self.answer_out_sq)):
                if given is not None and layer in given:
                    c = given[layer][idx.cpu()][:, idx.cpu()].to(dev)
                    kept[layer] = c
                    out_sq[layer] = (cols.pow(2).sum(0) * c.diagonal()).sum()
            self.u[layer] = torch.zeros(len(ns), down.weight.shape[0], device=down.weight.device,
                                        requires_grad=True)
        self._handles = []

    def delta(self, layer: int) -> torch.Tensor:
        return self.u[layer] * self.scale[layer]

    def params(self) -> list[torch.Tensor]:
        return list(self.u.values())

    def relative_norm(self) -> torch.Tensor:
        """sum ||D||^2 / sum ||W[:, idx]||^2 over the edited columns; with unrelated text's
        activations X: sum mean_t ||x_t D||^2 / sum_i E[x_i^2] ||W[:, i]||^2, the change of the
        edited neurons' output on that text (co-firing neurons' changes may cancel there and
        still add up on the fact's prompts: the preservation term of MEMIT/AlphaEdit, restricted
        to the located columns)."""
        if self.text:
            num = sum((self.text[layer] @ self.delta(layer)).pow(2).sum() for layer in self.u)
        else:
            num = sum(self.delta(layer).pow(2).sum() for layer in self.u)
        return num / sum(self.col_sq.values())

    def preservation(self) -> torch.Tensor:
        """sum tr(D^T C D) / sum_i C_ii ||W[:, i]||^2: the mean squared change of the residual
        stream on generic text (``C``: the edited columns' activation second moments there),
        relative to those columns' own output there. Cross terms count: co-firing neurons'
        changes may cancel on text while they add up on the fact's prompts."""
        return self._relative_change(self.moments, self.out_sq)

    def answer_preservation(self) -> torch.Tensor:
        """``preservation`` where questions' answers are predicted (``answer_moments``): the
        positions a locality probe scores, where an edit's target leaks."""
        return self._relative_change(self.answer_moments, self.answer_out_sq)

    def _relative_change(self, moments: dict, out_sq: dict) -> torch.Tensor:
        if not moments:  # no text given: no term
            return torch.zeros(())
        num = sum(((c @ self.delta(layer)) * self.delta(layer)).sum()
                  for layer, c in moments.items())
        return num / sum(out_sq.values()).clamp_min(1e-12)

    def __enter__(self):
        for layer in self.u:
            def hook(mod, args, out, layer=layer):
                x = args[0][..., self.idx[layer]]
                return out + (x.float() @ self.delta(layer)).to(out.dtype)
            self._handles.append(self.parts[layer].down.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def write(self) -> dict:
        """Add the deltas to the weights -> ``{layer: {"neurons", "delta_norm", "rel_norm"}}``."""
        out = {}
        for layer in self.u:
            w = self.parts[layer].down.weight
            d = self.delta(layer).detach()
            w[:, self.idx[layer]] += d.T.to(w.dtype)
            cols = (w[:, self.idx[layer]].float() - d.T).pow(2).sum()
            out[layer] = {"neurons": int(self.idx[layer].numel()), "delta_norm": float(d.norm()),
                          "rel_norm": float(d.pow(2).sum() / cols.clamp_min(1e-12)) ** 0.5}
        return out


def _merge(groups: list[dict[int, list[int]]]) -> dict[int, list[int]]:
    merged: dict[int, set[int]] = {}
    for g in groups:
        for layer, ns in g.items():
            merged.setdefault(layer, set()).update(ns)
    return {layer: sorted(ns) for layer, ns in sorted(merged.items())}


def _edit_group(model, tokenizer, facts: list[Fact], items, kl_ids, kl_ends, config: LAFNConfig,
                progress: bool, preserve: dict | None = None,
                risk_pool: UnrelatedPrompts | None = None,
                answers: dict[int, torch.Tensor] | None = None,
                unrelated: UnrelatedPrompts | None = None, given: bool = False) -> dict:
    """Locate and edit ``facts`` together; the weights change at the end. ``kl_ends``: where each
    unrelated prompt's own text ends (its continuation follows). ``risk_pool``: questions with
    ``answer_acts``, the ``config.risk_questions_for`` riskiest of which join the KL term (given
    only when that applies). ``answers``: ``answer_moments`` of the sampled questions, for the
    ``config.answer_preserve`` term. ``unrelated``: the first KL prompts, whose ``top`` and
    ``generic`` stats are then known. ``given``: the KL prompts include the caller's questions
    (``given_questions``), which set the KL weight and steps of facts edited together."""
    runner = ModelRunner(model, tokenizer)
    kl_weight = config.kl_weight_for(len(facts), given)
    per_fact, loc_report = run_and_locate(
        runner, items, len(facts), config.locate, kl_ids, kl_ends, progress,
        unrelated.generic if unrelated is not None else None)
    # neighbors only serve the KL term: none without one, and generated only for a training run
    near = (neighbor_prompts(facts, list(dict.fromkeys(it.lang for it in items)), config.neighbors)
            if kl_weight > 0 else [])
    neurons = _merge(per_fact)
    if not neurons:
        return {"locate": loc_report, "neighbor_prompts": near, "risk_prompts": [], "neurons": {},
                "train": None, "written": {}}
    text_acts = (generic_activations(runner, kl_ids, config.locate.batch_size)
                 if config.norm_on_text else None)
    kl_ids = kl_ids + with_continuations(model, tokenizer, near,
                                         config.continuation_for(len(facts)))[0]
    deltas = NeuronDeltas(model, neurons, text_acts,
                          preserve if config.preserve_weight > 0 else None, answers)
    risky = []
    if risk_pool is not None:
        risky = riskiest(risk_pool, neurons, config.risk_questions_for(risk_pool.given),
                         {layer: float(v) for layer, v in deltas.scale.items()})
        kl_ids = kl_ids + [list(risk_pool.ids[k]) for k in risky]
    start = min(neurons)
    answer_weight = config.answer_preserve_for(len(facts))
    pairs = [(list(it.prompt_ids), list(it.target_ids)) for it in items]
    # without a KL term the unrelated prompts only serve the location (no forward pass per step)
    kl_groups = max(config.kl_groups, -(-len(kl_ids) // config.kl_per_step))
    kl_top = list(unrelated.top or ()) if unrelated is not None else []
    kl_top += [None] * (len(kl_ids) - len(kl_top))  # the rest: found by each edit
    batches = build_batches(runner, pairs, kl_ids if kl_weight > 0 else [],
                            config.batch_size, config.kl_vocab, kl_groups, config.nll_vocab,
                            config.pack_for(len(facts)), kl_top if kl_weight > 0 else None,
                            config.row_cache_mb << 20)

    with (frozen(model), deltas, attention_kernel(model, config.attention_for(len(facts))),
          train_autocast(runner.device, config.autocast),
          weights_held_as(runner, start, autocast_dtype(runner.device, config.autocast))):
        train = optimize(runner, batches, deltas.params(), start,
                         config.steps_for(len(facts), given),
                         config.learning_rate(len(facts)),
                         kl_weight=kl_weight,
                         penalty=lambda: (config.norm_weight * deltas.relative_norm()
                                          + config.preserve_weight * deltas.preservation()
                                          + answer_weight * deltas.answer_preservation()),
                         stop_nll=config.stop_nll, progress=progress, desc="lafn",
                         nll_floor=config.target_floor(len(facts)),
                         lr_growth=config.lr_growth_for(len(facts)),
                         stall=config.stall_for(len(facts)),
                         lr_decay=config.lr_decay_for(len(facts)),
                         keep_best=config.keep_best_for(len(facts)))
    written = deltas.write()
    return {"locate": loc_report, "neighbor_prompts": near,
            "risk_prompts": [risk_pool.texts[k] for k in risky],
            "neurons": {str(k): len(v) for k, v in neurons.items()},
            "train": train, "written": {str(k): v for k, v in written.items()}, "start_layer": start}



def preservation_moments(model, tokenizer, text, config: LAFNConfig | None = None,
                         progress: bool = False) -> dict[int, torch.Tensor]:
    """The activation moments of generic ``text`` (a file, token windows ``[n, T]``, or a list of
    token-id lists) in the layers LAFN may edit, for ``lafn_edit(preserve=...)``; made once per
    unedited model. A file is read as ``config.preserve_windows`` windows of
    ``preserve_seq_len`` tokens, each starting like a document (too short a file is a
    ``DataError`` naming it)."""
    config = config or LAFNConfig()
    if not isinstance(text, (torch.Tensor, list)):  # a path, never the text itself
        text = token_windows(tokenizer, Path(text), config.preserve_seq_len,
                             config.preserve_windows, each_as_document=True)
    return activation_moments(ModelRunner(model, tokenizer), [list(map(int, w)) for w in text],
                              editable_layers(model, config), progress=progress)


def lafn_edit(model, tokenizer, facts: list[Fact], config: LAFNConfig | None = None, langs=None,
              progress: bool = True, unrelated: UnrelatedPrompts | None = None,
              preserve: dict[int, torch.Tensor] | None = None,
              questions: UnrelatedPrompts | None = None,
              answer_spans: list[str] | None = None) -> dict:
    """Edit ``facts`` into ``model`` in place (only located down_proj columns change) -> report.

    All facts are located and trained together (batch), or one after another with
    ``config.sequential``. Training pairs: each language's prompt, given paraphrases and
    ``config.paraphrases`` template paraphrases; never the evaluation probes. ``unrelated``: the
    KL term's prompts from ``unrelated_prompts`` on this same unedited model (default: made here;
    their ``top`` tokens, the unedited model's, serve every fact of a sequential run).
    ``preserve``: ``preservation_moments`` of this unedited model: the deltas then also keep
    the edited columns' output on that text (weight ``config.preserve_weight``).
    ``questions``: ``sampled_questions`` of this unedited model, or the caller's
    (``given_questions``), for facts edited together (default: sampled here when
    ``config.questions_per_lang()`` is above 0); they join the unrelated prompts, and their
    tokens' moments the preservation text. A fact edited alone takes the
    ``config.risk_questions_for`` riskiest of them instead (sampled here if needed; pass them
    ``with_answer_activations(..., config)`` to edit many facts from one pool). With an
    answer-preservation weight (``config.answer_preserve_for``: by default only a fact edited
    alone) an edit also keeps its columns' output where those questions are answered.
    ``answer_spans``: names and dates of generic text (``answers.answer_spans``), which facts
    edited together take as the questions' foreign answers (``config.foreign_answers_for``:
    by default sampled questions only); None: none. A caller's ``unrelated`` and ``questions``
    must be made for this edit's mode (their builders' ``alone``: one fact, or ``sequential``),
    whose continuations differ (``LAFNConfig.continuation_for``); others are a ValueError.
    """
    config = config or LAFNConfig()
    config.validate()
    t0 = time.time()
    items = training_items(facts, tokenizer, langs, config.paraphrases)
    used_langs = languages_of(facts, langs)
    alone = config.edits_alone(len(facts))  # each fact trained by itself
    for name, prompts in (("unrelated", unrelated), ("questions", questions)):
        _check_continuation(name, prompts, config, alone)
    if unrelated is None:
        unrelated = unrelated_prompts(model, tokenizer, used_langs, config, alone=alone)
    kl_texts = list(unrelated.texts)
    kl_ids, kl_ends = [list(p) for p in unrelated.ids], list(unrelated.ends)
    n_questions = 0
    answers = None  # moments where the sampled questions are answered (``answer_preserve``)
    answer_weight = config.answer_preserve_for(1 if alone else len(facts))
    from_caller = questions is not None and questions.given  # kept by the filters below
    if not alone and config.questions_per_lang(from_caller) > 0:
        if questions is None:
            questions = sampled_questions(model, tokenizer, used_langs, config, alone=alone)
        questions = without_subjects(questions, facts)
        n_questions = len(questions.texts)
        copies = config.foreign_answers_for(len(facts), from_caller)
        if copies and answer_spans is not None:
            if not answer_spans:
                warnings.warn("the generic text has no names or dates: no foreign answers")
            else:  # filtered again: a drawn answer may name an edited subject
                questions = without_subjects(with_foreign_answers(
                    tokenizer, questions, answer_spans, copies), facts)
        if answer_weight > 0 and questions.ids:
            answers = answer_moments(model, tokenizer, questions, config)
        kl_texts += questions.texts
        kl_ids += [list(p) for p in questions.ids]
        kl_ends += questions.ends
        if config.preserve_weight > 0 and questions.ids:
            asked = preservation_moments(model, tokenizer, [list(p) for p in questions.ids], config)
            preserve = asked if preserve is None else {k: preserve[k] + asked[k] for k in preserve}
    groups = [list(range(len(facts)))] if not config.sequential else [[i] for i in range(len(facts))]
    risk_pool = None
    wants_risk = config.takes_risk_questions(from_caller)
    if alone and (wants_risk or answer_weight > 0):  # an empty pool (0 questions): no terms
        if questions is None:
            questions = sampled_questions(model, tokenizer, used_langs, config, alone=alone)
        pool = without_subjects(questions, facts)
        if pool.ids and (wants_risk and pool.answer_acts is None
                         or answer_weight > 0 and pool.answer_moments is None):
            pool = with_answer_activations(model, tokenizer, pool, config)
        risk_pool = pool if wants_risk and pool.ids else None
        if answer_weight > 0:
            answers = pool.answer_moments
    # the KL term holds the caller's questions: a batch's, or the risk questions of a fact alone
    given = from_caller and (n_questions > 0 or risk_pool is not None)
    runs = []
    for g in tqdm(groups, desc="facts", unit="fact", disable=not progress or len(groups) < 2):
        sub_items = [it for it in items if it.fact in g]
        remap = {fi: j for j, fi in enumerate(g)}
        sub_items = [replace(it, fact=remap[it.fact]) for it in sub_items]
        runs.append(_edit_group(model, tokenizer, [facts[i] for i in g], sub_items, kl_ids, kl_ends,
                                config, progress and len(groups) < 2, preserve, risk_pool,
                                answers, unrelated, given))
    hist = [0] * get_adapter(model).num_layers
    per_fact = []
    for g, r in zip(groups, runs):
        for layer, n in enumerate(r["locate"]["layer_histogram"]):
            hist[layer] += n
        for fi, row in zip(g, r["locate"]["facts"]):
            per_fact.append({"case_id": facts[fi].case_id, **row})
    trains = [r["train"] for r in runs if r["train"]]
    jacc: dict[str, list[float]] = {}
    for r in runs:
        for k, v in r["locate"]["language_overlap_jaccard"].items():
            jacc.setdefault(k, []).append(v)
    counts = [row["neurons"] for row in per_fact]
    param = next(model.parameters())
    group_size = len(groups[0]) if groups else 0  # facts trained together
    report = {
        "method": "lafn",
        "config": config.to_dict(),
        "mode": "sequential" if config.sequential else "batch",
        "learning_rate": config.learning_rate(group_size),
        "attention": config.attention_for(group_size) or "the model's own",
        "nll_floor": config.target_floor(group_size),
        "steps": config.steps_for(group_size, given),
        "kl_weight": config.kl_weight_for(group_size, given),
        "lr_decay": config.lr_decay_for(group_size),
        "answer_preserve": config.answer_preserve_for(group_size),
        "selectivity": config.locate.selectivity_for(group_size),
        "facts": len(facts),
        "training_pairs": len(items),
        "paraphrase_source": PARAPHRASE_SOURCE if config.paraphrases else "given paraphrases only",
        "kl_prompts": kl_texts,
        "sampled_questions": n_questions,
        "foreign_answers": len(kl_texts) - len(unrelated.texts) - n_questions,
        "neighbor_prompts": [p for r in runs for p in r["neighbor_prompts"]],
        "risk_prompts": [p for r in runs for p in r["risk_prompts"]],
        "train_matmuls": train_matmuls(param.device, config.autocast, param.dtype),
        "neurons": {
            "total": sum(counts),
            "edited_columns": sum(sum(int(n) for n in r["neurons"].values()) for r in runs),
            "per_fact_mean": sum(counts) / max(1, len(counts)),
            "facts_without_neurons": sum(1 for c in counts if c == 0),
            "layer_histogram": hist,
        },
        "locate": {"layer_histogram": hist,
                   "language_overlap_jaccard": {k: sum(v) / len(v) for k, v in jacc.items()},
                   "facts": per_fact, "config": asdict(config.locate)},
        "losses": {
            "nll_start": _mean([t["nll_start"] for t in trains]),
            "nll_end": _mean([t["nll_end"] for t in trains]),
            "nll_end_max": max((t["nll_end_max"] for t in trains), default=None),
            "kl_end": _mean([t["kl_end"] for t in trains]),
            "token_acc_end": _mean([t["token_acc_end"] for t in trains]),
            "steps": sum(t["steps"] for t in trains),
            "stall_stopped": sum(t["stall_stopped"] for t in trains),
            # facts edited alone that ended short and wrote their best step's deltas, not their
            # last (LAFNConfig.keep_best); best_step: that step of a single fact (None: its last)
            "kept_best": sum(t["best_step"] is not None for t in trains),
            "best_step": trains[0]["best_step"] if len(trains) == 1 else None,
        },
        "seconds": time.time() - t0,
    }
    return report


def _check_continuation(name: str, prompts: UnrelatedPrompts | None, config: LAFNConfig,
                        alone: bool) -> None:
    """A caller's prompts must carry the continuation this edit reads (``continuation_for``): a
    pool made for facts edited together (8 tokens) would slow a fact edited alone and change
    what its KL term holds, silently."""
    want = prompt_continuation(config, alone)
    if prompts is not None and prompts.continuation not in (None, want):
        kind = "a fact edited alone" if alone else "facts edited together"
        raise ValueError(f"lafn_edit's {name} carry {prompts.continuation}-token continuations; "
                         f"{kind} read {want} (make them with alone={alone})")


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None

"""LAFN vs FT-L on BMIKE-53 zsRE: reliability, generality, locality, portability per language.

Each case = the English record + one other language (de, fr, zh, es). Protocols:
- single: edit one case (both languages), measure it, restore the weights; seconds per edit (the
  unedited model's continuations of the KL prompts are made once per pair: ``setup_seconds``);
- cross: edit with English only, measure both languages (does the edit cross over?);
- batch: edit all cases of a language at once, measure, WikiText-2 perplexity before/after (LAFN's
  sampled questions are made once per language, ``setup_seconds``, outside seconds per edit).
Locality compares with the unedited model's own answers (``locality_reference``). Metrics are the
teacher-forced token accuracy (acc) and greedy exact match (em) of ``editcomp.eval.edit_metrics``.

    python benchmarks/edit.py --model gemma3-270m --langs de,zh --cases 20
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from editcomp import checkpoint  # noqa: E402
from editcomp.arch import get_adapter  # noqa: E402
from editcomp.data import Question, load_facts, load_text, token_windows  # noqa: E402
from editcomp.device import peak_memory_mb  # noqa: E402
from editcomp.edit import FTLConfig, LAFNConfig, ftl_edit, lafn_edit, unrelated_prompts  # noqa: E402
from editcomp.edit.answers import answer_spans  # noqa: E402
from editcomp.edit.lafn import preservation_moments  # noqa: E402
from editcomp.edit.locate import LocateConfig  # noqa: E402
from editcomp.edit.unrelated import (given_questions, prompt_continuation,  # noqa: E402
                                     sampled_questions, with_answer_activations)
from editcomp.eval import perplexity  # noqa: E402
from editcomp.eval.edit_metrics import METRICS, edit_metrics, locality_reference  # noqa: E402
from intervals import row_ci  # noqa: E402  (benchmarks/intervals.py)

DATA = REPO.parent / "shared" / "data"


def snapshot(model):
    return [lp.down.weight.detach().clone() for lp in get_adapter(model).layers()]


def restore(model, saved):
    with torch.no_grad():
        for lp, w in zip(get_adapter(model).layers(), saved):
            lp.down.weight.copy_(w)


#: ablation: LAFN with the KL term on 4 unrelated questions per language and not on their answers
#: (the defaults before the KL term covered the unedited model's own continuations)
#: lafn-kl4: the KL term on a rotating quarter of the unrelated prompts per step (faster steps);
#: lafn-full-nll: the target NLL over the full vocabulary instead of the top-512 candidates;
#: lafn-fp32: the update steps in fp32 (the default runs their matmuls in bf16 where native);
#: lafn-kl8: 8 unrelated prompts per language (the default before session 9: 4);
#: lafn-noanswers: the unrelated questions without their short answers;
#: lafn-neighbors: also 2 subject-swapped copies of each fact's prompt per language in the KL;
#: lafn-nopreserve: without the preservation term (the default before session 13)
ABLATIONS = {"lafn-question-kl": dict(kl_per_lang=4, kl_continuation=0),
             "lafn-kl4": dict(kl_groups=4),
             "lafn-full-nll": dict(nll_vocab=None),
             "lafn-nokl": dict(kl_weight=0.0),
             "lafn-fp32": dict(autocast="off"),
             "lafn-kl8": dict(kl_per_lang=8),
             "lafn-noanswers": dict(kl_answers=False),
             "lafn-neighbors": dict(neighbors=2),
             "lafn-nopreserve": dict(preserve_weight=0.0)}
#: lafn-preserve:W -- the preservation term at weight W. Every LAFN row with a weight above 0
#: (the default's too) gets the activation moments of valid.txt windows, as ``editcomp edit``
#: reads that file by default


def _coerce(cls, key: str, text: str):
    """``text`` as the type of ``cls``'s field ``key``: its default's type, or for a None default
    its annotation's (``int | None`` -> int, ``bool | None`` -> bool, else float)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if key not in fields:
        raise SystemExit(f"unknown {cls.__name__} field {key!r}; valid: {', '.join(fields)}")
    f = fields[key]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if text.lower() == "none":
        return None
    if isinstance(default, bool) or str(f.type).startswith("bool"):
        return text.lower() in ("1", "true", "yes")
    if isinstance(default, (int, float, str)):
        return type(default)(text)
    return int(text) if str(f.type).startswith("int") else float(text)


def overrides(method) -> list[tuple[str, str]]:
    """The ``(FIELD, VALUE)`` pieces that end a row's name: ``lafn@lr=0.1@stop_nll=0.5``."""
    return [piece.partition("=")[::2] for piece in method.split("@")[1:]]


def lafn_config(method, args) -> LAFNConfig:
    """The LAFN settings of a row: an ablation's, then any ``@FIELD=VALUE`` pieces that end the
    row's name (``locate.FIELD`` for LocateConfig), e.g. ``lafn@stop_nll=0.5@lr=0.1``: a
    scratch config without a code change."""
    base = method.split("@")[0]
    extra = dict(ABLATIONS.get(base, {}))
    if base.startswith("lafn-preserve:"):
        extra["preserve_weight"] = float(base.split(":", 1)[1])
    locate = {}
    for key, value in overrides(method):
        if key.startswith("locate."):
            locate[key[7:]] = _coerce(LocateConfig, key[7:], value)
        else:
            extra[key] = _coerce(LAFNConfig, key, value)
    if locate:
        extra["locate"] = LocateConfig(**locate)
    return LAFNConfig(paraphrases=args.paraphrases, **extra)


def ftl_config(method, args) -> FTLConfig:
    """The FT-L settings of a row: ``ft-l`` is the default, ``ft-l@FIELD=VALUE`` pieces change
    FTLConfig fields, e.g. ``ft-l@norm_constraint=5e-5``."""
    extra = {key: _coerce(FTLConfig, key, value) for key, value in overrides(method)}
    return FTLConfig(paraphrases=args.paraphrases, **extra)


def is_ftl(method) -> bool:
    return method.split("@")[0] == "ft-l"


def moments_for(config, model, tok, args):
    """valid.txt's activation moments for ``config``'s window count and length, made once per
    pair of them on the unedited model (test.txt is the ppl probe)."""
    key = (config.preserve_windows, config.preserve_seq_len)
    if key not in args.moments:
        args.moments[key] = preservation_moments(model, tok, DATA / "wikitext-2" / "valid.txt",
                                                 config)
    return args.moments[key]


def is_lafn(method) -> bool:
    base = method.split("@")[0]
    return base == "lafn" or base in ABLATIONS or base.startswith("lafn-preserve:")


def questions_for(config, model, tok, langs, args, bank=None, alone=False):
    """LAFN's unrelated questions for ``config``: sampled from the unedited model, or with
    ``--questions heldout`` the ``bank`` (``heldout_questions``); made once per languages and
    question settings (``lafn_edit`` would sample them in each call). The key leaves out the
    pair: the cross protocol's English-only pool is made from the first pair's bank and serves
    every pair, which is right because BMIKE-53's language files hold the same English records
    in the same order (so the same English held-out questions). ``alone``: the pool of facts
    edited alone (shorter continuations: ``LAFNConfig.continuation_for``)."""
    given = args.questions_from == "heldout"
    key = (tuple(langs), config.questions_per_lang(given),
           prompt_continuation(config, alone), args.questions_from)
    if key not in args.questions:
        args.questions[key] = (given_questions(model, tok, bank, langs, config, alone=alone)
                               if given else sampled_questions(model, tok, langs, config,
                                                               alone=alone))
    return args.questions[key]


def single_pool(config, model, tok, langs, args, bank=None):
    """The question pool of ``config``'s single edits (``questions_for`` with what its edits take
    from it: ``with_answer_activations``), or None when they take none; made once per questions
    and what is taken from them, so rows (or settings) that share them share one pass."""
    if not config.samples_questions(1):
        return None
    given = args.questions_from == "heldout"
    key = ("single", tuple(langs), config.questions_per_lang(given),
           prompt_continuation(config, True),
           args.questions_from, config.takes_risk_questions(given),
           config.answer_preserve_for(1) > 0, config.locate.min_layer)
    if key not in args.questions:
        args.questions[key] = with_answer_activations(
            model, tok, questions_for(config, model, tok, langs, args, bank, alone=True), config)
    return args.questions[key]


def heldout_questions(evaluated, later, langs, seed: int = 0) -> list[Question]:
    """The locality questions of the ``later`` cases (those after ``--cases``), with their gold
    answers, shuffled (``seed``); any whose text is an ``evaluated`` case's locality probe is
    dropped, so no probe is trained on."""
    bank = []
    for lang in langs:
        probed = {p.prompt for f in evaluated for p in f.langs[lang].locality}
        rows = list(dict.fromkeys((p.prompt, p.answer) for f in later
                                  for p in f.langs[lang].locality if p.prompt not in probed))
        random.Random(seed).shuffle(rows)
        bank += [Question(lang, q, a, f"heldout {lang}") for q, a in rows]
    return bank


def edit(method, model, tok, facts, langs, args, unrelated=None, questions=None):
    if is_lafn(method):
        config = lafn_config(method, args)
        preserve = moments_for(config, model, tok, args) if config.preserve_weight > 0 else None
        return lafn_edit(model, tok, facts, config, langs, progress=False,
                         unrelated=unrelated, preserve=preserve, questions=questions,
                         answer_spans=args.spans)
    return ftl_edit(model, tok, facts, ftl_config(method, args), langs, progress=False)


def case_record(fact, report, seconds, result, langs) -> dict:
    """One single/cross edit: its time, optimizer steps, neurons, and accuracies per language
    (so a table's mean can be traced to the cases behind it)."""
    return {"case_id": fact.case_id, "seconds": round(seconds, 2),
            "steps": report.get("losses", {}).get("steps"),
            # the step whose deltas were written when the edit ended short (LAFNConfig.keep_best)
            "best_step": report.get("losses", {}).get("best_step"),
            "neurons": report.get("neurons", {}).get("total"),
            "by_lang": {lg: {m: result[lg][m]["acc"] for m in METRICS} for lg in langs},
            # probes per metric: each case's weight in its row's interval (intervals.row_ci)
            "probes": {lg: {m: result[lg][m]["n"] for m in METRICS} for lg in langs}}


class Tally:
    """Sums per-language (acc, em) weighted by probe counts over many metric results."""

    def __init__(self):
        self.sums: dict = {}

    def add(self, result: dict, langs):
        for lang in langs:
            for m in METRICS:
                r = result[lang][m]
                if r["n"]:
                    s = self.sums.setdefault((lang, m), [0.0, 0.0, 0])
                    s[0] += r["acc"] * r["n"]
                    s[1] += r["em"] * r["n"]
                    s[2] += r["n"]

    def table(self, langs) -> dict:
        out = {}
        for lang in langs:
            out[lang] = {}
            for m in METRICS:
                s = self.sums.get((lang, m))
                out[lang][m] = ({"acc": s[0] / s[2], "em": s[1] / s[2], "n": s[2]} if s
                                else {"acc": None, "em": None, "n": 0})
        return out


def run_lang(model, tok, lang, args, rows, windows, ppl_before):
    path = DATA / "bmike53-zsre" / f"zsre_test_{lang}.json"
    facts = load_facts(path, langs=["en", lang], skip_missing_langs=True)
    facts, later = facts[:args.cases], facts[args.cases:]
    langs = ["en", lang]
    bank = heldout_questions(facts, later, langs) if args.questions_from == "heldout" else None
    if args.only:  # re-run these cases only
        only = set(args.only.split(","))
        facts = [f for f in facts if str(f.case_id) in only]
    ref = locality_reference(model, tok, facts, langs, progress=False)
    saved = snapshot(model)
    for protocol in args.protocols:
        for method in args.methods:
            if protocol == "cross" and is_ftl(method) and not args.cross_ftl:
                continue
            tally, secs, neurons, cases = Tally(), [], [], []
            t_all = time.time()
            setup = 0.0
            if protocol in ("single", "cross"):
                train_langs = langs if protocol == "single" else ["en"]
                unrelated = questions = None
                if not is_ftl(method):  # the unedited model's KL continuations, once for all edits
                    t0 = time.time()
                    config = lafn_config(method, args)
                    unrelated = unrelated_prompts(model, tok, train_langs, config, alone=True)
                    # a pool, as a user's call samples once
                    questions = single_pool(config, model, tok, train_langs, args, bank)
                    setup = time.time() - t0
                for f in facts:
                    t0 = time.time()
                    rep = edit(method, model, tok, [f], train_langs, args, unrelated, questions)
                    secs.append(time.time() - t0)
                    if not is_ftl(method):
                        neurons.append(rep["neurons"]["total"])
                    res = edit_metrics(model, tok, [f], langs, progress=False, reference=ref)
                    tally.add(res, langs)
                    cases.append(case_record(f, rep, secs[-1], res, langs))
                    restore(model, saved)
                ppl_after = None
            else:
                questions = None
                config = lafn_config(method, args) if is_lafn(method) else None
                if config is not None and config.questions_per_lang(
                        args.questions_from == "heldout") > 0:
                    t0 = time.time()  # sampled once per language: a setup cost of each row
                    questions = questions_for(config, model, tok, langs, args, bank)
                    setup = args.sampling_seconds.setdefault(langs[-1], time.time() - t0)
                t0 = time.time()
                rep = edit(method, model, tok, facts, langs, args, questions=questions)
                secs.append(time.time() - t0)
                if not is_ftl(method):
                    neurons.append(rep["neurons"]["total"])
                tally.add(edit_metrics(model, tok, facts, langs, progress=False, reference=ref), langs)
                ppl_after = perplexity(model, windows)["ppl"] if windows is not None else None
                restore(model, saved)
            res = tally.table(langs)
            for lg in langs:
                rows.append({"model": args.model, "pair": f"en+{lang}", "protocol": protocol,
                             "method": method, "lang": lg, "cases": len(facts),
                             **{m: res[lg][m] for m in METRICS},
                             # batch: the one call's seconds over its facts
                             "seconds_per_edit": sum(secs) / (len(secs) if protocol != "batch"
                                                              else len(facts)),
                             "seconds_total": sum(secs),
                             "setup_seconds": setup,
                             "neurons_per_edit": sum(neurons) / len(neurons) if neurons else None,
                             "ppl_before": ppl_before if protocol == "batch" else None,
                             "ppl_after": ppl_after,
                             # batch: the one call's optimizer steps and end losses
                             "losses": rep.get("losses") if protocol == "batch" else None,
                             "per_case": [{**{k: v for k, v in c.items()
                                              if k not in ("by_lang", "probes")},
                                           **c["by_lang"][lg], "probes": c["probes"][lg]}
                                          for c in cases]})
                for m in METRICS:  # the spread of the cases (None for a batch: no cases)
                    rows[-1][m]["ci95"] = row_ci(rows[-1], m)
            print(f"[{time.strftime('%H:%M:%S')}] {args.model} en+{lang} {protocol} {method}: "
                  f"{time.time() - t_all:.0f} s  " + json.dumps({lg: {m: round(res[lg][m]['acc'], 3)
                                                                     for m in METRICS if res[lg][m]['n']}
                                                                for lg in langs}),
                  file=sys.stderr, flush=True)
            dump(rows, args)


def fmt(v):
    """``acc/em``, then the acc's 95% interval over the cases where the row has one."""
    if v is None or v.get("acc") is None:
        return "-"
    ci = v.get("ci95")
    return f"{v['acc']:.2f}/{v['em']:.2f}" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "")


def dump(rows, args):
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in vars(args).items() if k not in ("moments", "questions", "spans")}
    Path(args.out).write_text(json.dumps({"args": meta, "rows": rows}, indent=2,
                                         ensure_ascii=False) + "\n")


def table(rows) -> str:
    head = ("| model | pair | protocol | method | lang | cases | reliability | generality | locality "
            "| portability | s/edit | neurons | ppl before -> after |")
    out = [head, "|" + "---|" * 13]
    for r in rows:
        ppl = (f"{r['ppl_before']:.3f} -> {r['ppl_after']:.3f}" if r["ppl_after"] is not None else "")
        neu = f"{r['neurons_per_edit']:.0f}" if r["neurons_per_edit"] is not None else ""
        out.append(f"| {r['model']} | {r['pair']} | {r['protocol']} | {r['method']} | {r['lang']} "
                   f"| {r['cases']} | {fmt(r['reliability'])} | {fmt(r['generality'])} "
                   f"| {fmt(r['locality'])} | {fmt(r['portability'])} | {r['seconds_per_edit']:.1f} "
                   f"| {neu} | {ppl} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--langs", default="de,fr,zh,es")
    ap.add_argument("--cases", type=int, default=100, help="First N cases of each language file.")
    ap.add_argument("--only", default=None,
                    help="Comma-separated case ids: of the first --cases, run only these (to "
                    "re-run the cases a change touches; single and cross edits are deterministic).")
    ap.add_argument("--protocols", default="single,cross,batch")
    ap.add_argument("--methods", default="lafn,ft-l",
                    help="lafn, ft-l, and the ablations " + ", ".join(ABLATIONS)
                    + ", lafn-preserve:WEIGHT; any LAFN row may end in @FIELD=VALUE overrides "
                    "of LAFNConfig (locate.FIELD: LocateConfig), e.g. lafn@stop_nll=0.5, and any "
                    "FT-L row of FTLConfig, e.g. ft-l@norm_constraint=5e-5 or ft-l@objective=target_new "
                    "(EasyEdit's FT-M)")
    ap.add_argument("--questions", dest="questions_from", choices=["sampled", "heldout"],
                    default="sampled",
                    help="LAFN's unrelated questions (its KL term, answer preservation): sampled "
                         "from the model (the CLI's default), or heldout: the locality questions "
                         "of the file's cases after --cases, with their gold answers, shuffled, "
                         "none equal to an evaluated probe (the CLI's --questions FILE)")
    ap.add_argument("--cross-ftl", action="store_true", help="Also run FT-L in the cross protocol.")
    ap.add_argument("--paraphrases", type=int, default=LAFNConfig().paraphrases)
    ap.add_argument("--ppl-windows", type=int, default=16,
                    help="WikiText-2 test windows of --seq-len tokens for the batch ppl (0: skip); "
                         "over 4 the fr batch read x1.019 and x1.025 where 16 read x1.0045 and "
                         "x1.0078 (session 36).")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--device", default="cpu",
                    help="cpu (the default: the issue's speed targets are for this CPU), cuda, or auto")
    ap.add_argument("--dtype", default="fp32", help="fp32, bf16, or auto (bf16 on CUDA, else fp32)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.langs = [s for s in args.langs.split(",") if s]
    args.protocols = [s for s in args.protocols.split(",") if s]
    args.methods = [s for s in args.methods.split(",") if s]
    unknown = [m for m in args.methods if not is_ftl(m) and not is_lafn(m)]
    if unknown:  # as a bad @FIELD override below: before any work
        ap.error(f"unknown method(s) {', '.join(unknown)}: lafn, ft-l, the ablations "
                 f"{', '.join(ABLATIONS)}, lafn@FIELD=VALUE or ft-l@FIELD=VALUE")
    for m in args.methods:  # a bad @FIELD override fails before any work
        (lafn_config if is_lafn(m) else ftl_config)(m, args).validate()
    args.out = args.out or str(REPO / "benchmarks" / "results" / f"edit_{args.model}.json")
    torch.manual_seed(0)
    t0 = time.time()
    ck = checkpoint.load(args.model, device=args.device, dtype=args.dtype)
    model, tok = ck.model, ck.tokenizer
    windows = (token_windows(tok, DATA / "wikitext-2" / "test.txt", args.seq_len, args.ppl_windows)
               if args.ppl_windows and "batch" in args.protocols else None)
    ppl_before = perplexity(model, windows)["ppl"] if windows is not None else None
    # generic text for the preservation term, made before any edit (moments_for)
    args.moments, args.questions, args.sampling_seconds = {}, {}, {}
    # names and dates of the same text, the batch's foreign answers (LAFNConfig.foreign_answers)
    args.spans = answer_spans(load_text(DATA / "wikitext-2" / "valid.txt"))
    for config in (lafn_config(m, args) for m in filter(is_lafn, args.methods)):
        if config.preserve_weight > 0:
            moments_for(config, model, tok, args)
    rows: list[dict] = []
    for lang in args.langs:
        run_lang(model, tok, lang, args, rows, windows, ppl_before)
    args.wall_seconds = time.time() - t0
    args.peak_memory_mb = round(peak_memory_mb(next(model.parameters()).device))
    dump(rows, args)
    print(table(rows))
    print(f"\nwall time {args.wall_seconds:.0f} s; json: {args.out}")


if __name__ == "__main__":
    main()

"""Seconds per single LAFN edit under several settings, interleaved on the same cases.

On a shared or throttling CPU, two benchmark rows run one after the other can differ by 10% with
the same code; and the first of several edits of the same case runs slower than the rest. This
script edits each case once per setting, rotating which setting goes first from case to case,
and restores the model in between, so that both effects fall on every setting alike. Only time
and optimizer steps are compared: the metrics are ``benchmarks/edit.py``'s job. A setting that
takes questions (risk questions, answer preservation) gets its pool once, as ``benchmarks/edit.py``
does (sampled, or with ``--questions heldout`` the later cases' locality questions), so no
edit's time includes making it.

    python benchmarks/edit_speed.py --model smollm2-135m --lang de --cases 6 \
        --methods "lafn@pack=None,lafn" --out benchmarks/results/edit_speed_smollm2-135m_pack.json

``--methods`` takes ``benchmarks/edit.py``'s LAFN rows (``lafn@FIELD=VALUE...``); a row ending in
``:fresh`` gets the unrelated prompts without their known top tokens and generic stats, so each of
its edits finds them again (as every edit did before ``UnrelatedPrompts`` carried them):

    python benchmarks/edit_speed.py --model gemma3-270m --lang zh --cases 20 \
        --methods "lafn:fresh,lafn" --out benchmarks/results/edit_speed_gemma3-270m_known_kl.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from edit import (DATA, heldout_questions, lafn_config, moments_for,  # benchmarks/edit.py
                  restore, single_pool, snapshot)

from editcomp import checkpoint
from editcomp.data import load_facts
from editcomp.edit import LAFNConfig, lafn_edit, unrelated_prompts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--lang", default="de", help="The BMIKE-53 language paired with en.")
    ap.add_argument("--cases", type=int, default=6, help="First N cases of the language file.")
    ap.add_argument("--methods", default="lafn@pack=None,lafn")
    ap.add_argument("--paraphrases", type=int, default=LAFNConfig().paraphrases)
    ap.add_argument("--questions", dest="questions_from", choices=["sampled", "heldout"],
                    default="sampled", help="The question pool: as benchmarks/edit.py's.")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    methods = args.methods.split(",")
    fresh = [m.endswith(":fresh") for m in methods]
    # a bad override fails before any work
    configs = [lafn_config(m.removesuffix(":fresh"), args) for m in methods]
    args.moments, args.questions = {}, {}
    model, tok = (ck := checkpoint.load(args.model)).model, ck.tokenizer
    langs = ["en", args.lang]
    facts = load_facts(DATA / "bmike53-zsre" / f"zsre_test_{args.lang}.json", langs=langs,
                       skip_missing_langs=True)
    facts, later = facts[:args.cases], facts[args.cases:]
    bank = heldout_questions(facts, later, langs) if args.questions_from == "heldout" else None
    unrelated = [unrelated_prompts(model, tok, langs, c, alone=True) for c in configs]
    unrelated = [replace(u, top=None, generic=None) if f else u
                 for u, f in zip(unrelated, fresh)]
    preserve = [moments_for(c, model, tok, args) if c.preserve_weight > 0 else None
                for c in configs]
    pools = [single_pool(c, model, tok, langs, args, bank) for c in configs]
    saved = snapshot(model)
    runs = {m: [] for m in methods}
    for i, fact in enumerate(facts):
        for k in range(len(methods)):
            j = (i + k) % len(methods)  # case i starts with setting i mod n
            t0 = time.perf_counter()
            rep = lafn_edit(model, tok, [fact], configs[j], langs, progress=False,
                            unrelated=unrelated[j], preserve=preserve[j], questions=pools[j])
            seconds = time.perf_counter() - t0
            restore(model, saved)
            runs[methods[j]].append({"case_id": fact.case_id, "seconds": round(seconds, 3),
                                     "steps": rep["losses"]["steps"], "first": k == 0})
            print(f"case {fact.case_id} {methods[j]}: {seconds:.2f} s, "
                  f"{rep['losses']['steps']} steps", file=sys.stderr, flush=True)
    rows = []
    for m, cases in runs.items():
        secs = sum(c["seconds"] for c in cases)
        steps = sum(c["steps"] for c in cases)
        rows.append({"method": m, "cases": len(cases), "seconds_per_edit": secs / len(cases),
                     "steps_per_edit": steps / len(cases), "per_case": cases})
    base = rows[0]["seconds_per_edit"]
    print(f"| model | method | cases | s/edit | vs {methods[0]} | steps/edit |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {args.model} | {r['method']} | {r['cases']} | {r['seconds_per_edit']:.2f} | "
              f"x{r['seconds_per_edit'] / base:.3f} | {r['steps_per_edit']:.1f} |")
    if args.out:
        kept = {"moments": None, "questions": None}  # tensors: not JSON
        Path(args.out).write_text(json.dumps({"args": vars(args) | kept, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""Where does a LAFN edit leak? The unedited vs edited next-token distributions at the answer
positions of four kinds of unrelated questions (``--protocol single``: each fact edited alone,
its own locality probes only):

- ``loc``: the BMIKE-53 locality probes (teacher-forced on their gold answers; what the benchmark's
  locality scores);
- ``kl``: the sampled questions the edit's KL term trained on (with the unedited model's greedy
  answers);
- ``held``: as many questions sampled with another seed, never trained on (the same form as ``kl``);
- ``loc_own``: the locality probes' questions with the unedited model's own greedy answer (as many
  tokens as the gold one) instead of the gold answer: is it the probes' questions that the edit
  moves, or the gold answers the model would not write itself?

Per kind: KL(unedited || edited) per answer position, the share of positions whose argmax is
unchanged, the share of the changed ones that now predict a token of an edit target, the tokens
they flip to, where in the answer they flip, the unedited model's margin (top-1 minus top-2
log-prob) where they flip and where they do not, and how many flips are at a position whose
teacher-forced token the unedited model did not predict anyway. If ``held`` is kept about as
well as ``kl`` while ``loc`` is not, the KL term generalizes to questions like its own but not
to the probes; where ``loc_own`` falls between them says how much of that is the probes'
questions and how much their gold answers.

    python benchmarks/edit_leak.py --model gemma3-270m --lang de --cases 100
    python benchmarks/edit_leak.py --protocol single --lang zh --only 9,11,14,18,75,83
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from editcomp import checkpoint  # noqa: E402
from editcomp.data import load_facts, load_text  # noqa: E402
from editcomp.edit import LAFNConfig, lafn_edit, unrelated_prompts  # noqa: E402
from editcomp.edit.answers import answer_spans  # noqa: E402
from editcomp.edit.lafn import preservation_moments  # noqa: E402
from editcomp.edit.layout import right_pad  # noqa: E402
from editcomp.edit.runner import ModelRunner, gather_positions  # noqa: E402
from editcomp.edit.unrelated import sampled_questions  # noqa: E402
from editcomp.eval.edit_metrics import (encode_prompt_target, greedy_continuations,  # noqa: E402
                                        target_token_ids)

DATA = REPO.parent / "shared" / "data"


def probe_positions(tok, facts, langs) -> list[tuple[list[int], list[int]]]:
    """The locality probes: (prompt + gold answer ids, the positions predicting the answer)."""
    out = []
    for f in facts:
        for lang in langs:
            for probe in f.langs[lang].locality:
                p, a = encode_prompt_target(tok, probe.prompt, probe.answer, lang)
                out.append((list(p) + list(a), list(range(len(p) - 1, len(p) + len(a) - 1))))
    return out


def own_answers(model, tok, probes) -> list[tuple[list[int], list[int]]]:
    """``probes`` with each gold answer replaced by the unedited model's greedy continuation of
    the question, as many tokens long; the same positions."""
    prompts = [ids[:pos[0] + 1] for ids, pos in probes]
    conts = greedy_continuations(model, tok, prompts, max(len(pos) for _, pos in probes))
    out = []
    for p, c, (_, pos) in zip(prompts, conts, probes):
        n = min(len(pos), len(c))  # a continuation may end at EOS first
        if n:
            out.append((p + c[:n], pos[:n]))
    return out


def question_positions(pool, skip=()) -> list[tuple[list[int], list[int]]]:
    """Sampled questions: (ids with the greedy answer, the positions from the question's last token)."""
    return [(list(ids), list(range(end, len(ids) - 1)))
            for ids, end, text in zip(pool.ids, pool.ends, pool.texts) if text not in skip]


@torch.no_grad()
def log_probs(runner: ModelRunner, items, batch_size: int = 16) -> list[torch.Tensor]:
    """Each item's next-token log-probs at its positions (the output layer runs only there)."""
    out = []
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        ids, mask = right_pad([c[0] for c in chunk], runner.pad, runner.device)
        rows = [i for i, c in enumerate(chunk) for _ in c[1]]
        cols = [j for c in chunk for j in c[1]]
        logp = torch.log_softmax(runner.head(gather_positions(runner.hidden(ids, mask), rows, cols)), -1)
        out += list(logp.cpu().split([len(c[1]) for c in chunk]))
    return out


def compare(tok, items, before, after, targets) -> dict:
    """``targets``: per item, the target token ids of the edit it was read after."""
    kl, same, to_target, was_wrong, n = 0.0, 0, 0, 0, 0
    flipped_to, where = collections.Counter(), collections.Counter()
    margins = {True: [], False: []}  # flipped or not -> the unedited model's top-1 margin
    for k, ((ids, pos), b, a) in enumerate(zip(items, before, after)):
        kl += float((b.exp() * (b - a)).sum())
        top2 = b.topk(2, dim=-1).values
        for j, (x, y) in enumerate(zip(b.argmax(-1).tolist(), a.argmax(-1).tolist())):
            n += 1
            margins[x != y].append(float(top2[j, 0] - top2[j, 1]))
            if x == y:
                same += 1
                continue
            to_target += y in targets[k]
            was_wrong += x != ids[pos[j] + 1]
            flipped_to[tok.decode([y])] += 1
            where[min(j, 3)] += 1
    changed = max(1, n - same)
    median = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    return {"positions": n, "kl_per_position": kl / n, "argmax_kept": same / n,
            "flips_to_a_target": to_target / changed,
            "flips_where_unedited_missed_the_forced_token": was_wrong / changed,
            "margin_median_flipped": median(margins[True]),
            "margin_median_kept": median(margins[False]),
            "flipped_to": flipped_to.most_common(12),
            "flips_by_answer_position": {("3+" if k == 3 else str(k)): v
                                         for k, v in sorted(where.items())}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--lang", default="de")
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--protocol", choices=("batch", "single"), default="batch",
                    help="batch: all cases in one edit; single: each alone, restored after")
    ap.add_argument("--only", default=None, help="Comma-separated case ids of the first --cases.")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    suffix = "" if args.protocol == "batch" else "_single"
    out = Path(args.out or REPO / "benchmarks" / "results"
               / f"edit_leak_{args.model}_{args.lang}{suffix}.json")
    t0 = time.time()
    ck = checkpoint.load(args.model, device="cpu", dtype="fp32")
    model, tok = ck.model, ck.tokenizer
    langs = ["en", args.lang]
    facts = load_facts(DATA / "bmike53-zsre" / f"zsre_test_{args.lang}.json", langs=langs,
                       limit=args.cases, skip_missing_langs=True)
    if args.only:
        only = set(args.only.split(","))
        facts = [f for f in facts if str(f.case_id) in only]
    config = LAFNConfig()
    if args.protocol == "single":
        return single(model, tok, facts, langs, config, args, out, t0)
    trained = sampled_questions(model, tok, langs, config)
    held = sampled_questions(model, tok, langs, config, seed=1)
    preserve = preservation_moments(model, tok, DATA / "wikitext-2" / "valid.txt", config)
    probes = probe_positions(tok, facts, langs)
    kinds = {"loc": probes, "kl": question_positions(trained),
             "held": question_positions(held, skip=set(trained.texts)),
             "loc_own": own_answers(model, tok, probes)}
    runner = ModelRunner(model, tok)
    before = {k: log_probs(runner, v) for k, v in kinds.items()}
    spans = answer_spans(load_text(DATA / "wikitext-2" / "valid.txt"))
    report = lafn_edit(model, tok, facts, config, langs, progress=True, preserve=preserve,
                       questions=trained, answer_spans=spans)
    after = {k: log_probs(runner, v) for k, v in kinds.items()}
    targets = {t for f in facts for lang in langs
               for t in target_token_ids(tok, f.langs[lang].prompt, f.langs[lang].target, lang)}
    result = {k: compare(tok, kinds[k], before[k], after[k], [targets] * len(kinds[k]))
              for k in kinds}
    write(out, args, result, t0, edit_seconds=report["seconds"], losses=report["losses"])


def single(model, tok, facts, langs, config, args, out, t0):
    """Each fact edited alone (as benchmarks/edit.py's single protocol), its own locality probes
    read before and after, the weights restored in between."""
    from edit import restore, snapshot  # benchmarks/edit.py
    unrelated = unrelated_prompts(model, tok, langs, config, alone=True)
    preserve = preservation_moments(model, tok, DATA / "wikitext-2" / "valid.txt", config)
    runner, saved = ModelRunner(model, tok), snapshot(model)
    items, before, after, targets, seconds = [], [], [], [], []
    for f in facts:
        probes = probe_positions(tok, [f], langs)
        before += log_probs(runner, probes)
        report = lafn_edit(model, tok, [f], config, langs, progress=False, unrelated=unrelated,
                           preserve=preserve)
        after += log_probs(runner, probes)
        restore(model, saved)
        items += probes
        seconds.append(report["seconds"])
        ids = {t for lang in langs
               for t in target_token_ids(tok, f.langs[lang].prompt, f.langs[lang].target, lang)}
        targets += [ids] * len(probes)
    write(out, args, {"loc": compare(tok, items, before, after, targets)}, t0,
          edit_seconds=sum(seconds))


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def write(out, args, result, t0, **extra):
    for k, r in result.items():
        print(f"{k:5s} positions {r['positions']:5d}  KL/position {r['kl_per_position']:.3f}  "
              f"argmax kept {r['argmax_kept']:.3f}  "
              f"flips to a target {r['flips_to_a_target']:.2f}  "
              f"margin flipped/kept {_fmt(r['margin_median_flipped'])}/"
              f"{_fmt(r['margin_median_kept'])}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), **extra, "kinds": result,
                               "wall_seconds": time.time() - t0}, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()

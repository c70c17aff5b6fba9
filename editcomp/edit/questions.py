"""Unrelated questions the unedited model writes itself, for a batch edit's KL and preservation terms.

A batch of edits leaks into the answers of questions it was never about: on gemma3-270m, 100 de
cases edited together with 8 hand-written unrelated prompts in the KL term (preservation weight
100) flipped 37% of the locality probes' answer tokens, 42% of those to a token of one of the
batch's targets, and moved their next-token distributions by 2.1 nats per token (session 15).
A few fixed prompts cannot cover that; hundreds of questions can, and the model writes them in
any language it knows without a data set: it continues a few-shot list of questions
(``prompts.KL_PROMPTS``'s questions in that language), sampled, and each line that is a
question is kept. The evaluation probes are never seen.
"""

from __future__ import annotations

import torch

from editcomp.device import seeded
from editcomp.edit.prompts import KL_PROMPTS, _base
from editcomp.eval.perplexity import eval_mode

QUESTION_ENDS = ("?", "？")


def few_shot_questions(lang: str) -> list[str]:
    """The hand-written questions that start the list the model continues (English for a
    language without its own)."""
    return [q for q in KL_PROMPTS.get(_base(lang), KL_PROMPTS["en"]) if q.endswith(QUESTION_ENDS)]


def names_a_subject(text: str, subjects) -> bool:
    """Whether ``text`` mentions any of ``subjects`` (case-insensitive): an unrelated prompt
    about an edited subject would hold the edit back."""
    lowered = text.lower()
    return any(s and s.lower() in lowered for s in subjects)


def keep_questions(lines: list[str], shots: list[str], subjects: list[str] = (),
                   min_chars: int = 8) -> list[str]:
    """The lines that are new questions: end with a question mark, at least ``min_chars`` long,
    not a few-shot example, first occurrence only, and naming none of ``subjects``."""
    seen = set(shots)
    out = []
    for line in (s.strip() for s in lines):
        if (len(line) < min_chars or not line.endswith(QUESTION_ENDS) or line in seen
                or names_a_subject(line, subjects)):
            continue
        seen.add(line)
        out.append(line)
    return out


@torch.no_grad()
def sample_questions(model, tokenizer, lang: str, n: int, seed: int = 0,
                     max_new_tokens: int = 24) -> list[str]:
    """Up to ``n`` distinct questions in ``lang``, sampled (top-p 0.95) from the model as the next
    line of a list of ``few_shot_questions``; deterministic for a seed. Lines that are not
    questions are dropped, so a model that writes few gives fewer than ``n``."""
    if n <= 0:
        return []
    shots = few_shot_questions(lang)
    ids = tokenizer("".join(f"{q}\n" for q in shots), return_tensors="pt")["input_ids"]
    ids = ids.to(next(model.parameters()).device)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    stop = [t for t in (newline[-1:] + [tokenizer.eos_token_id]) if t is not None]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[-1]
    with seeded(seed, ids.device), eval_mode(model):
        out = model.generate(ids, do_sample=True, top_p=0.95, temperature=1.0, top_k=0,
                             max_new_tokens=max_new_tokens, num_return_sequences=n,
                             eos_token_id=stop, pad_token_id=pad)
    lines = [tokenizer.decode(o[ids.shape[1]:], skip_special_tokens=True).split("\n")[0]
             for o in out]
    return keep_questions(lines, shots)

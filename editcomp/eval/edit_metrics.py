"""Did the edit take, per language? Reliability, generality, locality and portability.

Every metric is computed from teacher-forced forward passes (right-padded batches with an attention
mask), which is architecture-agnostic and fast:

- ``acc``: fraction of the expected tokens that are the argmax at the position before them;
- ``em``: greedy decoding of ``len(expected)`` tokens reproduces the expected tokens exactly. Greedy
  decoding reproduces a sequence iff every argmax along that sequence hits, so ``em`` is "all positions
  right" of the same teacher-forced pass -- identical to ``generate(do_sample=False)`` without its cost.

Locality asks whether the model still says what it said before the edit: ``locality_reference`` records
the unedited model's predictions (teacher-forced argmax, and its greedy ``generate`` continuation) and
``edit_metrics(..., reference=...)`` compares against them. Without a reference the probes' own answers
are the expected tokens.
"""

from __future__ import annotations

from tqdm.auto import tqdm

import torch

from editcomp.data import Fact, pad_id
from editcomp.errors import DataError
from editcomp.eval.perplexity import eval_mode, model_device

METRICS = ("reliability", "generality", "locality", "portability")
# Languages written without spaces between words: the target follows the prompt directly.
NO_SPACE_LANGS = frozenset({"zh", "ja", "th", "lo", "km", "my", "bo", "yue", "wuu"})


def join_prompt_target(prompt: str, target: str, lang: str) -> str:
    """The text a model should produce: prompt, then the target after a space (none for zh/ja/...)."""
    base = lang.lower().replace("_", "-").split("-")[0]
    if base in NO_SPACE_LANGS or not prompt or prompt[-1].isspace() or target[:1].isspace():
        return prompt + target
    return prompt + " " + target


def encode_prompt_target(tokenizer, prompt: str, target: str, lang: str) -> tuple[list[int], list[int]]:
    """-> (prompt ids, target ids) whose concatenation is exactly the tokenization of the joined text.

    Both use the tokenizer's default special tokens (so BOS is there iff the tokenizer adds it). If the
    joined text tokenizes the prompt's end differently, the split is at the longest common prefix.
    """
    full = list(tokenizer(join_prompt_target(prompt, target, lang))["input_ids"])
    pre = list(tokenizer(prompt)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and pre and full and pre[-1] == eos and full[-1] == eos:
        pre, full = pre[:-1], full[:-1]  # a tokenizer that appends EOS: it is not part of the target
    k = 0
    while k < min(len(pre), len(full)) and pre[k] == full[k]:
        k += 1
    if k == 0 or k == len(full):
        raise DataError(f"cannot split {join_prompt_target(prompt, target, lang)!r} into prompt and "
                        f"target tokens (the prompt must give at least one token, the target one more)")
    return full[:k], full[k:]


def target_token_ids(tokenizer, prompt: str, target: str, lang: str) -> list[int]:
    """The token ids of ``target`` as it follows ``prompt`` (what an editor trains and we score)."""
    return encode_prompt_target(tokenizer, prompt, target, lang)[1]


def _eos_ids(tokenizer, model) -> set[int]:
    """End-of-sequence ids from the tokenizer and the model config (an int or a list)."""
    ids = set()
    for v in (getattr(tokenizer, "eos_token_id", None), getattr(model.config, "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return ids


class _Runner:
    """Runs a model over batches of (prompt ids, continuation) items and advances the progress bar."""

    def __init__(self, model, tokenizer, batch_size: int, bar):
        self.model, self.pad, self.bs, self.bar = model, pad_id(tokenizer), batch_size, bar
        self.device = model_device(model)
        self.eos = _eos_ids(tokenizer, model)

    def _forward(self, seqs: list[list[int]]) -> torch.Tensor:
        """Argmax token at every position of right-padded ``seqs`` -> ``[B, T]`` (on CPU)."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False)
        return out.logits.argmax(-1).cpu()

    def argmax(self, items: list[tuple[list[int], list[int]]]) -> list[list[int]]:
        """For each (prompt, cont): the model's argmax at each position that predicts a cont token."""
        order = sorted(range(len(items)), key=lambda i: len(items[i][0]) + len(items[i][1]))
        out: list[list[int]] = [[] for _ in items]
        for s in range(0, len(order), self.bs):
            idx = order[s:s + self.bs]
            pred = self._forward([items[i][0] + items[i][1][:-1] for i in idx])
            for row, i in enumerate(idx):
                p, t = len(items[i][0]), len(items[i][1])
                out[i] = pred[row, p - 1:p - 1 + t].tolist()
            self.bar.update(1)
        return out

    def greedy(self, items: list[tuple[list[int], int]]) -> list[list[int]]:
        """Greedy decoding of up to n tokens after each prompt (left-padded ``model.generate``).

        Pure argmax decoding: the model's own generation defaults (repetition penalty, n-gram bans,
        minimum lengths) are overridden. A continuation ends early at EOS, which it then includes.
        """
        eos = sorted(self.eos)
        out: list[list[int]] = [[] for _ in items]
        # batch similar lengths together: one long answer must not make 15 short ones decode with it
        order = sorted(range(len(items)), key=lambda i: (items[i][1], len(items[i][0])))
        for s in range(0, len(order), self.bs):
            idx = order[s:s + self.bs]
            width = max(len(items[i][0]) for i in idx)
            ids = torch.full((len(idx), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                p = items[i][0]
                ids[row, width - len(p):] = torch.tensor(p)
                mask[row, width - len(p):] = 1
            gen = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                max_new_tokens=max(items[i][1] for i in idx), min_new_tokens=0, do_sample=False,
                num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0, pad_token_id=self.pad,
                eos_token_id=eos or None)
            for row, i in enumerate(idx):
                toks = gen[row, width:width + items[i][1]].tolist()
                cut = next((k + 1 for k, t in enumerate(toks) if t in self.eos), len(toks))
                out[i] = toks[:cut]
            self.bar.update(1)
        return out


def _n_batches(n: int, bs: int) -> int:
    return (n + bs - 1) // bs


def languages_of(facts: list[Fact], langs=None) -> list[str]:
    """The languages to work in: ``langs``, else (None or empty) every language of a fact, in
    first-seen order."""
    if langs:
        return list(langs)
    return list(dict.fromkeys(lang for f in facts for lang in f.langs))


def locality_reference(model, tokenizer, facts: list[Fact], langs=None, progress: bool = True,
                       batch_size: int = 16) -> dict:
    """The unedited model's locality predictions, to pass as ``edit_metrics(..., reference=)``.

    -> ``{case_id: {lang: [{"tf": [...], "gen": [...]}, ...]}}`` (one entry per locality probe):
    ``tf`` the teacher-forced argmax on the probe's answer tokens, ``gen`` the greedy continuation of
    the same length (shorter if it ended with EOS). Plain lists of ints, so it can be stored as JSON.
    """
    langs = languages_of(facts, langs)
    keys, items = [], []
    for f in facts:
        for lang in langs:
            if lang in f.langs:
                for j, probe in enumerate(f.langs[lang].locality):
                    keys.append((f.case_id, lang, j))
                    items.append(encode_prompt_target(tokenizer, probe.prompt, probe.answer, lang))
    ref: dict = {}
    for f in facts:
        for lang in langs:
            if lang in f.langs:
                ref.setdefault(f.case_id, {})[lang] = [None] * len(f.langs[lang].locality)
    with eval_mode(model), torch.inference_mode(), tqdm(
            total=2 * _n_batches(len(items), batch_size), desc="locality reference", unit="batch",
            disable=not progress, leave=False) as bar:
        run = _Runner(model, tokenizer, batch_size, bar)
        tf = run.argmax(items)
        gen = run.greedy([(p, len(t)) for p, t in items])
    for (cid, lang, j), a, g in zip(keys, tf, gen):
        ref[cid][lang][j] = {"tf": a, "gen": g}
    return ref


def greedy_continuations(model, tokenizer, prompts: list[list[int]], n: int,
                         batch_size: int = 16) -> list[list[int]]:
    """The model's greedy continuation (up to ``n`` tokens, ending at EOS) of each prompt's ids."""
    with eval_mode(model), torch.inference_mode(), tqdm(disable=True) as bar:
        return _Runner(model, tokenizer, batch_size, bar).greedy([(list(p), n) for p in prompts])


def _reference_entry(reference: dict, case_id: str, lang: str, j: int) -> dict:
    try:
        return reference[case_id][lang][j]
    except (KeyError, IndexError, TypeError):
        raise DataError(f"the locality reference has no prediction for fact {case_id!r} ({lang}, probe {j}); "
                        f"compute it with locality_reference on the same facts") from None


def _summary(scores: list[tuple[float, bool]]) -> dict:
    if not scores:
        return {"acc": None, "em": None, "n": 0}
    return {"acc": sum(a for a, _ in scores) / len(scores),
            "em": sum(1.0 for _, e in scores if e) / len(scores), "n": len(scores)}


def edit_metrics(model, tokenizer, facts: list[Fact], langs=None, progress: bool = True,
                 reference: dict | None = None, batch_size: int = 16) -> dict:
    """Edit success per language and their mean over languages.

    -> ``{lang: {metric: {"acc", "em", "n"}}, "mean": {metric: {...}}}`` for metric in reliability,
    generality, locality, portability. ``n`` counts probes (reliability: cases); each probe weighs the
    same. A metric with no probes has ``acc = em = None`` and is left out of the mean.
    """
    langs = languages_of(facts, langs)
    # (lang, metric, prompt ids, teacher-forced continuation, ids the argmax is compared with)
    tasks: list[tuple[str, str, list[int], list[int], list[int]]] = []

    def add(lang, metric, prompt, answer, compare=None):
        p, t = encode_prompt_target(tokenizer, prompt, answer, lang)
        tasks.append((lang, metric, p, t, t if compare is None else compare))
        return p, t

    for f in facts:
        for lang in langs:
            if lang not in f.langs:
                continue
            fl = f.langs[lang]
            add(lang, "reliability", fl.prompt, fl.target)
            for prompt in fl.generality:
                add(lang, "generality", prompt, fl.target)
            for j, probe in enumerate(fl.locality):
                if reference is None:
                    add(lang, "locality", probe.prompt, probe.answer)
                    continue
                ref = _reference_entry(reference, f.case_id, lang, j)
                p, t = add(lang, "locality-acc", probe.prompt, probe.answer, compare=list(ref["tf"]))
                if len(ref["tf"]) != len(t) or not 1 <= len(ref["gen"]) <= len(t):
                    raise DataError(f"the locality reference for fact {f.case_id!r} ({lang}, probe {j}) "
                                    f"does not match its answer tokens; was it computed with another "
                                    f"tokenizer or facts file?")
                tasks.append((lang, "locality-em", p, list(ref["gen"]), list(ref["gen"])))
            for probe in fl.portability:
                add(lang, "portability", probe.prompt, probe.answer)

    with eval_mode(model), torch.inference_mode(), tqdm(
            total=_n_batches(len(tasks), batch_size), desc="edit metrics", unit="batch",
            disable=not progress, leave=False) as bar:
        preds = _Runner(model, tokenizer, batch_size, bar).argmax([(p, t) for _, _, p, t, _ in tasks])

    scores = {lang: {m: [] for m in METRICS} for lang in langs}
    acc = None
    for (lang, metric, _, _, compare), pred in zip(tasks, preds):
        hits = [a == b for a, b in zip(pred, compare)]
        if metric == "locality-acc":  # agreement with the unedited model's teacher-forced argmax
            acc = sum(hits) / len(hits)
        elif metric == "locality-em":  # the unedited model's greedy continuation is still greedy
            scores[lang]["locality"].append((acc, all(hits)))
        else:
            scores[lang][metric].append((sum(hits) / len(hits), all(hits)))

    result = {lang: {m: _summary(scores[lang][m]) for m in METRICS} for lang in langs}
    mean = {}
    for m in METRICS:
        per = [result[lang][m] for lang in langs if result[lang][m]["n"]]
        mean[m] = {"acc": sum(r["acc"] for r in per) / len(per) if per else None,
                   "em": sum(r["em"] for r in per) / len(per) if per else None,
                   "n": sum(r["n"] for r in per)}
    result["mean"] = mean
    return result

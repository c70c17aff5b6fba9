"""Unrelated questions the unedited model writes itself, for a batch edit's KL and preservation terms.

A batch of edits leaks into the answers of questions it was never about: on gemma3-270m, 100 de
cases edited together with 8 hand-written unrelated prompts in the KL term (preservation weight
100) flipped 37% of the locality probes' answer tokens, 42% of those to a token of one of the
batch's targets, and moved their next-token distributions by 2.1 nats per token (session 15).
A few fixed prompts cannot cover that; hundreds of questions can, and the model writes them in
any language it knows without a data set: it continues a few-shot list of questions
(``ENTITY_QUESTIONS`` and ``prompts.KL_PROMPTS``'s questions in that language), sampled, and
each line that is a question is kept. The evaluation probes are never seen.
"""

from __future__ import annotations

import itertools

from editcomp.decoding import sample_continuations
from editcomp.device import seeded
from editcomp.edit.prompts import KL_PROMPTS, _base
from editcomp.eval.perplexity import eval_mode

QUESTION_ENDS = ("?", "？")
QUESTION_TOKENS = 24  # the most tokens a sampled question may take

# Questions about named people, works, teams and places, which the few-shot list mixes with
# KL_PROMPTS' general-knowledge ones. With those alone gemma3-270m writes school-science
# questions ("What gas is contained in oxygen?"), while what a user asks a model, and what
# edit benchmarks probe locality with (zsRE's are Natural Questions), names an entity: a song,
# a show, a film, a match. Hand-written; none is taken from a benchmark.
ENTITY_QUESTIONS: dict[str, tuple[str, ...]] = {
    "en": ("Who sang the song \"Bohemian Rhapsody\"?", "Who directed the film Jurassic Park?",
           "When did the TV series Friends first air?", "Which team won the 2014 FIFA World Cup?",
           "Who plays Hermione Granger in the Harry Potter films?",
           "In which city was Wolfgang Amadeus Mozart born?",
           "Who wrote the book The Hunger Games?", "What is the name of the hero of The Legend of Zelda?"),
    "de": ("Wer sang das Lied \"Bohemian Rhapsody\"?", "Wer führte Regie bei dem Film Jurassic Park?",
           "Wann lief die Serie Friends zum ersten Mal im Fernsehen?",
           "Welche Mannschaft gewann die Fußball-Weltmeisterschaft 2014?",
           "Wer spielt Hermine Granger in den Harry-Potter-Filmen?",
           "In welcher Stadt wurde Wolfgang Amadeus Mozart geboren?",
           "Wer schrieb das Buch Die Tribute von Panem?",
           "Wie heißt der Held von The Legend of Zelda?"),
    "fr": ("Qui a chanté la chanson « Bohemian Rhapsody » ?", "Qui a réalisé le film Jurassic Park ?",
           "Quand la série Friends a-t-elle été diffusée pour la première fois ?",
           "Quelle équipe a gagné la Coupe du monde de football 2014 ?",
           "Qui joue Hermione Granger dans les films Harry Potter ?",
           "Dans quelle ville est né Wolfgang Amadeus Mozart ?",
           "Qui a écrit le livre Hunger Games ?", "Comment s'appelle le héros de The Legend of Zelda ?"),
    "es": ("¿Quién cantó la canción \"Bohemian Rhapsody\"?", "¿Quién dirigió la película Jurassic Park?",
           "¿Cuándo se emitió por primera vez la serie Friends?",
           "¿Qué equipo ganó la Copa Mundial de Fútbol de 2014?",
           "¿Quién interpreta a Hermione Granger en las películas de Harry Potter?",
           "¿En qué ciudad nació Wolfgang Amadeus Mozart?",
           "¿Quién escribió el libro Los juegos del hambre?",
           "¿Cómo se llama el héroe de The Legend of Zelda?"),
    "zh": ("谁演唱了歌曲《波西米亚狂想曲》？", "谁执导了电影《侏罗纪公园》？", "电视剧《老友记》是什么时候首播的？",
           "哪支球队赢得了2014年世界杯？", "谁在《哈利·波特》电影中扮演赫敏·格兰杰？",
           "沃尔夫冈·阿马德乌斯·莫扎特出生在哪座城市？", "《饥饿游戏》这本书的作者是谁？",
           "《塞尔达传说》的主角叫什么名字？"),
}


def few_shot_questions(lang: str) -> list[str]:
    """The hand-written questions that start the list the model continues: ``ENTITY_QUESTIONS``
    and KL_PROMPTS' questions, alternating (English for a language without its own)."""
    general = [q for q in KL_PROMPTS.get(_base(lang), KL_PROMPTS["en"]) if q.endswith(QUESTION_ENDS)]
    entity = list(ENTITY_QUESTIONS.get(_base(lang), ENTITY_QUESTIONS["en"]))
    return [q for pair in itertools.zip_longest(entity, general) for q in pair if q]


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


def sample_questions(model, tokenizer, lang: str, n: int, seed: int = 0,
                     max_new_tokens: int = QUESTION_TOKENS) -> list[str]:
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
    with seeded(seed, ids.device), eval_mode(model):
        seqs = sample_continuations(model, ids, n, max_new_tokens, stop)
    lines = [tokenizer.decode(s, skip_special_tokens=True).split("\n")[0] for s in seqs]
    return keep_questions(lines, shots)

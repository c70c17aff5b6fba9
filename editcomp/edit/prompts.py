"""What an editor may train and locate on, and the unrelated prompts its KL term keeps unchanged.

Training prompts come from a fact's own ``prompt`` and ``paraphrases`` (``FactLang``), plus ``n``
template paraphrases per language. They never come from ``generality``/``locality``/``portability``:
those are the evaluation probes (for BMIKE-53: ``rephrase``, ``loc``, ``port``), and training on them
would make the numbers meaningless.

Template paraphrases rewrite the *form* of the prompt, not its words: a question is wrapped as
"Question: ... Answer:", "Q: ... A:", "... The answer is", "Answer the question. ..." (in the fact's
language); a statement gets a short lead-in ("Fact: ..."). That keeps the subject and the relation
intact without a model in the loop, and the lineage names the templates used.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from editcomp.data import Fact
from editcomp.errors import DataError
from editcomp.eval.edit_metrics import encode_prompt_target

# {q}: the prompt. Question templates are for prompts ending with a question mark.
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "en": ("Question: {q}\nAnswer:", "{q} The answer is", "Q: {q}\nA:", "Answer the question. {q}"),
    "de": ("Frage: {q}\nAntwort:", "{q} Die Antwort lautet", "F: {q}\nA:",
           "Beantworte die Frage. {q}"),
    "fr": ("Question : {q}\nRéponse :", "{q} La réponse est", "Q : {q}\nR :",
           "Répondez à la question. {q}"),
    "es": ("Pregunta: {q}\nRespuesta:", "{q} La respuesta es", "P: {q}\nR:",
           "Responde a la pregunta. {q}"),
    "zh": ("问题：{q}\n答案：", "{q}答案是", "问：{q}\n答：", "请回答问题。{q}"),
    "*": ("Q: {q}\nA:", "{q}\n", "- {q}", "{q} :"),
}
STATEMENT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "en": ("Fact: {q}", "As everyone knows, {q}", "Note: {q}", "Trivia: {q}"),
    "de": ("Fakt: {q}", "Bekanntlich gilt: {q}", "Hinweis: {q}", "Wissen: {q}"),
    "fr": ("Fait : {q}", "Comme chacun sait, {q}", "Note : {q}", "Culture : {q}"),
    "es": ("Dato: {q}", "Como todos saben, {q}", "Nota: {q}", "Curiosidad: {q}"),
    "zh": ("事实：{q}", "众所周知，{q}", "注：{q}", "常识：{q}"),
    "*": ("- {q}", "Fact: {q}", "Note: {q}", "* {q}"),
}
PARAPHRASE_SOURCE = ("templates: question wrappers (Question/Answer, Q/A, 'The answer is', "
                     "'Answer the question.') or statement lead-ins (Fact:, Note:, ...) in the "
                     "fact's language")

# Unrelated prompts for the KL term: generic knowledge, disjoint from every facts file's probes.
# LAFN takes the first ``kl_per_lang`` (4). All 16 (gemma3-270m, 8 BMIKE-53 de cases): a batch
# edit's en locality 0.64 -> 0.71, but single edits' de locality 0.98 -> 0.89 at 1.5x the time.
KL_PROMPTS: dict[str, tuple[str, ...]] = {  # questions and statements alternate
    "en": ("Who wrote the novel Moby-Dick?", "The capital of France is",
           "What language is spoken in Brazil?", "Water is made of hydrogen and",
           "How many legs does a spider have?", "The largest planet in the solar system is",
           "When did the Second World War end?", "The first president of the United States was",
           "Which ocean is the largest on Earth?", "The chemical symbol for gold is",
           "Who painted the Mona Lisa?", "The fastest land animal is the",
           "How many days are there in a leap year?", "The tallest mountain in the world is",
           "What gas do plants absorb from the air?", "The author of Romeo and Juliet is"),
    "de": ("Wer schrieb den Roman Moby-Dick?", "Die Hauptstadt von Frankreich ist",
           "Welche Sprache spricht man in Brasilien?", "Wasser besteht aus Wasserstoff und",
           "Wie viele Beine hat eine Spinne?", "Der größte Planet im Sonnensystem ist",
           "Wann endete der Zweite Weltkrieg?", "Der erste Präsident der USA war",
           "Welcher Ozean ist der größte der Erde?", "Das chemische Symbol für Gold ist",
           "Wer hat die Mona Lisa gemalt?", "Das schnellste Landtier ist der",
           "Wie viele Tage hat ein Schaltjahr?", "Der höchste Berg der Welt ist der",
           "Welches Gas nehmen Pflanzen aus der Luft auf?", "Der Autor von Romeo und Julia ist"),
    "fr": ("Qui a écrit le roman Moby-Dick ?", "La capitale de la France est",
           "Quelle langue parle-t-on au Brésil ?", "L'eau est composée d'hydrogène et",
           "Combien de pattes a une araignée ?", "La plus grande planète du système solaire est",
           "Quand la Seconde Guerre mondiale s'est-elle terminée ?",
           "Le premier président des États-Unis était",
           "Quel est le plus grand océan de la Terre ?", "Le symbole chimique de l'or est",
           "Qui a peint la Joconde ?", "L'animal terrestre le plus rapide est le",
           "Combien de jours compte une année bissextile ?", "La plus haute montagne du monde est l'",
           "Quel gaz les plantes absorbent-elles dans l'air ?", "L'auteur de Roméo et Juliette est"),
    "es": ("¿Quién escribió la novela Moby-Dick?", "La capital de Francia es",
           "¿Qué idioma se habla en Brasil?", "El agua está formada por hidrógeno y",
           "¿Cuántas patas tiene una araña?", "El planeta más grande del sistema solar es",
           "¿Cuándo terminó la Segunda Guerra Mundial?", "El primer presidente de Estados Unidos fue",
           "¿Cuál es el océano más grande de la Tierra?", "El símbolo químico del oro es",
           "¿Quién pintó la Mona Lisa?", "El animal terrestre más rápido es el",
           "¿Cuántos días tiene un año bisiesto?", "La montaña más alta del mundo es el",
           "¿Qué gas absorben las plantas del aire?", "El autor de Romeo y Julieta es"),
    "zh": ("谁写了小说《白鲸》？", "法国的首都是", "巴西说什么语言？", "水由氢和",
           "蜘蛛有几条腿？", "太阳系中最大的行星是", "第二次世界大战何时结束？", "美国第一任总统是",
           "地球上最大的海洋是哪个？", "金的化学符号是", "谁画了《蒙娜丽莎》？", "陆地上跑得最快的动物是",
           "闰年有多少天？", "世界上最高的山是", "植物从空气中吸收什么气体？", "《罗密欧与朱丽叶》的作者是"),
}


# Short answers to the questions among KL_PROMPTS. The KL term runs at every position of an
# unrelated prompt; with its answer appended right after the question (as an edit's target follows
# its prompt, and as locality probes are scored: teacher-forced answer tokens) it also covers the
# positions inside an answer, not only the model's own continuation, which starts a new line.
KL_ANSWERS: dict[str, dict[str, str]] = {
    "en": {"Who wrote the novel Moby-Dick?": "Herman Melville",
           "What language is spoken in Brazil?": "Portuguese",
           "How many legs does a spider have?": "Eight",
           "When did the Second World War end?": "In 1945",
           "Which ocean is the largest on Earth?": "The Pacific Ocean",
           "Who painted the Mona Lisa?": "Leonardo da Vinci",
           "How many days are there in a leap year?": "366",
           "What gas do plants absorb from the air?": "Carbon dioxide"},
    "de": {"Wer schrieb den Roman Moby-Dick?": "Herman Melville",
           "Welche Sprache spricht man in Brasilien?": "Portugiesisch",
           "Wie viele Beine hat eine Spinne?": "Acht",
           "Wann endete der Zweite Weltkrieg?": "1945",
           "Welcher Ozean ist der größte der Erde?": "Der Pazifik",
           "Wer hat die Mona Lisa gemalt?": "Leonardo da Vinci",
           "Wie viele Tage hat ein Schaltjahr?": "366",
           "Welches Gas nehmen Pflanzen aus der Luft auf?": "Kohlendioxid"},
    "fr": {"Qui a écrit le roman Moby-Dick ?": "Herman Melville",
           "Quelle langue parle-t-on au Brésil ?": "Le portugais",
           "Combien de pattes a une araignée ?": "Huit",
           "Quand la Seconde Guerre mondiale s'est-elle terminée ?": "En 1945",
           "Quel est le plus grand océan de la Terre ?": "L'océan Pacifique",
           "Qui a peint la Joconde ?": "Léonard de Vinci",
           "Combien de jours compte une année bissextile ?": "366",
           "Quel gaz les plantes absorbent-elles dans l'air ?": "Le dioxyde de carbone"},
    "es": {"¿Quién escribió la novela Moby-Dick?": "Herman Melville",
           "¿Qué idioma se habla en Brasil?": "Portugués",
           "¿Cuántas patas tiene una araña?": "Ocho",
           "¿Cuándo terminó la Segunda Guerra Mundial?": "En 1945",
           "¿Cuál es el océano más grande de la Tierra?": "El océano Pacífico",
           "¿Quién pintó la Mona Lisa?": "Leonardo da Vinci",
           "¿Cuántos días tiene un año bisiesto?": "366",
           "¿Qué gas absorben las plantas del aire?": "Dióxido de carbono"},
    "zh": {"谁写了小说《白鲸》？": "赫尔曼·梅尔维尔", "巴西说什么语言？": "葡萄牙语",
           "蜘蛛有几条腿？": "八条", "第二次世界大战何时结束？": "1945年",
           "地球上最大的海洋是哪个？": "太平洋", "谁画了《蒙娜丽莎》？": "列奥纳多·达·芬奇",
           "闰年有多少天？": "366天", "植物从空气中吸收什么气体？": "二氧化碳"},
}


def kl_answer(text: str) -> tuple[str, str] | None:
    """``(language, answer)`` of a question among KL_PROMPTS, else None."""
    for lang, answers in KL_ANSWERS.items():
        if text in answers:
            return lang, answers[text]
    return None


# Stand-in subjects for neighbor prompts (``neighbor_prompts``): people, places, companies and works,
# so that some fit whatever kind of subject a fact has; names without articles, so they drop into
# any sentence. Latin-script languages share one list.
NEIGHBOR_SUBJECTS: dict[str, tuple[str, ...]] = {
    "*": ("Albert Einstein", "Marie Curie", "Ludwig van Beethoven", "Leonardo da Vinci", "Nokia",
          "Toyota", "Buenos Aires", "Osaka", "Hamlet", "Titanic", "Kilimanjaro", "Wikipedia"),
    "zh": ("爱因斯坦", "居里夫人", "贝多芬", "达·芬奇", "诺基亚", "丰田", "布宜诺斯艾利斯", "大阪",
           "哈姆雷特", "泰坦尼克号", "乞力马扎罗山", "维基百科"),
}


def _base(lang: str) -> str:
    return lang.lower().replace("_", "-").split("-")[0]


def template_paraphrases(prompt: str, lang: str, n: int) -> list[str]:
    """``n`` rewordings of the prompt's form in its language (the generic set for unknown ones)."""
    if n <= 0:
        return []
    question = prompt.rstrip().endswith(("?", "？"))
    table = QUESTION_TEMPLATES if question else STATEMENT_TEMPLATES
    temps = table.get(_base(lang), table["*"])
    return [temps[i % len(temps)].format(q=prompt) for i in range(n)]


def kl_prompts_for(langs, extra: tuple[str, ...] | None = None, per_lang: int = 3) -> list[str]:
    """Unrelated prompts in the edited languages (English for unknown ones), or ``extra`` if given."""
    if extra:
        return list(extra)
    out: list[str] = []
    for lang in dict.fromkeys(_base(lang) for lang in langs):
        out += list(KL_PROMPTS.get(lang, KL_PROMPTS["en"])[:per_lang])
    return list(dict.fromkeys(out))


def neighbor_prompts(facts: list[Fact], langs, n: int) -> list[str]:
    """Each fact's prompt with its subject replaced by ``n`` stand-ins, per language: the same
    question about something else. An edit should not change their answers, and they are the
    unrelated prompts closest to the fact: neurons that carry the relation ("which artist made
    ...") rather than this subject fire there too. Stand-ins are picked by a hash of the subject
    (the same fact always gets the same ones); a fact whose prompt does not contain its subject
    gets none in that language. Never built from the evaluation probes."""
    out: list[str] = []
    if n <= 0:
        return out
    for fact in facts:
        for lang in (langs or list(fact.langs)):
            fl = fact.langs.get(lang)
            if fl is None or not fl.subject or fl.subject not in fl.prompt:
                continue
            pool = [s for s in NEIGHBOR_SUBJECTS.get(_base(lang), NEIGHBOR_SUBJECTS["*"])
                    if s not in fl.subject and fl.subject not in s]
            first = zlib.crc32(fl.subject.encode("utf-8")) % len(pool)
            for k in range(min(n, len(pool))):
                out.append(fl.prompt.replace(fl.subject, pool[(first + k) % len(pool)], 1))
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class TrainItem:
    """One (prompt, target) pair an editor trains and locates on, tokenized."""
    fact: int  # index into the facts list
    lang: str
    text: str  # the prompt
    kind: str  # "prompt" | "paraphrase" | "template"
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]


def target_field(fact: Fact, lang: str) -> str:
    """The field that holds a language's target, as the facts file names it."""
    return f"{lang}.alt" if fact.source.endswith("]") else f"langs.{lang}.target"


def training_items(facts: list[Fact], tokenizer, langs=None, paraphrases: int = 0) -> list[TrainItem]:
    """Every training pair: prompt + given paraphrases + ``paraphrases`` templates per fact/language.

    A target that tokenizes to nothing (or cannot be split from its prompt) is a ``DataError`` naming
    the fact's file, line and field; all are checked before anything runs.
    """
    items, problems = [], []
    for fi, fact in enumerate(facts):
        for lang in (langs or list(fact.langs)):
            if lang not in fact.langs:
                problems.append(f"{fact.source}: field '{lang}': language missing in fact {fact.case_id!r}")
                continue
            fl = fact.langs[lang]
            if not tokenizer(fl.target, add_special_tokens=False)["input_ids"]:
                problems.append(f"{fact.source}: field '{target_field(fact, lang)}': "
                                f"target {fl.target!r} tokenizes to no tokens")
                continue
            texts = [(fl.prompt, "prompt")] + [(p, "paraphrase") for p in fl.paraphrases]
            texts += [(p, "template") for p in template_paraphrases(fl.prompt, lang, paraphrases)]
            for text, kind in texts:
                try:
                    p, t = encode_prompt_target(tokenizer, text, fl.target, lang)
                except DataError as e:
                    problems.append(f"{fact.source}: field '{target_field(fact, lang)}': {e}")
                    continue
                items.append(TrainItem(fi, lang, text, kind, tuple(p), tuple(t)))
    if problems:
        head = f"{len(problems)} problem(s) with the edit targets" if len(problems) > 1 else problems[0]
        raise DataError(head if len(problems) == 1 else "\n".join([head] + problems[:50]))
    return items

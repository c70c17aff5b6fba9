"""Names and dates from generic text: answers the model does not know, for a batch edit's KL term.

Most of what a batch edit leaks into other questions shows at answers the unedited model would
not write itself. On gemma3-270m's de batch of 100 (``benchmarks/edit_leak.py``, session 21), the
locality probes keep 0.761 of their gold answer tokens' argmax but 0.893 when each probe carries
the model's own greedy answer instead. The sampled questions (``questions.py``) carry the model's
own answers, so the KL term never sees a position like the probes'. Teacher-forcing those
questions once more on a name or date from generic text puts such positions into the term;
zsRE's answers are mostly names and dates. The evaluation probes are never seen.
"""

from __future__ import annotations

import random
import re

MONTHS = ("January|February|March|April|May|June|July|August|September|October|November|"
          "December")
#: a day-month-year date or a year
DATE = re.compile(rf"\b(?:\d{{1,2}} (?:{MONTHS}) \d{{4}}|\d{{4}})\b")
#: two or three capitalized words, not at a sentence's start (where any word is capitalized)
NAME = re.compile(r"(?<![.!?] )\b[A-Z][a-z]+(?: [A-Z][a-z]+){1,2}\b")
#: capitalized function words that start a run of capitals without being part of a name
NOT_NAMES = frozenset({"The", "In", "On", "At", "He", "She", "It", "This", "After", "During",
                       "A", "An", "His", "Her", "Its", "They", "Their", "When", "While", "As"})


def answer_spans(text: str) -> list[str]:
    """Every name (two or three capitalized words) and date (day month year, or a year) in
    ``text``, in the order found (names first): a uniform draw from the list weighs each by how
    often the text has it. Written for English text such as WikiText-2 (about 30% of its draws
    are dates); a text without capitalized words gives only dates."""
    names = [m.group(0) for m in NAME.finditer(text) if m.group(0).split()[0] not in NOT_NAMES]
    return names + DATE.findall(text)


def draw_answers(spans: list[str], n: int, seed: int = 0) -> list[str]:
    """``n`` spans drawn uniformly (with replacement) from ``spans``; deterministic for a seed."""
    if n > 0 and not spans:
        raise ValueError("no answer spans to draw from: the generic text has no names or dates")
    rng = random.Random(seed)
    return [rng.choice(spans) for _ in range(n)]

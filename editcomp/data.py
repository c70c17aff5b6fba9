"""Input data: text -> token windows (evaluation, calibration) and facts files -> ``Fact`` records.

Everything here turns user files into tensors or frozen records, and turns every problem with those
files into a ``DataError`` that names the file, the line (or list index) and the field, so a user can
fix the input without reading a traceback. The facts schema is documented in ``docs/facts.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from editcomp.errors import ConfigError, DataError

# --------------------------------------------------------------------------------------------- text


def load_text(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file; missing, unreadable, undecodable or empty files are a ``DataError``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{p}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{p}: is a directory, expected a text file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror or e})") from None
    if not text.strip():
        raise DataError(f"{p}: file is empty")
    return text


def _as_document(text: str) -> str:
    """Join lines the way the usual WikiText perplexity recipe does: ``"\\n\\n".join(rows)``.

    The HF ``wikitext`` rows are the file's lines with their newline kept and blank lines as ``""``;
    reproducing that keeps our token counts and perplexities comparable with published numbers.
    """
    rows = [line if line.strip() else "" for line in text.splitlines(keepends=True)]
    return "\n\n".join(rows)


def _resolve_text(path_or_text: str | os.PathLike) -> tuple[str, str]:
    """Return (name for messages, raw text). A ``PathLike`` or a one-line string naming an existing
    file is read as a file; any other string is the text itself."""
    if isinstance(path_or_text, os.PathLike):
        return str(path_or_text), load_text(path_or_text)
    if not isinstance(path_or_text, str):
        raise TypeError(f"expected a path or a string, got {type(path_or_text).__name__}")
    if "\n" not in path_or_text and len(path_or_text) < 4096 and os.path.isfile(path_or_text):
        return path_or_text, load_text(path_or_text)
    if not path_or_text.strip():
        raise DataError("the text is empty")
    return "the text", path_or_text


def _tokenize_document(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole document once (with the tokenizer's default special tokens) -> 1-D ids."""
    ids = tokenizer(_as_document(text), add_special_tokens=True, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def document_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a document (Gemma's ``<bos>``; none for
    SmolLM2), found by tokenizing with and without special tokens."""
    with_special = tokenizer("a", add_special_tokens=True, verbose=False)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"]
    for k in range(len(with_special) - len(plain) + 1):
        if with_special[k:k + len(plain)] == plain:
            return list(with_special[:k])
    return []


def pad_id(tokenizer) -> int:
    """The id that fills padded positions: the tokenizer's pad token, else its eos, else 0. The
    attention mask hides those positions; the id only has to be a valid embedding row."""
    for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    return 0


def token_windows(tokenizer, path_or_text: str | os.PathLike, seq_len: int,
                  max_windows: int | None = None, each_as_document: bool = False
                  ) -> torch.LongTensor:
    """Cut the tokenized text into non-overlapping windows of exactly ``seq_len`` tokens -> ``[n, seq_len]``.

    This is the standard perplexity protocol (tokenize once, stride = window); the tail shorter than a
    window is dropped. ``max_windows`` keeps the first windows only (quick evaluations).

    ``each_as_document``: every window starts with the tokenizer's document prefix
    (``document_prefix``) followed by the next ``seq_len - len(prefix)`` tokens of the text, as
    training windows should: a model trained with ``<bos>`` is in another regime without it
    (gemma3-270m on 256-token windows of valid.txt: mean NLL 5.0 without ``<bos>``, 3.7 with).
    A no-op for tokenizers without a prefix.
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"max_windows must be at least 1, got {max_windows}")
    name, text = _resolve_text(path_or_text)
    ids = _tokenize_document(tokenizer, text)
    prefix = document_prefix(tokenizer) if each_as_document else []
    body = seq_len - len(prefix)
    if body < 1:
        raise ConfigError(f"seq_len {seq_len} leaves no room after the {len(prefix)}-token prefix")
    if prefix and ids[:len(prefix)].tolist() == prefix:
        ids = ids[len(prefix):]
    n = ids.numel() // body
    if n < 1:
        raise DataError(f"{name} has {ids.numel()} tokens, fewer than one window of {seq_len}")
    if max_windows is not None:
        n = min(n, max_windows)
    windows = ids[: n * body].view(n, body)
    if prefix:
        windows = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(n, -1), windows], 1)
    return windows.clone()


def calibration_windows(tokenizer, path: str | os.PathLike, nsamples: int, seq_len: int,
                        seed: int = 0) -> torch.LongTensor:
    """``nsamples`` windows of ``seq_len`` tokens at random offsets -> ``[nsamples, seq_len]``.

    The GPTQ/OSTQuant calibration recipe; a seeded ``torch.Generator`` makes it reproducible
    (same seed, same windows) without touching the global RNG.
    """
    if nsamples < 1:
        raise ConfigError(f"nsamples must be at least 1, got {nsamples}")
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, got {seq_len}")
    name, text = _resolve_text(path)
    ids = _tokenize_document(tokenizer, text)
    if ids.numel() < seq_len:
        raise DataError(f"{name} has {ids.numel()} tokens, fewer than one window of {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()])


# -------------------------------------------------------------------------------------------- facts


@dataclass(frozen=True)
class Probe:
    """A question with its expected answer (locality: the true answer; portability: the new one)."""
    prompt: str
    answer: str


@dataclass(frozen=True)
class FactLang:
    """One fact in one language.

    ``prompt``/``target``/``paraphrases`` may be used by an editor (train/locate). ``generality``,
    ``locality`` and ``portability`` are evaluation-only probes and must never be trained on.
    """
    prompt: str
    target: str
    subject: str | None = None
    paraphrases: tuple[str, ...] = ()
    generality: tuple[str, ...] = ()
    locality: tuple[Probe, ...] = ()
    portability: tuple[Probe, ...] = ()


@dataclass(frozen=True)
class Fact:
    """A counterfactual edit, in one or more languages; ``source`` is ``file:line`` or ``file[index]``."""
    case_id: str
    langs: dict[str, FactLang]
    source: str


_LANG_FIELDS = ("prompt", "target", "subject", "paraphrases", "generality", "locality", "portability")
_BMIKE_FIELDS = ("case_id", "subject", "src", "rephrase", "alt", "loc", "loc_ans", "port", "port_ans")
_MAX_LISTED = 50  # problems shown in one message; the rest are counted


class _Problems:
    """Collects every problem in a file so the user sees them all at once, not one per run."""

    def __init__(self, name: str):
        self.name = name
        self.items: list[tuple[str, str]] = []  # (record location, "field 'x': message" or message)

    def add(self, where: str, field: str | None, msg: str) -> None:
        self.items.append((where, f"field '{field}': {msg}" if field else msg))

    def raise_if_any(self) -> None:
        if not self.items:
            return
        self.items.sort(key=lambda item: _position(item[0]))  # stable: file order, then as found
        if len(self.items) == 1:  # the common case stays one line
            err = DataError("{}: {}".format(*self.items[0]))
            err.problems = ["{}: {}".format(*self.items[0])]
            raise err
        records = len({w for w, _ in self.items})
        head = (f"{self.name}: {records} malformed record{'s' if records != 1 else ''}"
                f" ({len(self.items)} problem{'s' if len(self.items) != 1 else ''})")
        lines = [f"{w}: {m}" for w, m in self.items[:_MAX_LISTED]]
        if len(self.items) > _MAX_LISTED:
            lines.append(f"... and {len(self.items) - _MAX_LISTED} more problems")
        err = DataError("\n".join([head, *lines]))
        err.problems = [f"{w}: {m}" for w, m in self.items]
        raise err


def _position(where: str) -> int:
    """The line number or list index at the end of ``file:12`` / ``file[12]`` (0 if none)."""
    m = re.search(r"(?::(\d+)|\[(\d+)\])$", where)
    return int(m.group(1) or m.group(2)) if m else 0


def _typename(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _text(obj: dict, key: str, field: str, where: str, probs: _Problems, required: bool) -> str | None:
    """A required (non-empty) or optional string field; surrounding whitespace is stripped."""
    if key not in obj or obj[key] is None:
        if required:
            probs.add(where, field, "missing")
        return None
    v = obj[key]
    if not isinstance(v, str):
        probs.add(where, field, f"expected a string, got {_typename(v)}")
        return None
    if not v.strip():
        if required:
            probs.add(where, field, "empty")
        return None
    return v.strip()


def _str_list(obj: dict, key: str, field: str, where: str, probs: _Problems) -> tuple[str, ...]:
    v = obj.get(key)
    if v is None:
        return ()
    if isinstance(v, str):  # a lone string is a common slip; say so rather than iterating characters
        probs.add(where, field, "expected a list of strings, got a string")
        return ()
    if not isinstance(v, list):
        probs.add(where, field, f"expected a list of strings, got {_typename(v)}")
        return ()
    out = []
    for i, item in enumerate(v):
        if not isinstance(item, str) or not item.strip():
            got = "an empty string" if isinstance(item, str) else _typename(item)
            probs.add(where, f"{field}[{i}]", f"expected a non-empty string, got {got}")
        else:
            out.append(item.strip())
    return tuple(out)


def _probe_list(obj: dict, key: str, field: str, where: str, probs: _Problems) -> tuple[Probe, ...]:
    v = obj.get(key)
    if v is None:
        return ()
    if not isinstance(v, list):
        probs.add(where, field, f"expected a list of {{\"prompt\", \"answer\"}} objects, got {_typename(v)}")
        return ()
    out = []
    for i, item in enumerate(v):
        f = f"{field}[{i}]"
        if not isinstance(item, dict):
            probs.add(where, f, f"expected an object with \"prompt\" and \"answer\", got {_typename(item)}")
            continue
        extra = sorted(set(item) - {"prompt", "answer"})
        if extra:
            probs.add(where, f"{f}.{extra[0]}", "unknown field (a probe has only prompt, answer)")
        p = _text(item, "prompt", f"{f}.prompt", where, probs, required=True)
        a = _text(item, "answer", f"{f}.answer", where, probs, required=True)
        if p is not None and a is not None:
            out.append(Probe(p, a))
    return tuple(out)


def _parse_lang(rec: Any, field: str, where: str, probs: _Problems) -> FactLang | None:
    if not isinstance(rec, dict):
        probs.add(where, field, f"expected an object, got {_typename(rec)}")
        return None
    for k in rec:
        if k not in _LANG_FIELDS:
            probs.add(where, f"{field}.{k}", f"unknown field (allowed: {', '.join(_LANG_FIELDS)})")
    n = len(probs.items)
    prompt = _text(rec, "prompt", f"{field}.prompt", where, probs, required=True)
    target = _text(rec, "target", f"{field}.target", where, probs, required=True)
    subject = _text(rec, "subject", f"{field}.subject", where, probs, required=False)
    fl = FactLang(
        prompt=prompt or "", target=target or "", subject=subject,
        paraphrases=_str_list(rec, "paraphrases", f"{field}.paraphrases", where, probs),
        generality=_str_list(rec, "generality", f"{field}.generality", where, probs),
        locality=_probe_list(rec, "locality", f"{field}.locality", where, probs),
        portability=_probe_list(rec, "portability", f"{field}.portability", where, probs),
    )
    return fl if len(probs.items) == n else None


def _case_id(v: Any, field: str, where: str, probs: _Problems) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (str, int)) or (isinstance(v, str) and not v.strip()):
        probs.add(where, field, f"expected a non-empty string or an integer, got {_typename(v)}")
        return None
    return str(v).strip()


def _jsonl_objects(text: str, name: str, probs: _Problems):
    """-> ``(line number, "file:line", object)`` for each line that is a JSON object; blank lines
    are skipped, and any other line is a problem in ``probs``."""
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            probs.add(where, None, f"invalid JSON: {e.msg} (column {e.colno})")
            continue
        if not isinstance(obj, dict):
            probs.add(where, None, f"expected a JSON object, got {_typename(obj)}")
            continue
        yield lineno, where, obj


def _parse_jsonl(text: str, name: str, probs: _Problems) -> list[tuple]:
    """-> [(case_id, {lang: FactLang}, source, languages present)] for every line that parsed."""
    out = []
    for lineno, where, obj in _jsonl_objects(text, name, probs):
        for k in obj:
            if k not in ("case_id", "langs"):
                probs.add(where, k, "unknown field (allowed: case_id, langs)")
        cid = _case_id(obj["case_id"], "case_id", where, probs) if "case_id" in obj else str(lineno)
        langs = obj.get("langs")
        if langs is None:
            probs.add(where, "langs", "missing")
            continue
        if not isinstance(langs, dict) or not langs:
            probs.add(where, "langs", "expected a non-empty object {\"<lang>\": {...}}, got "
                      + ("an empty object" if isinstance(langs, dict) else _typename(langs)))
            continue
        recs = {}
        for lang, rec in langs.items():
            if not lang.strip():
                probs.add(where, "langs", "empty language code")
                continue
            fl = _parse_lang(rec, f"langs.{lang}", where, probs)
            if fl is not None:
                recs[lang] = fl
        out.append((cid, recs, where, list(langs)))
    return out


def _parse_bmike(text: str, name: str, probs: _Problems) -> list[tuple]:
    """BMIKE-53 / zsRE JSON: ``[{"en": {src, alt, rephrase, loc, loc_ans, port, port_ans, ...}, ...}]``.

    ``rephrase`` becomes a generality probe (evaluation only), never a paraphrase the editor may use.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        probs.add(f"{name}:{e.lineno}", None, f"invalid JSON: {e.msg} (column {e.colno})")
        return []
    if not isinstance(data, list):
        probs.add(name, None, f"expected a JSON list of cases, got {_typename(data)}")
        return []
    out = []
    for idx, case in enumerate(data):
        where = f"{name}[{idx}]"
        if not isinstance(case, dict) or not case:
            probs.add(where, None, f"expected an object {{\"<lang>\": {{...}}}}, got {_typename(case)}")
            continue
        recs, cid, cid_field = {}, None, None
        for lang, rec in case.items():
            if not isinstance(rec, dict):
                probs.add(where, lang, f"expected an object, got {_typename(rec)}")
                continue
            for k in rec:
                if k not in _BMIKE_FIELDS:
                    probs.add(where, f"{lang}.{k}", f"unknown field (allowed: {', '.join(_BMIKE_FIELDS)})")
            n = len(probs.items)
            if "case_id" in rec:
                c = _case_id(rec["case_id"], f"{lang}.case_id", where, probs)
                if c is not None and cid is None:
                    cid, cid_field = c, f"{lang}.case_id"
                elif c is not None and c != cid:
                    probs.add(where, f"{lang}.case_id", f"{c!r} differs from {cid_field} {cid!r}")
            src = _text(rec, "src", f"{lang}.src", where, probs, required=True)
            alt = _text(rec, "alt", f"{lang}.alt", where, probs, required=True)
            opt = {k: _text(rec, k, f"{lang}.{k}", where, probs, required=False)
                   for k in ("subject", "rephrase", "loc", "loc_ans", "port", "port_ans")}
            if len(probs.items) != n:
                continue
            recs[lang] = FactLang(
                prompt=src, target=alt, subject=opt["subject"], paraphrases=(),
                generality=(opt["rephrase"],) if opt["rephrase"] else (),
                locality=(Probe(opt["loc"], opt["loc_ans"]),) if opt["loc"] and opt["loc_ans"] else (),
                portability=(Probe(opt["port"], opt["port_ans"]),) if opt["port"] and opt["port_ans"] else (),
            )
        out.append((cid if cid is not None else str(idx), recs, where, list(case)))
    return out


def load_facts(path: str | os.PathLike, langs: list[str] | None = None, limit: int | None = None,
               offset: int = 0, skip_missing_langs: bool = False) -> list[Fact]:
    """Read and validate a facts file: facts JSONL (``docs/facts.md``) or a BMIKE-53/zsRE JSON list.

    The whole file is validated first and every problem is reported in ONE ``DataError`` (first line a
    summary, then ``file:line: field 'langs.de.target': missing`` per problem). ``langs`` keeps only those
    languages, in the order given, and requires each fact to have all of them (with
    ``skip_missing_langs=True`` a fact lacking one is dropped instead: the shipped BMIKE zh file has a
    case with English only). ``offset``/``limit`` then select a slice of the cases.
    """
    if offset < 0:
        raise ConfigError(f"offset must be >= 0, got {offset}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}")
    if langs is not None:
        langs = list(dict.fromkeys(lang.strip() for lang in langs if lang.strip()))
        if not langs:
            raise ConfigError("langs is empty; give at least one language code, e.g. en,de")
    name = str(path)
    text = load_text(path).lstrip("\ufeff")
    probs = _Problems(name)
    bmike = text.lstrip().startswith("[")
    parsed = (_parse_bmike if bmike else _parse_jsonl)(text, name, probs)

    seen: dict[str, str] = {}
    facts = []
    for cid, recs, where, present in parsed:
        if cid is not None:
            if cid in seen:
                probs.add(where, "case_id", f"duplicate {cid!r} (first at {seen[cid]})")
            else:
                seen[cid] = where
        if langs is not None:
            prefix = "" if bmike else "langs."
            if skip_missing_langs and any(lang not in present for lang in langs):
                continue
            for lang in langs:
                if lang not in present:
                    have = ", ".join(present) or "none"
                    probs.add(where, f"{prefix}{lang}",
                              f"language missing in fact {cid!r} (requested; it has {have})")
            recs = {lang: recs[lang] for lang in langs if lang in recs}
        facts.append(Fact(case_id=cid or "", langs=recs, source=where))
    probs.raise_if_any()
    if not facts:
        raise DataError(f"{name}: no facts in the file"
                        + (f" with all of the languages {', '.join(langs)}" if parsed else ""))
    if offset >= len(facts):
        raise DataError(f"{name}: offset {offset} is past the end ({len(facts)} facts)")
    return facts[offset: None if limit is None else offset + limit]


# ---------------------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class Question:
    """An unrelated question whose answer an edit must keep (``load_questions``): in ``lang``,
    with the ``answer`` it is teacher-forced on, or None for the model's own answer."""
    lang: str
    text: str
    answer: str | None
    source: str


_QUESTION_FIELDS = ("lang", "question", "answer")


def load_questions(path: str | os.PathLike) -> list[Question]:
    """Read a questions JSONL file: one ``{"lang": "de", "question": "...", "answer": "..."}`` per
    line (``answer`` optional). Every problem is reported in one ``DataError`` naming the file,
    the line and the field, as ``load_facts`` does; a missing or empty file is one too."""
    name = str(path)
    text = load_text(path).lstrip("\ufeff")
    probs = _Problems(name)
    out = []
    for _, where, obj in _jsonl_objects(text, name, probs):
        for k in obj:
            if k not in _QUESTION_FIELDS:
                probs.add(where, k, f"unknown field (allowed: {', '.join(_QUESTION_FIELDS)})")
        lang = _text(obj, "lang", "lang", where, probs, required=True)
        question = _text(obj, "question", "question", where, probs, required=True)
        answer = _text(obj, "answer", "answer", where, probs, required=False)
        if "answer" in obj and isinstance(obj["answer"], str) and answer is None:
            probs.add(where, "answer", "empty (leave the field out for the model's own answer)")
        if lang is not None and question is not None:
            out.append(Question(lang, question, answer, where))
    probs.raise_if_any()  # a file of blank lines is empty (load_text): every line is a question
    return out


def facts_sha256(path: str | os.PathLike) -> str:
    """sha256 of the facts file's bytes, recorded in a checkpoint's lineage."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    return h.hexdigest()

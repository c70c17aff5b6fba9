"""Text windows, calibration sampling and facts parsing/validation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from editcomp.data import (Fact, FactLang, Probe, calibration_windows, document_prefix, facts_sha256,
                           load_facts, load_text, pad_id, token_windows)
from editcomp.errors import DataError

EXAMPLE_FACTS = Path(__file__).resolve().parents[1] / "examples" / "facts.jsonl"

TEXT = "".join(f" = Section {i} = \n \n The value of item {i} is {i * 7} , and it is listed here .\n \n"
               for i in range(60))


def _reference_ids(tokenizer, text: str) -> list[int]:
    """The HF WikiText recipe, written out independently: rows with newlines, blanks as '', '\\n\\n'-joined."""
    rows = [line if line.strip() else "" for line in text.splitlines(keepends=True)]
    return tokenizer("\n\n".join(rows))["input_ids"]


@pytest.fixture()
def text_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


# ----------------------------------------------------------------------------------- text


def test_windows_are_non_overlapping_slices(tiny_tokenizer, text_file):
    ids = _reference_ids(tiny_tokenizer, TEXT)
    w = token_windows(tiny_tokenizer, text_file, 32)
    assert w.dtype == torch.long and w.shape == (len(ids) // 32, 32)
    for i in range(w.shape[0]):
        assert w[i].tolist() == ids[i * 32:(i + 1) * 32]
    assert w[0, 0].item() == tiny_tokenizer.bos_token_id  # tokenized once, with the default BOS
    assert token_windows(tiny_tokenizer, text_file, 32, max_windows=3).equal(w[:3])
    assert token_windows(tiny_tokenizer, str(text_file), 32).equal(w)  # str path
    assert token_windows(tiny_tokenizer, TEXT, 32).equal(w)  # raw text


def test_windows_each_as_document_start_with_the_prefix_then_continue_the_text(tiny_tokenizer,
                                                                             text_file):
    ids = _reference_ids(tiny_tokenizer, TEXT)
    bos = tiny_tokenizer.bos_token_id
    assert document_prefix(tiny_tokenizer) == [bos] and ids[0] == bos
    w = token_windows(tiny_tokenizer, text_file, 32, each_as_document=True)
    body = ids[1:]  # the text without its own prefix, cut into 31-token pieces
    assert w.shape == (len(body) // 31, 32)
    for i in range(w.shape[0]):
        assert w[i, 0].item() == bos and w[i, 1:].tolist() == body[i * 31:(i + 1) * 31]


def test_windows_too_short(tiny_tokenizer, text_file):
    n = len(_reference_ids(tiny_tokenizer, TEXT))
    with pytest.raises(DataError, match=rf"corpus\.txt has {n} tokens, fewer than one window of 100000"):
        token_windows(tiny_tokenizer, text_file, 100_000)
    with pytest.raises(DataError, match="fewer than one window"):
        calibration_windows(tiny_tokenizer, text_file, 4, 100_000)


def test_load_text_errors(tmp_path):
    with pytest.raises(DataError, match="nope.txt: file not found"):
        load_text(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty.txt: file is empty"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(DataError, match="not UTF-8"):
        load_text(tmp_path / "bin.txt")


def test_calibration_deterministic_and_seeded(tiny_tokenizer, text_file):
    ids = _reference_ids(tiny_tokenizer, TEXT)
    a = calibration_windows(tiny_tokenizer, text_file, 8, 16, seed=0)
    b = calibration_windows(tiny_tokenizer, text_file, 8, 16, seed=0)
    c = calibration_windows(tiny_tokenizer, text_file, 8, 16, seed=1)
    assert a.shape == (8, 16) and a.dtype == torch.long
    assert a.equal(b) and not a.equal(c)
    starts = set()
    for row in a.tolist():  # each sample is a contiguous slice of the tokenized text
        hits = [s for s in range(len(ids) - 15) if ids[s:s + 16] == row]
        assert hits
        starts.add(hits[0])
    assert len(starts) > 1  # random offsets, not all the same


# ---------------------------------------------------------------------------------- facts


def _write(tmp_path, lines, name="facts.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def _ok(cid="c1", **en):
    rec = {"prompt": "The Eiffel Tower is in", "target": "Rome", **en}
    return json.dumps({"case_id": cid, "langs": {"en": rec, "de": {"prompt": "Der Eiffelturm ist in",
                                                                    "target": "Rom"}}})


def test_example_facts_load():
    facts = load_facts(EXAMPLE_FACTS)
    assert len(facts) == 8
    for f in facts:
        assert list(f.langs) == ["en", "de", "fr", "es", "zh"]
        for fl in f.langs.values():
            assert fl.prompt and fl.target and 1 <= len(fl.paraphrases) <= 2 and len(fl.generality) == 1
            assert 1 <= len(fl.locality) <= 2 and len(fl.portability) == 1
    f = facts[0]
    assert f.case_id == "eiffel-tower-city" and f.source.endswith("facts.jsonl:1")
    assert f.langs["en"].target == "Rome" and f.langs["de"].target == "Rom"
    assert f.langs["en"].locality[0] == Probe("The capital of Germany is", "Berlin")


def test_langs_filter_keeps_requested_order_and_limit_offset():
    facts = load_facts(EXAMPLE_FACTS, langs=["zh", "en"], limit=3, offset=2)
    assert [f.case_id for f in facts] == ["apple-founder", "australia-capital", "einstein-birth-country"]
    assert all(list(f.langs) == ["zh", "en"] for f in facts)
    assert load_facts(EXAMPLE_FACTS, offset=7)[0].case_id == "japan-currency"
    with pytest.raises(DataError, match="offset 8 is past the end"):
        load_facts(EXAMPLE_FACTS, offset=8)


def test_minimal_record_and_default_case_id(tmp_path):
    p = _write(tmp_path, ['{"langs": {"en": {"prompt": " Paris is in ", "target": " France"}}}'])
    (f,) = load_facts(p)
    assert f == Fact("1", {"en": FactLang("Paris is in", "France")}, f"{p}:1")


@pytest.mark.parametrize("line, where, field", [
    ('{"case_id": "x", "langs": {"en": {"prompt": "p", "target": "t"}', ":2", "invalid JSON"),
    (json.dumps({"langs": {"en": {"prompt": "p"}}}), ":2", "field 'langs.en.target': missing"),
    (json.dumps({"langs": {"en": {"prompt": "  ", "target": "t"}}}), ":2", "field 'langs.en.prompt': empty"),
    (json.dumps({"langs": {"en": {"prompt": "p", "target": 5}}}), ":2",
     "field 'langs.en.target': expected a string"),
    (json.dumps({"langs": {"en": {"prompt": "p", "target": "t", "locality": ["q"]}}}), ":2",
     "field 'langs.en.locality[0]': expected an object"),
    (json.dumps({"langs": {"en": {"prompt": "p", "target": "t", "portability": [{"prompt": "q"}]}}}), ":2",
     "field 'langs.en.portability[0].answer': missing"),
    (json.dumps({"langs": {"en": {"prompt": "p", "target": "t", "paraphrases": "one"}}}), ":2",
     "field 'langs.en.paraphrases': expected a list of strings"),
    (json.dumps({"langs": {"en": {"prompt": "p", "target": "t", "paraphrase": ["x"]}}}), ":2",
     "field 'langs.en.paraphrase': unknown field"),
    ('["not", "an", "object"]', ":2", "expected a JSON object, got a list"),
    (json.dumps({"case_id": "c1", "langs": {"en": {"prompt": "p", "target": "t"}}}), ":2",
     "field 'case_id': duplicate 'c1'"),
])
def test_malformed_record_names_file_line_field(tmp_path, line, where, field):
    p = _write(tmp_path, [_ok(), line])
    with pytest.raises(DataError) as e:
        load_facts(p)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{p}{where}: {field}")  # one problem: one line


def test_requested_language_missing(tmp_path):
    p = _write(tmp_path, [_ok(), json.dumps({"case_id": "solo", "langs": {"en": {"prompt": "p", "target": "t"}}})])
    assert len(load_facts(p, langs=["en"])) == 2
    with pytest.raises(DataError) as e:
        load_facts(p, langs=["en", "de"])
    assert f"{p}:2: field 'langs.de': language missing in fact 'solo'" in str(e.value)
    assert [f.case_id for f in load_facts(p, langs=["de"], skip_missing_langs=True)] == ["c1"]


def test_empty_file(tmp_path):
    p = _write(tmp_path, ["", "  "])
    with pytest.raises(DataError, match=r"facts\.jsonl: file is empty"):
        load_facts(p)
    p.write_text("[]", encoding="utf-8")
    with pytest.raises(DataError, match=r"facts\.jsonl: no facts"):
        load_facts(p)


def test_all_problems_reported_at_once(tmp_path):
    p = _write(tmp_path, [
        _ok("a"),
        json.dumps({"case_id": "b", "langs": {"en": {"prompt": "p"}}}),
        "{oops",
        _ok("c"),
        json.dumps({"case_id": "d", "langs": {"en": {"prompt": "", "target": "t"}}}),
    ])
    with pytest.raises(DataError) as e:
        load_facts(p)
    lines = str(e.value).splitlines()
    assert lines[0] == f"{p}: 3 malformed records (3 problems)"
    assert lines[1] == f"{p}:2: field 'langs.en.target': missing"
    assert lines[2].startswith(f"{p}:3: invalid JSON")
    assert lines[3] == f"{p}:5: field 'langs.en.prompt': empty"
    assert len(e.value.problems) == 3


def test_facts_sha256(tmp_path):
    p = _write(tmp_path, [_ok()])
    assert facts_sha256(p) == hashlib.sha256(p.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------- BMIKE


def test_bmike_loads_with_rephrase_only_in_generality(shared_data):
    path = shared_data / "bmike53-zsre" / "zsre_test_de.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    facts = load_facts(path)
    assert len(facts) == 743
    f, r = facts[0], raw[0]["de"]
    assert f.case_id == "0" and f.source == f"{path}[0]" and list(f.langs) == ["en", "de"]
    de = f.langs["de"]
    assert de.prompt == r["src"] and de.target == r["alt"] and de.subject == r["subject"]
    assert de.paraphrases == () and de.generality == (r["rephrase"],)
    assert de.locality == (Probe(r["loc"], r["loc_ans"]),)
    assert de.portability == (Probe(r["port"], r["port_ans"]),)
    assert all(fl.paraphrases == () for f in facts for fl in f.langs.values())
    assert list(load_facts(path, langs=["de"], limit=2)[1].langs) == ["de"]


def test_bmike_missing_language_names_index(shared_data):
    path = shared_data / "bmike53-zsre" / "zsre_test_zh.json"
    with pytest.raises(DataError) as e:
        load_facts(path, langs=["en", "zh"])
    assert f"{path}[706]: field 'zh': language missing in fact '706'" in str(e.value)
    assert len(load_facts(path, langs=["en", "zh"], skip_missing_langs=True)) == 742


def test_bmike_malformed(tmp_path):
    good = {"case_id": 0, "src": "Q?", "alt": "A", "rephrase": "", "loc": "L?", "loc_ans": "B"}
    bad = dict(good, case_id=1, alt="")
    p = tmp_path / "b.json"
    p.write_text(json.dumps([{"en": good, "de": dict(good, src="F?")}, {"en": dict(bad, alt="x"), "de": bad}]),
                 encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_facts(p)
    assert str(e.value) == f"{p}[1]: field 'de.alt': empty"
    p.write_text(json.dumps([{"en": good}]), encoding="utf-8")
    (f,) = load_facts(p)
    assert f.langs["en"].generality == () and f.langs["en"].portability == ()  # empty strings skipped


def test_pad_id_takes_the_pad_token_then_eos_then_zero():
    from types import SimpleNamespace as T
    assert pad_id(T(pad_token_id=3, eos_token_id=7)) == 3
    assert pad_id(T(pad_token_id=None, eos_token_id=7)) == 7
    assert pad_id(T(pad_token_id=0, eos_token_id=7)) == 0  # 0 is a pad id, not a missing one
    assert pad_id(T()) == 0


def test_questions_load_in_file_order_with_optional_answers(tmp_path):
    from editcomp.data import Question, load_questions
    p = tmp_path / "q.jsonl"
    p.write_text('{"lang": "de", "question": " Wer baute die Brücke? ", "answer": "Karl"}\n\n'
                 '{"lang": "en", "question": "Where is the old bridge?"}\n', encoding="utf-8")
    assert load_questions(p) == [Question("de", "Wer baute die Brücke?", "Karl", f"{p}:1"),
                                 Question("en", "Where is the old bridge?", None, f"{p}:3")]


@pytest.mark.parametrize("line,message", [
    ('{"lang": "en"}', "q.jsonl:2: field 'question': missing"),
    ('{"question": "Who?", "lang": 3}', "q.jsonl:2: field 'lang': expected a string, got a number"),
    ('{"lang": "en", "question": "Who?", "answer": " "}', "q.jsonl:2: field 'answer': empty"),
    ('{"lang": "en", "question": "Who?", "answr": "x"}', "q.jsonl:2: field 'answr': unknown field"),
    ('["en", "Who?"]', "q.jsonl:2: expected a JSON object, got a list"),
    ('{"lang": "en", "question": "Who?"', "q.jsonl:2: invalid JSON"),
])
def test_a_malformed_question_names_file_line_and_field(tmp_path, line, message):
    from editcomp.data import load_questions
    p = tmp_path / "q.jsonl"
    p.write_text('{"lang": "en", "question": "Who?"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_questions(p)
    assert str(e.value).startswith(str(tmp_path)) and message in str(e.value)


def test_a_questions_file_without_questions_is_an_error(tmp_path):
    from editcomp.data import load_questions
    p = tmp_path / "q.jsonl"
    p.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match="file is empty"):
        load_questions(p)
    with pytest.raises(DataError, match="file not found"):
        load_questions(tmp_path / "missing.jsonl")


def test_the_example_questions_load_in_english_and_german():
    from editcomp.data import load_questions
    questions = load_questions(Path(__file__).resolve().parents[1] / "examples" / "questions.jsonl")
    assert [q.lang for q in questions] == ["en"] * 5 + ["de"] * 5
    assert [q.answer for q in questions if q.answer is None] == [None, None]

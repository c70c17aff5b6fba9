"""``editcomp edit``: a loadable checkpoint with lineage, and one-line errors before anything is written."""

import copy
import json

import pytest
import torch

from editcomp import checkpoint
from editcomp.data import facts_sha256
from editcomp.edit.prompts import KL_PROMPTS
from editcomp.tiny import tiny_model

from conftest import EXAMPLE_FACTS


def run_cli(*args):
    from click.testing import CliRunner

    from editcomp.cli import cli
    res = CliRunner().invoke(cli, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_tokenizer):
    out = tmp_path_factory.mktemp("edit") / "tiny"
    return checkpoint.save(tiny_model("llama", vocab_size=1024), tiny_tokenizer, out,
                           checkpoint.lineage_entry("test", {"why": "edit cli"}))


GENERIC = "The weather was mild and the river ran quietly past the town. " * 200


@pytest.fixture(scope="module")
def generic_text(tmp_path_factory):
    p = tmp_path_factory.mktemp("generic") / "generic.txt"
    p.write_text(GENERIC, encoding="utf-8")
    return p


@pytest.fixture(autouse=True)
def default_preserve_text(monkeypatch, generic_text):
    """``editcomp edit`` reads WikiText-2 valid.txt from ../shared by default, which a clean
    clone may not have: these tests point the default at a small generic text instead."""
    monkeypatch.setattr("editcomp.cli.edit.DEFAULT_CALIB", str(generic_text))
    return generic_text


def one_line_error(res, *needles):
    assert res.exit_code == 1
    # transformers' weight-loading bar may precede it; the error itself is one line
    lines = [line for line in res.stderr.strip().splitlines()
             if line.strip() and not line.startswith("Loading weights")]
    assert len(lines) == 1, res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("method", ["lafn", "ft-l"])
def test_edit_writes_a_loadable_checkpoint_with_lineage(tiny_ckpt, tmp_path, method):
    out, rep = tmp_path / "edited", tmp_path / "neurons.json"
    ftl = (["--layer", "1", "--norm-constraint", "1e-3", "--objective", "target_new"]
           if method == "ft-l" else [])
    res = run_cli("edit", EXAMPLE_FACTS, "--model", tiny_ckpt, "--out", out, "--method", method,
                  "--langs", "en,de", "--limit", "2", "--offset", "1", "--paraphrases", "1",
                  "--report", rep, "--json", *ftl)
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["facts"] == 2 and set(result["edit"]) == {"en", "de", "mean"}
    ck = checkpoint.load(out)
    last = ck.lineage["history"][-1]
    assert last["op"] == "edit" and last["config"]["method"] == method
    assert last["facts"]["sha256"] == facts_sha256(EXAMPLE_FACTS) and last["facts"]["count"] == 2
    assert "templates" in last["paraphrase_source"]
    assert last["metrics"]["edit"]["mean"]["reliability"]["n"] == 4
    base = checkpoint.load(tiny_ckpt)
    diff = [n for n, w in ck.model.state_dict().items() if not torch.equal(w, base.model.state_dict()[n])]
    assert all("down_proj" in n for n in diff)
    if method == "lafn":  # the defaults may locate nothing in a random 2-layer model: then nothing moves
        assert bool(diff) == (last["metrics"]["neurons"]["total"] > 0)
        unrelated = last["unrelated_prompts"]  # 4 hand-written per language, then the sampled ones
        assert unrelated["texts"][:4] == list(KL_PROMPTS["en"][:4])
        assert len(unrelated["texts"]) == 8 + unrelated["sampled_questions"]
        report = json.loads(rep.read_text())
        assert len(report["layer_histogram"]) == 2 and "en-de" in report["language_overlap_jaccard"]
    else:  # --layer, --norm-constraint and --objective reach the fine-tuning
        assert diff == ["model.layers.1.mlp.down_proj.weight"]
        assert last["config"]["layer"] == 1 and last["config"]["norm_constraint"] == 1e-3
        assert last["config"]["objective"] == "target_new"
        moved = ck.model.state_dict()[diff[0]] - base.model.state_dict()[diff[0]]
        assert moved.abs().max() <= 1e-3 + 1e-6
        assert not rep.exists() and "unrelated_prompts" not in last
    # --out exists: refused without --force, replaced with it
    one_line_error(run_cli("edit", EXAMPLE_FACTS, "--model", tiny_ckpt, "--out", out, "--limit", "1"),
                   "already exists")


def test_the_location_thresholds_reach_the_edit(tiny_ckpt, tmp_path):
    out = tmp_path / "edited"
    res = run_cli("edit", EXAMPLE_FACTS, "--model", tiny_ckpt, "--out", out, "--langs", "en,de",
                  "--limit", "1", "--top-frac", "0.2", "--share", "0.5", "--max-neurons", "3",
                  "--neurons-per-token", "0", "--min-neurons", "2", "--form-share", "1.0",
                  "--steps", "2", "--nll-floor", "0.25",
                  "--selectivity", "0.5", "--no-lr-decay", "--kl-weight", "3", "--last-step",
                  "--json")
    assert res.exit_code == 0, res.output
    last = checkpoint.load(out).lineage["history"][-1]
    lafn = last["config"]
    assert lafn["lr_decay"] is False and lafn["keep_best"] is False
    assert lafn["steps"] == 2 and lafn["locate"]["top_frac"] == 0.2 and lafn["locate"]["share"] == 0.5
    assert lafn["locate"]["form_share"] == 1.0 and lafn["nll_floor"] == 0.25
    assert lafn["kl_weight"] == 3.0
    assert lafn["locate"]["min_neurons"] == 2 and lafn["locate"]["selectivity"] == 0.5
    assert lafn["locate"]["neurons_per_token"] == 0
    assert 0 < last["metrics"]["neurons"]["total"] <= 3
    one_line_error(run_cli("edit", EXAMPLE_FACTS, "--model", tiny_ckpt, "--out", tmp_path / "x",
                           "--share", "1.5"), "share must be in (0, 1]")
    one_line_error(run_cli("edit", EXAMPLE_FACTS, "--model", tiny_ckpt, "--out", tmp_path / "w",
                           "--min-neurons", "0"), "min_neurons must be >= 1")
    one_line_error(run_cli("edit", EXAMPLE_FACTS, "--model", tiny_ckpt, "--out", tmp_path / "v",
                           "--selectivity", "2"), "selectivity must be in [0, 1]")
    one_line_error(run_cli("edit", EXAMPLE_FACTS, "--model", tiny_ckpt, "--out", tmp_path / "y",
                           "--method", "ft-l", "--top-frac", "0.1"), "apply to --method lafn only")
    one_line_error(run_cli("edit", EXAMPLE_FACTS, "--model", tiny_ckpt, "--out", tmp_path / "y",
                           "--method", "ft-l", "--nll-floor", "0.5"), "--nll-floor", "lafn only")
    one_line_error(run_cli("edit", EXAMPLE_FACTS, "--model", tiny_ckpt, "--out", tmp_path / "y",
                           "--method", "ft-l", "--kl-weight", "5"), "--kl-weight", "lafn only")
    one_line_error(run_cli("edit", EXAMPLE_FACTS, "--model", tiny_ckpt, "--out", tmp_path / "y",
                           "--method", "ft-l", "--last-step"), "--keep-best", "lafn only")
    one_line_error(run_cli("edit", EXAMPLE_FACTS, "--model", tiny_ckpt, "--out", tmp_path / "z",
                           "--nll-floor", "-1"), "nll_floor must be >= 0")
    one_line_error(run_cli("edit", EXAMPLE_FACTS, "--model", tiny_ckpt, "--out", tmp_path / "z",
                           "--norm-constraint", "1e-4"), "--norm-constraint", "ft-l only")
    one_line_error(run_cli("edit", EXAMPLE_FACTS, "--model", tiny_ckpt, "--out", tmp_path / "z",
                           "--objective", "target_new"), "--objective", "ft-l only")
    one_line_error(run_cli("edit", EXAMPLE_FACTS, "--model", tiny_ckpt, "--out", tmp_path / "y",
                           "--method", "ft-l", "--foreign-answers", "1"), "--foreign-answers",
                   "lafn only")
    one_line_error(run_cli("edit", EXAMPLE_FACTS, "--model", tiny_ckpt, "--out", tmp_path / "z",
                           "--foreign-answers", "-1"), "foreign_answers must be >= 0")
    one_line_error(run_cli("edit", EXAMPLE_FACTS, "--model", tiny_ckpt, "--out", tmp_path / "y",
                           "--method", "ft-l", "--answer-preserve", "1"), "--answer-preserve",
                   "lafn only")
    one_line_error(run_cli("edit", EXAMPLE_FACTS, "--model", tiny_ckpt, "--out", tmp_path / "z",
                           "--answer-preserve", "-1"), "answer_preserve must be >= 0")
    assert not any((tmp_path / d).exists() for d in ("x", "y", "z"))


def test_a_batch_takes_foreign_answers_from_the_generic_text(tiny_ckpt, tmp_path, monkeypatch):
    """Facts edited together read the generic text for its names and dates even without the
    preservation term; the lineage names the text and counts the foreign answers, one per
    sampled question (--foreign-answers 1)."""
    text = _bad(tmp_path, "It was built in 1887 by Gustave Eiffel . " * 50, "names.txt")
    monkeypatch.setattr("editcomp.edit.unrelated.sample_questions",
                        lambda model, tok, lang, n, seed=0: ["Who painted the ceiling?",
                                                            "Where is the old bridge?"][:n])
    out = tmp_path / "edited"
    res = run_cli("edit", EXAMPLE_FACTS, "--model", tiny_ckpt, "--out", out, "--langs", "en",
                  "--limit", "2", "--steps", "1", "--preserve-weight", "0", "--preserve-text",
                  text, "--foreign-answers", "1", "--json")
    assert res.exit_code == 0, res.output
    last = checkpoint.load(out).lineage["history"][-1]
    assert last["preserve_text"]["path"] == str(text)
    prompts = last["unrelated_prompts"]
    assert prompts["sampled_questions"] == 2 and prompts["foreign_answers"] == 2
    assert all(t.endswith((" 1887", " Gustave Eiffel")) for t in prompts["texts"][-2:])


def test_a_questions_file_replaces_the_sampled_questions(tiny_ckpt, tmp_path, monkeypatch):
    """--questions: the file's questions in the edited languages join the KL term in file order,
    none is sampled, and, their answers being their own, none takes a foreign answer, so
    without the preservation term the generic text is not read (a missing one is no error);
    the lineage names the file and its sha256."""
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled questions with a questions file given")
    monkeypatch.setattr("editcomp.edit.unrelated.sample_questions", no_sampling)
    questions = _bad(tmp_path, "\n".join(json.dumps(q) for q in [
        {"lang": "en", "question": "Who wrote the old song?", "answer": "Anna Berg"},
        {"lang": "de", "question": "Wer baute die Brücke?", "answer": "Karl"},
        {"lang": "en", "question": "Where is the quiet lake?"}]) + "\n", "q.jsonl")
    out = tmp_path / "edited"
    res = run_cli("edit", EXAMPLE_FACTS, "--model", tiny_ckpt, "--out", out, "--langs", "en",
                  "--limit", "2", "--steps", "1", "--preserve-weight", "0", "--preserve-text",
                  tmp_path / "missing.txt", "--questions", questions, "--json")
    assert res.exit_code == 0, res.output
    last = checkpoint.load(out).lineage["history"][-1]
    assert last["questions"] == {"path": str(questions), "sha256": facts_sha256(questions)}
    prompts = last["unrelated_prompts"]
    assert prompts["sampled_questions"] == 2 and prompts["foreign_answers"] == 0
    assert prompts["texts"][-2:] == ["Who wrote the old song?", "Where is the quiet lake?"]


def test_a_bad_questions_file_fails_before_anything_is_written(tiny_ckpt, tmp_path):
    """A malformed line names file, line and field; a file without a question in the edited
    languages names the file and the languages it has; FT-L takes none."""
    bad = _bad(tmp_path, '{"lang": "en", "question": "Who?"}\n{"lang": "en"}\n', "bad.jsonl")
    one_line_error(run_cli("edit", EXAMPLE_FACTS, "--model", tiny_ckpt, "--out", tmp_path / "x",
                           "--langs", "en", "--questions", bad),
                   "bad.jsonl:2", "field 'question': missing")
    german = _bad(tmp_path, '{"lang": "de", "question": "Wer?"}\n', "de.jsonl")
    one_line_error(run_cli("edit", EXAMPLE_FACTS, "--model", tiny_ckpt, "--out", tmp_path / "y",
                           "--langs", "en", "--questions", german),
                   "de.jsonl", "no questions in the edited languages (en)", "it has de")
    one_line_error(run_cli("edit", EXAMPLE_FACTS, "--model", tiny_ckpt, "--out", tmp_path / "z",
                           "--method", "ft-l", "--questions", german), "--questions", "lafn only")
    assert not any((tmp_path / d).exists() for d in ("x", "y", "z"))


def _bad(tmp_path, text, name="f.jsonl"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


@pytest.mark.parametrize("content,needles", [
    ('{"case_id": "a", "langs": {"en": {"prompt": "The sky is"}}}\n',
     ["f.jsonl:1", "langs.en.target", "missing"]),
    ('{"case_id": "a", "langs": {"en": {"prompt": "The sky is", "target": "green"}}}\n'
     '{"case_id": "b", "langs": {"de": {"prompt": "Der Himmel ist", "target": "grün"}}}\n',
     ["f.jsonl:2", "langs.en", "language missing"]),
    ("\n\n", ["f.jsonl", "empty"]),
])
def test_bad_facts_fail_in_one_line_and_write_nothing(tiny_ckpt, tmp_path, content, needles):
    out = tmp_path / "out"
    res = run_cli("edit", _bad(tmp_path, content), "--model", tiny_ckpt, "--out", out, "--langs", "en")
    one_line_error(res, *needles)
    assert not out.exists()


def test_a_target_that_tokenizes_to_nothing(tiny_ckpt, tmp_path, tiny_tokenizer):
    from tokenizers import normalizers

    tok = copy.deepcopy(tiny_tokenizer)
    tok.backend_tokenizer.normalizer = normalizers.Replace("§", "")
    ck = checkpoint.save(checkpoint.load(tiny_ckpt).model, tok, tmp_path / "ck",
                         checkpoint.lineage_entry("test"))
    facts = _bad(tmp_path, '{"case_id": "a", "langs": {"en": {"prompt": "The sign is", "target": "ok"}}}\n'
                           '{"case_id": "b", "langs": {"en": {"prompt": "The mark is", "target": "§"}}}\n')
    out = tmp_path / "out"
    one_line_error(run_cli("edit", facts, "--model", ck, "--out", out),
                   "f.jsonl:2", "langs.en.target", "tokenizes to no tokens")
    assert not out.exists()


def test_lafn_reads_the_default_preservation_text(tiny_ckpt, tmp_path, default_preserve_text):
    out = tmp_path / "edited"
    res = run_cli("edit", EXAMPLE_FACTS, "--model", tiny_ckpt, "--out", out, "--langs", "en",
                  "--limit", "1", "--steps", "2", "--json")
    assert res.exit_code == 0, res.output
    last = checkpoint.load(out).lineage["history"][-1]
    assert last["config"]["preserve_weight"] == 5.0
    assert last["preserve_text"] == {"path": str(default_preserve_text),
                                     "sha256": facts_sha256(default_preserve_text)}


@pytest.mark.parametrize("method,extra", [("lafn", ["--preserve-weight", "0"]), ("ft-l", [])])
def test_no_preservation_term_reads_no_text(tiny_ckpt, tmp_path, monkeypatch, method, extra):
    """Weight 0 (or FT-L) never touches the preservation text: a missing default is no error,
    and the lineage names no text."""
    monkeypatch.setattr("editcomp.cli.edit.DEFAULT_CALIB", str(tmp_path / "absent.txt"))
    out = tmp_path / "edited"
    res = run_cli("edit", EXAMPLE_FACTS, "--model", tiny_ckpt, "--out", out, "--langs", "en",
                  "--limit", "1", "--steps", "2", "--method", method, *extra)
    assert res.exit_code == 0, res.output
    assert "preserve_text" not in checkpoint.load(out).lineage["history"][-1]


def test_a_missing_default_preservation_text_says_how_to_go_on(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr("editcomp.cli.edit.DEFAULT_CALIB", str(tmp_path / "absent.txt"))
    out = tmp_path / "out"
    one_line_error(run_cli("edit", EXAMPLE_FACTS, "--model", tiny_ckpt, "--out", out,
                           "--langs", "en", "--limit", "1"),
                   "absent.txt", "file not found", "--preserve-text", "preserve weight 0")
    assert not out.exists()


def test_preserve_text_reaches_the_edit_and_its_lineage(tiny_ckpt, tmp_path, monkeypatch):
    text = _bad(tmp_path, GENERIC, "generic.txt")
    asked = []
    # --answer-preserve samples them
    monkeypatch.setattr("editcomp.edit.unrelated.sample_questions",
                        lambda model, tok, lang, n, seed=0: asked.append(lang) or [
                            "Who painted the ceiling?", "Where is the old bridge?"][:n])
    out = tmp_path / "edited"
    res = run_cli("edit", EXAMPLE_FACTS, "--model", tiny_ckpt, "--out", out, "--langs", "en,de",
                  "--limit", "1", "--top-frac", "0.2", "--share", "0.5", "--form-share", "1.0",
                  "--steps", "3", "--preserve-text", text, "--preserve-weight", "7",
                  "--neighbors", "1", "--answer-preserve", "3", "--batch-questions", "2", "--json")
    assert res.exit_code == 0, res.output
    last = checkpoint.load(out).lineage["history"][-1]
    assert last["config"]["preserve_weight"] == 7.0 and last["config"]["neighbors"] == 1
    assert last["config"]["answer_preserve"] == 3.0 and asked == ["en", "de"]
    assert last["preserve_text"] == {"path": str(text), "sha256": facts_sha256(text)}


@pytest.mark.parametrize("content,needles", [
    (None, ["missing.txt", "file not found"]),
    ("too short", ["short.txt", "fewer than one window"]),
])
def test_bad_preserve_text_fails_in_one_line_and_writes_nothing(tiny_ckpt, tmp_path, content,
                                                                needles):
    text = tmp_path / "missing.txt" if content is None else _bad(tmp_path, content, "short.txt")
    out = tmp_path / "out"
    one_line_error(run_cli("edit", EXAMPLE_FACTS, "--model", tiny_ckpt, "--out", out,
                           "--langs", "en", "--limit", "1", "--preserve-text", text), *needles)
    assert not out.exists()

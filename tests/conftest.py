"""Shared test fixtures: the shared data sets, and a tiny Llama with a real in-memory tokenizer
(both built by ``editcomp.tiny``; no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_FACTS = REPO / "examples" / "facts.jsonl"


def find_shared_data() -> Path | None:
    """``../shared/data`` next to the repository (or ``shared/data`` inside it), if present."""
    for cand in (REPO.parent / "shared" / "data", REPO / "shared" / "data"):
        if cand.is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real data sets (WikiText-2, BMIKE-53); tests that need them skip without them."""
    path = find_shared_data()
    if path is None:
        pytest.skip("../shared/data is not available")
    return path


def run_cli(*args):
    """Run ``editcomp ARGS`` in-process (stdout and stderr apart). User errors come back as the
    exit code and message; anything else (a bug) is re-raised with its traceback."""
    from click.testing import CliRunner

    from editcomp.cli import cli

    res = CliRunner().invoke(cli, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res


@pytest.fixture(autouse=True)
def question_cache_dir(tmp_path_factory, monkeypatch):
    """LAFN edits keep the questions they sample under $EDITCOMP_HOME/questions; tests keep
    them in a directory of their own instead of the user's cache."""
    path = tmp_path_factory.mktemp("questions")
    monkeypatch.setattr("editcomp.edit.question_cache.cache_dir", lambda: path)
    return path


# ------------------------------------------------------------------------------ tiny model + tokenizer


def tokenizer_texts() -> list[str]:
    """What the session tokenizer is trained on: WikiText lines and every string of the example
    facts, so test text (en/de/fr/es/zh) tokenizes into realistic pieces."""
    texts: list[str] = []
    data = find_shared_data()
    if data is not None and (data / "wikitext-2" / "valid.txt").is_file():
        lines = (data / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").splitlines()
        texts += [line for line in lines[:600] if line.strip()]
    if EXAMPLE_FACTS.is_file():
        for line in EXAMPLE_FACTS.read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts += _strings_in(json.loads(line))
    return texts


def _strings_in(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings_in(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings_in(v)]
    return []


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """``editcomp.tiny.tiny_tokenizer`` with a 1024 vocabulary (``<unk>`` included) trained on
    ``tokenizer_texts()``; tests' numbers were measured with exactly this tokenizer."""
    from editcomp.tiny import tiny_tokenizer as build

    return build(vocab_size=1024, texts=tokenizer_texts(), unk_token="<unk>")


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer):
    """``editcomp.tiny.tiny_model("llama")`` sized to ``tiny_tokenizer``. Session-scoped: tests
    that change weights must work on a ``copy.deepcopy``."""
    from editcomp.tiny import tiny_model

    return tiny_model("llama", vocab_size=len(tiny_tokenizer))


# ------------------------------------------------------------------------------ CLI fixtures

CALIB_TEXT = ("The capital of France is Paris. Language models store facts in their weights. "
              "Die Hauptstadt von Deutschland ist Berlin. ") * 80


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A saved tiny Llama checkpoint (module-scoped: commands must write elsewhere)."""
    from editcomp import checkpoint
    from editcomp.tiny import tiny_model, tiny_tokenizer

    out = tmp_path_factory.mktemp("q") / "tiny"
    return checkpoint.save(tiny_model("llama"), tiny_tokenizer(), out,
                           checkpoint.lineage_entry("test"))


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """A calibration / evaluation text file long enough for a few 32-token windows."""
    p = tmp_path_factory.mktemp("t") / "calib.txt"
    p.write_text(CALIB_TEXT)
    return p

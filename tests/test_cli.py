"""The command line: one-line errors without tracebacks, and machine-readable --json output."""

import json
import subprocess
import sys

import pytest

from editcomp import checkpoint
from editcomp.tiny import tiny_model, tiny_tokenizer


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_cli(*args):
    """Run the CLI in-process; an exception that escaped click would be a traceback."""
    from click.testing import CliRunner

    from editcomp.cli import cli
    res = CliRunner().invoke(cli, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return Result(res.exit_code, res.stdout, res.stderr)


def run_process(*args):
    return subprocess.run([sys.executable, "-m", "editcomp.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "tiny"
    return checkpoint.save(tiny_model("llama"), tiny_tokenizer(), out,
                           checkpoint.lineage_entry("test", {"why": "cli"}))


def assert_clean_failure(res, *needles):
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_checkpoint_in_a_real_process(tmp_path):
    assert_clean_failure(run_process("eval", tmp_path / "no" / "such" / "dir"),
                         "no such checkpoint directory")


def test_truncated_weights(tmp_path, tiny_ckpt):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-64])
    assert_clean_failure(run_cli("eval", bad), "model.safetensors", "truncated")


def test_unsupported_family(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(
        tmp_path / "gpt2")
    assert_clean_failure(run_cli("eval", tmp_path / "gpt2"), "unsupported model family 'gpt2'",
                         "supported: llama")


def test_facts_with_a_missing_field(tmp_path, tiny_ckpt):
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"case_id": "a", "langs": {"en": {"prompt": "The sky is"}}}) + "\n")
    assert_clean_failure(run_cli("eval", tiny_ckpt, "--facts", facts),
                         "facts.jsonl:1", "target")


def test_json_output_is_the_last_stdout_line(tiny_ckpt, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The capital of France is Paris. " * 40)
    res = run_cli("eval", tiny_ckpt, "--text", text, "--seq-len", 32, "--max-windows", 3, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    ck = checkpoint.load(tiny_ckpt, device="cpu")
    from editcomp.data import token_windows
    from editcomp.eval import perplexity
    expected = perplexity(ck.model, token_windows(ck.tokenizer, text, 32, 3), progress=False)
    assert out["perplexity"]["windows"] == 3
    assert out["perplexity"]["ppl"] == pytest.approx(expected["ppl"], rel=1e-6)
    assert out["lineage"][0]["config"] == {"why": "cli"}


def test_human_output_shows_lineage_and_kl_to_itself_is_zero(tiny_ckpt, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Language models store facts. " * 40)
    res = run_cli("eval", tiny_ckpt, "--text", text, "--seq-len", 32, "--max-windows", 2,
                  "--teacher", tiny_ckpt)
    assert res.returncode == 0, res.stderr
    assert "lineage:" in res.stdout and "1. test" in res.stdout
    kl_line = next(line for line in res.stdout.splitlines() if line.startswith("KL"))
    assert float(kl_line.split(":")[1].split()[0]) == pytest.approx(0.0, abs=1e-6)


def test_help_explains_every_command():
    res = run_cli("--help")
    assert res.returncode == 0
    for cmd in ("eval", "models"):
        assert cmd in res.stdout
    res = run_cli("eval", "--help")
    assert "--max-windows" in res.stdout and "Example" in res.stdout

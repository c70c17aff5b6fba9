"""Recipes: validation names the bad key and the valid ones; steps map onto config dataclasses."""

from __future__ import annotations

import pytest
import yaml
from conftest import EXAMPLE_FACTS

from editcomp.errors import ConfigError
from editcomp.quant.pipeline import QuantizeConfig
from editcomp.recipe import load_recipe, parse_recipe


def _recipe(tmp_path, **overrides):
    data = {"name": "t", "model": str(tmp_path), "workdir": str(tmp_path / "work"),
            "steps": [{"quantize": {"bits": "w4a16", "method": "rtn"}}]}
    data.update(overrides)
    return data


def test_steps_build_their_config_dataclass(tmp_path):
    r = parse_recipe(_recipe(tmp_path, steps=[
        {"name": "q4", "quantize": {"bits": "w4a16", "method": "gptq", "nsamples": 4,
                                    "calib": "calib.txt"}}]), tmp_path / "r.yaml")
    (step,) = r.steps
    assert isinstance(step.config, QuantizeConfig)
    assert (step.config.bits, step.config.method, step.config.nsamples) == ("w4a16", "gptq", 4)
    assert step.name == "q4"
    assert step.inputs == {"calib": str(tmp_path / "calib.txt")}  # relative to the recipe


def test_an_edit_steps_questions_file_is_read_relative_to_the_recipe(tmp_path):
    r = parse_recipe(_recipe(tmp_path, steps=[
        {"edit": {"method": "lafn", "facts": "facts.jsonl",
                  "questions_file": "q/questions.jsonl"}}]), tmp_path / "r.yaml")
    (step,) = r.steps
    assert step.inputs == {"facts": str(tmp_path / "facts.jsonl"),
                           "questions_file": str(tmp_path / "q" / "questions.jsonl")}


def test_unknown_step_kind_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse_recipe(_recipe(tmp_path, steps=[{"prune": {"ratio": 0.5}}]))
    msg = str(e.value)
    assert "steps[0]" in msg and "'prune'" in msg
    assert all(k in msg for k in ("edit", "quantize", "distill"))


def test_unknown_config_key_names_key_and_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse_recipe(_recipe(tmp_path, steps=[{"quantize": {"bits": "w4a16", "bitz": 3}}]))
    msg = str(e.value)
    assert "steps[0].quantize" in msg and "'bitz'" in msg
    assert "nsamples" in msg and "calib" in msg  # config fields and the step's inputs


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'modle'.*model"):
        parse_recipe({"modle": "x", "steps": []})


def test_bad_value_fails_before_any_model_is_loaded(tmp_path):
    with pytest.raises(ConfigError, match="steps\\[0\\].quantize: unsupported bits 'w9a9'"):
        parse_recipe(_recipe(tmp_path, steps=[{"quantize": {"bits": "w9a9"}}]))
    with pytest.raises(ConfigError, match="unknown method"):
        parse_recipe(_recipe(tmp_path, steps=[{"quantize": {"method": "magic"}}]))


def test_teacher_must_name_an_earlier_step_or_a_model(tmp_path):
    with pytest.raises(ConfigError, match="teacher.*'later'.*earlier step"):
        parse_recipe(_recipe(tmp_path, steps=[{"distill": {"teacher": "later"}}]))


def test_duplicate_step_names_are_refused(tmp_path):
    steps = [{"quantize": {"bits": "w4a16"}}, {"quantize": {"bits": "w8a8"}}]
    with pytest.raises(ConfigError, match="used twice"):
        parse_recipe(_recipe(tmp_path, steps=steps))


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: x\nsteps:\n  - quantize: {bits: w4a16\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(p)
    assert str(e.value).startswith(f"{p}:") and "YAML" in str(e.value)


def test_shipped_recipes_parse():
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
    assert recipes, "recipes/ is empty"
    for p in recipes:
        data = yaml.safe_load(p.read_text())
        assert parse_recipe(data, p).steps


# ------------------------------------------------------------------------------------ running

TEXT = ("The capital of France is Paris. The Eiffel Tower is located in the city of Paris. "
        "Language models store facts in the weights of their feed-forward layers. ") * 40


@pytest.fixture()
def tiny_run(tmp_path):
    from editcomp import checkpoint
    from editcomp.tiny import tiny_model, tiny_tokenizer

    base = checkpoint.save(tiny_model("llama"), tiny_tokenizer(), tmp_path / "base",
                           checkpoint.lineage_entry("test"))
    (tmp_path / "text.txt").write_text(TEXT)
    data = {"name": "tiny", "model": str(base), "workdir": str(tmp_path / "work"),
            "eval": {"text": "text.txt", "seq_len": 32, "max_windows": 2,
                     "facts": str(EXAMPLE_FACTS), "langs": "en", "limit": 2},
            "steps": [{"name": "q", "quantize": {"bits": "w4a16", "method": "rtn"}},
                      {"distill": {"teacher": "base", "text": "text.txt", "loss": "fkl",
                                   "train": "scales", "steps": 2, "seq_len": 32}}]}
    return tmp_path, data


def test_run_writes_every_step_and_resumes(tiny_run):
    from editcomp.checkpoint import read_lineage, weights_sha256
    from editcomp.recipe import run_recipe

    tmp_path, data = tiny_run
    logs = []
    report = run_recipe(parse_recipe(data, tmp_path / "r.yaml"), log=logs.append)
    work = tmp_path / "work"
    assert [s["stage"] for s in report["stages"]] == ["base", "q", "distill"]
    assert all("ppl" in s["eval"] for s in report["stages"])
    # locality is agreement with the starting model, so the base agrees with itself fully
    assert report["stages"][0]["eval"]["edit"]["en"]["locality"] == 1.0
    ops = [e["op"] for e in read_lineage(work / "02-distill")["history"]]
    assert ops == ["test", "quantize", "distill"]
    assert (work / "report.md").read_text().count("\n| ") == 4  # header + 3 stages
    first = weights_sha256(work / "02-distill")

    logs.clear()
    again = run_recipe(parse_recipe(data, tmp_path / "r.yaml"), log=logs.append)
    assert sum("skipped" in m for m in logs) == 2
    assert weights_sha256(work / "02-distill") == first
    assert [s["eval"] for s in again["stages"]] == [s["eval"] for s in report["stages"]]


def test_changed_step_does_not_silently_reuse_or_replace_output(tiny_run):
    from editcomp.errors import EditcompError
    from editcomp.recipe import run_recipe

    tmp_path, data = tiny_run
    run_recipe(parse_recipe(data, tmp_path / "r.yaml"), log=lambda m: None)
    data["steps"][1]["distill"]["steps"] = 3
    with pytest.raises(EditcompError, match="02-distill exists but was made by another"):
        run_recipe(parse_recipe(data, tmp_path / "r.yaml"), log=lambda m: None)
    logs = []
    run_recipe(parse_recipe(data, tmp_path / "r.yaml"), force=True, log=logs.append)
    assert not any("skipped" in m for m in logs)

"""benchmarks/intervals.py: the arithmetic behind the numbers the results README reports."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "intervals", Path(__file__).resolve().parents[1] / "benchmarks" / "intervals.py")
intervals = importlib.util.module_from_spec(spec)
spec.loader.exec_module(intervals)


def row(method, lang, locality, steps=None):
    cases = [{"case_id": str(k), "locality": v, "steps": (steps or [10] * len(locality))[k]}
             for k, v in enumerate(locality)]
    return {"model": "m", "pair": f"en+{lang}", "protocol": "single", "method": method,
            "lang": lang, "per_case": cases}


def test_a_patch_replaces_only_its_cases_of_the_matching_rows():
    """Case 1 of the de row re-run (0 -> 1): the patched de row is 1.0 over its 3 cases, +1/3
    paired against the record; the zh row, which the patch does not hold, is unchanged."""
    record = [row("lafn", "de", [1.0, 0.0, 1.0]), row("lafn", "zh", [0.5, 0.5])]
    patch = [{**row("lafn@x", "de", [1.0]), "per_case": [
        {"case_id": "1", "locality": 1.0, "steps": 4}]}]
    out = intervals.patched(record, patch)
    assert [c["locality"] for c in out[0]["per_case"]] == [1.0, 1.0, 1.0]
    assert "lafn@x" in out[0]["method"] and "(1 cases)" in out[0]["method"]
    assert out[1] is record[1]
    assert [c["locality"] for c in record[0]["per_case"]] == [1.0, 0.0, 1.0]  # record untouched
    items = intervals.interval_rows(out, ["locality", "steps"], base=record)
    de_loc, de_steps = items[0], items[1]
    assert de_loc["mean"] == 1.0 and de_loc["cases"] == 3
    assert de_loc["diff"] == pytest.approx(1 / 3) and de_loc["shared_cases"] == 3
    assert de_steps["mean"] == pytest.approx(8.0) and de_steps["diff"] == pytest.approx(-2.0)
    assert items[2]["mean"] == 0.5 and items[2]["diff"] == 0.0

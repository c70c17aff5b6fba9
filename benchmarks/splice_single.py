"""Splice re-run cases into a single-protocol run of benchmarks/edit.py.

A change that touches only some cases (say, facts whose location changes) need not re-run all
400 single edits: re-run those cases with ``edit.py --only IDS`` plus a few untouched control
cases, and splice. Single edits restore the model between cases and run deterministically on
one machine, so an untouched case gives the same result; this script checks that on the
controls (any difference is reported) and that the per-case means reproduce each base row.

    python benchmarks/splice_single.py benchmarks/results/edit_gemma3-270m_single100.json \\
        --rerun benchmarks/results/edit_gemma3-270m_single100_topup_{de,zh,fr,es}.json \\
        --controls 0,1 --out benchmarks/results/edit_gemma3-270m_single100_spliced.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from editcomp.eval.edit_metrics import METRICS  # noqa: E402


def splice(base_rows: list[dict], rerun_rows: list[dict], controls: set[str]) -> list[dict]:
    """-> one entry per base row (``lang``, ``pair``): each metric, seconds and steps before and
    after splicing, the re-run cases, and the controls that differ (should be none)."""
    fresh = {(r["pair"], r["lang"]): {c["case_id"]: c for c in r["per_case"]} for r in rerun_rows}
    out = []
    for row in base_rows:
        for m in METRICS:  # one probe per case and metric: the row is the per-case mean
            mean = statistics.mean(c[m] for c in row["per_case"])
            if abs(mean - row[m]["acc"]) > 1e-9:
                raise ValueError(f"{row['pair']} {row['lang']} {m}: per-case mean {mean} "
                                 f"is not the row's {row[m]['acc']}")
        new = fresh.get((row["pair"], row["lang"]), {})
        old = {c["case_id"]: c for c in row["per_case"]}
        differ = [cid for cid in controls & new.keys()
                  if any(new[cid][k] != old[cid][k] for k in (*METRICS, "steps"))]
        cases = [new[cid] if cid in new and cid not in controls else c for cid, c in old.items()]

        def both(key):
            return [round(statistics.mean(c[key] for c in cs), 3) for cs in (row["per_case"], cases)]

        out.append({"pair": row["pair"], "lang": row["lang"],
                    **{k: both(k) for k in (*METRICS, "seconds", "steps")},
                    "rerun": sorted((cid for cid in new if cid not in controls), key=int),
                    "controls_differ": differ})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", help="edit.py JSON of the full single run")
    ap.add_argument("--rerun", nargs="+", required=True, help="edit.py JSON of the re-run cases")
    ap.add_argument("--controls", default="", help="comma-separated case ids re-run unchanged")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    base = json.loads(Path(args.base).read_text())["rows"]
    rerun = [r for f in args.rerun for r in json.loads(Path(f).read_text())["rows"]]
    rows = splice([r for r in base if r["protocol"] == "single"], rerun,
                  {c for c in args.controls.split(",") if c})
    for r in rows:
        print(f"{r['pair']} {r['lang']}: " + ", ".join(f"{k} {a} -> {b}" for k in
              (*METRICS, "seconds", "steps") for a, b in [r[k]])
              + f"; re-run {len(r['rerun'])}; controls differing {r['controls_differ']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"base": args.base, "rerun": args.rerun,
                                              "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

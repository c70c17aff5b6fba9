"""95% bootstrap intervals of benchmarks/edit.py rows, and of the paired difference to a base row.

A row's mean over 100 BMIKE-53 cases moves by about +-0.01 with nothing but which near-tie
tokens flip, so a difference between two settings, or between a row and an issue's target, is
read against its interval (``editcomp.eval.bootstrap_ci``; cases resampled whole). Paired: the
two rows' per-case values on the case ids both hold, so what the cases share cancels out.

    python benchmarks/intervals.py benchmarks/results/edit_gemma3-270m_single_fr100_heldout512_stop0305.json
    python benchmarks/intervals.py NEW.json --base OLD.json:lafn --metrics locality,generality

Rows written before the per-case probe counts were stored count one probe per case (BMIKE-53
has one of each probe per case and language).

A setting that changes only some cases (a rule for long targets, say) is measured by re-running
those cases alone (``benchmarks/edit.py --only``): single edits are deterministic per case, so
``--patch NEW.json`` puts the re-run cases into the rows of record in place of theirs, and the
patched rows are read as whole rows:

    python benchmarks/intervals.py OLD.json:lafn --patch NEW.json --base OLD.json:lafn
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from editcomp.eval import bootstrap_ci  # noqa: E402
from editcomp.eval.edit_metrics import METRICS  # noqa: E402

EXTRA = ("steps", "seconds")  # per-case fields of a single edit that are not probe metrics


def case_values(row: dict, metric: str) -> dict[str, tuple[float, int]]:
    """``{case_id: (acc, probes)}`` of a row's cases that have ``metric`` probes."""
    out = {}
    for c in row.get("per_case") or []:
        n = (c.get("probes") or {}).get(metric, 1)
        if n and c.get(metric) is not None:
            out[str(c["case_id"])] = (float(c[metric]), n)
    return out


def values_ci(vals: dict[str, tuple[float, int]]) -> tuple[float, float] | None:
    """The 95% interval of ``case_values`` (each probe weighted the same; None: no cases)."""
    return bootstrap_ci([a for a, _ in vals.values()], [n for _, n in vals.values()])


def row_ci(row: dict, metric: str) -> list[float] | None:
    """The 95% interval of a row's ``metric`` over its cases (rounded; None: no cases)."""
    ci = values_ci(case_values(row, metric))
    return [round(x, 4) for x in ci] if ci is not None else None


def key(row: dict) -> tuple:
    """Which rows compare: the same model, pair, protocol and language."""
    return row["model"], row["pair"], row["protocol"], row["lang"]


def load_rows(spec: str) -> list[dict]:
    """``FILE`` or ``FILE:METHOD`` (only that method's rows)."""
    path, sep, method = spec.partition(".json:")
    path = Path(path + ".json" if sep else path)
    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"{path}: not a benchmarks/edit.py results file ({e})")
    picked = [r for r in rows if not method or r["method"] == method]
    if not picked:
        raise SystemExit(f"{path}: no rows of method {method!r} "
                         f"(it has {sorted({r['method'] for r in rows})})")
    return picked


def patched(rows: list[dict], patch: list[dict]) -> list[dict]:
    """``rows`` with each case that a ``patch`` row of the same ``key`` holds replaced by the
    patch's record of it (the row's method then names both)."""
    by_key = {key(p): p for p in patch}
    out = []
    for r in rows:
        p = by_key.get(key(r))
        if p is None:
            out.append(r)
            continue
        new = {str(c["case_id"]): c for c in p.get("per_case") or []}
        cases = [new.get(str(c["case_id"]), c) for c in r.get("per_case") or []]
        replaced = sum(str(c["case_id"]) in new for c in cases)
        out.append({**r, "method": f"{r['method']} patched by {p['method']} ({replaced} cases)",
                    "per_case": cases})
    return out


def interval_rows(rows: list[dict], metrics, base: list[dict] | None = None) -> list[dict]:
    """Per row and metric: the mean with its interval, and with ``base`` the paired difference
    to the base row of the same ``key`` (None where there is none or no shared case)."""
    by_key = {key(b): b for b in base or []}
    out = []
    for r in rows:
        for m in metrics:
            vals = case_values(r, m)
            if not vals:
                continue
            acc = sum(a * n for a, n in vals.values()) / sum(n for _, n in vals.values())
            item = {"row": f"{r['model']} {r['pair']} {r['protocol']} {r['method']} {r['lang']}",
                    "metric": m, "cases": len(vals), "mean": acc,
                    "ci95": values_ci(vals)}
            b = by_key.get(key(r))
            if b is not None:
                old = case_values(b, m)
                shared = [c for c in vals if c in old and old[c][1] == vals[c][1]]
                if shared:
                    diffs = [vals[c][0] - old[c][0] for c in shared]
                    weights = [vals[c][1] for c in shared]
                    item["diff"] = sum(d * w for d, w in zip(diffs, weights)) / sum(weights)
                    item["diff_ci95"] = bootstrap_ci(diffs, weights)
                    item["shared_cases"] = len(shared)
            out.append(item)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="benchmarks/edit.py JSON files (FILE or FILE:METHOD)")
    ap.add_argument("--base", default=None,
                    help="FILE or FILE:METHOD: also the paired difference to its matching rows")
    ap.add_argument("--patch", default=None,
                    help="FILE or FILE:METHOD: its single rows' cases replace those of the rows "
                         "read")
    ap.add_argument("--metrics", default=",".join(METRICS),
                    help=f"any of {', '.join(METRICS + EXTRA)} (the last two: per-case means)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()
    metrics = [m for m in args.metrics.split(",") if m]
    bad = [m for m in metrics if m not in METRICS + EXTRA]
    if bad:
        ap.error(f"unknown metric(s) {', '.join(bad)}: {', '.join(METRICS + EXTRA)}")
    base = load_rows(args.base) if args.base else None
    rows = [r for f in args.files for r in load_rows(f)]
    if args.patch:
        rows = patched(rows, load_rows(args.patch))
    items = interval_rows(rows, metrics, base)
    if args.json:
        print(json.dumps(items, indent=2))
        return
    print("| row | metric | cases | mean (95% CI) | paired diff to base (95% CI) |")
    print("|---|---|---:|---|---|")
    for it in items:
        lo, hi = it["ci95"]
        diff = ""
        if it.get("diff_ci95"):
            dlo, dhi = it["diff_ci95"]
            diff = f"{it['diff']:+.3f} ({dlo:+.3f} to {dhi:+.3f}), {it['shared_cases']} cases"
        print(f"| {it['row']} | {it['metric']} | {it['cases']} | {it['mean']:.3f} "
              f"({lo:.3f}-{hi:.3f}) | {diff} |")


if __name__ == "__main__":
    main()

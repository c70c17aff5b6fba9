"""Wall seconds of whole ``editcomp edit`` calls of one fact, with and without the question cache.

A fact edited alone samples a few hundred questions from the model (its answer-preservation
term); ``editcomp edit`` keeps them per checkpoint (``edit/question_cache.py``). This runs the
same one-fact call as a user would, as separate processes in the order: ``--no-question-cache``
(samples, keeps nothing), then twice with the cache (the first samples and keeps them, the
second reads them), all under a fresh ``$EDITCOMP_HOME`` that links the cached models, and checks
that all three write the same weights.

    python benchmarks/edit_call.py --model gemma3-270m --out benchmarks/results/edit_call_gemma3-270m.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from editcomp.checkpoint import weights_sha256
from editcomp.models import home

REPO = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--facts", default=str(REPO / "examples" / "facts.jsonl"))
    ap.add_argument("--langs", default="en,de")
    ap.add_argument("--offset", type=int, default=0, help="Which fact of the file is edited.")
    ap.add_argument("--out", default=None, help="Results JSON (default: print only).")
    args = ap.parse_args()

    runs = [("no cache", ["--no-question-cache"]), ("cache, first call", []),
            ("cache, next call", [])]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pools = tmp / "home" / "questions"
        (tmp / "home").mkdir()
        (tmp / "home" / "models").symlink_to(home() / "models")
        env = dict(os.environ, EDITCOMP_HOME=str(tmp / "home"))
        for k, (name, flags) in enumerate(runs):
            out = tmp / f"edited{k}"
            cmd = [sys.executable, "-m", "editcomp.cli", "edit", args.facts, "--model", args.model,
                   "--langs", args.langs, "--limit", "1", "--offset", str(args.offset),
                   "--out", str(out), "--json", *flags]
            t0 = time.time()
            res = subprocess.run(cmd, env=env, capture_output=True, text=True)
            wall = time.time() - t0
            if res.returncode != 0:
                sys.exit(f"{name}: editcomp edit failed:\n{res.stderr[-2000:]}")
            result = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append({"run": name, "wall_seconds": round(wall, 1),
                         "edit_seconds": result["seconds"], "weights": weights_sha256(out),
                         "locality": result["edit"]["mean"]["locality"]["acc"],
                         "cached_pools": len(list(pools.glob("*.json")))})
            print(f"{name}: {wall:.1f} s", file=sys.stderr, flush=True)
    same = len({r["weights"] for r in rows}) == 1
    print("| run | wall s | lafn_edit s | pools kept |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['wall_seconds']} | {r['edit_seconds']} | {r['cached_pools']} |")
    print(f"same weights written by all three: {same}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows,
                                              "same_weights": same}, indent=2) + "\n")
    if not same:
        sys.exit("the cached pool gave another edit")


if __name__ == "__main__":
    main()

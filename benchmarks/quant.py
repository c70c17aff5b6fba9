"""Quantization benchmark: FP32 vs RTN / GPTQ / QuaRot / OSTQuant at w4a16, w4a8kv8, w4a4kv4.

WikiText-2 test perplexity on the same windows for every row (the first ``--windows`` windows
of ``--seq-len`` tokens); calibration on valid.txt only. Each row runs in its own process so
its calibration time and peak memory (resident set on CPU, allocated memory on CUDA) are its
own. Results are appended to the JSON after every row, so an interrupted run keeps what it got.

    python benchmarks/quant.py                                    # all 13 rows, 20 x 2048
    python benchmarks/quant.py --rows fp32,quarot:w4a4kv4,ostquant:w4a4kv4 --windows 4
    python benchmarks/quant.py --model gemma3-270m --rows gemma3 --windows 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext-2"
METHODS = ("rtn", "gptq", "quarot", "ostquant")
#: ablation rows: a method with different settings (row name -> method, OSTQuantConfig fields).
#: ostquant-qw trains the transforms against RTN fake-quantized weights too (W4A4 instead of
#: the paper's W16A4): SmolLM2's error after rotation is mostly in the weights (METHODS.md)
VARIANTS = {"ostquant-qw": ("ostquant", {"quantized_weights": True})}
BITS = ("w4a16", "w4a8kv8", "w4a4kv4")
ALL_ROWS = ["fp32"] + [f"{m}:{b}" for b in BITS for m in METHODS]
GEMMA_ROWS = ["fp32"] + [f"{m}:{b}" for b in ("w4a16", "w4a4kv4") for m in METHODS]


def run_row(args, row: str) -> dict:
    """Quantize (unless fp32) and evaluate one row in this process."""
    import torch

    from editcomp import checkpoint
    from editcomp.data import calibration_windows, token_windows
    from editcomp.device import peak_memory_mb
    from editcomp.errors import ConfigError
    from editcomp.eval import perplexity
    from editcomp.quant.ostquant import OSTQuantConfig
    from editcomp.quant.pipeline import QuantizeConfig, quantize

    torch.manual_seed(0)
    ck = checkpoint.load(args.model, device=args.device, dtype="fp32")
    windows = token_windows(ck.tokenizer, args.text, args.seq_len, args.windows)
    out = {"row": row, "model": args.model, "windows": int(windows.shape[0]),
           "seq_len": args.seq_len}
    if row != "fp32":
        method, bits = row.split(":")
        method, variant = VARIANTS.get(method, (method, {}))
        ost = {k: v for k, v in dict(steps=args.steps, lr_rot=args.lr_rot,
                                     lr_scale=args.lr_scale,
                                     train_seq_len=args.train_seq_len,
                                     lr_clip=args.lr_clip).items() if v is not None}
        ost.update(variant)
        config = QuantizeConfig(bits=bits, method=method, nsamples=args.nsamples,
                                seq_len=args.calib_seq_len, act_clip=args.act_clip,
                                kv_clip=args.kv_clip, ostquant=OSTQuantConfig(**ost))
        calib = (calibration_windows(ck.tokenizer, args.calib, args.nsamples,
                                     args.calib_seq_len, seed=0)
                 if config.needs_calibration else None)
        t0 = time.time()
        try:
            report = quantize(ck.model, config, calib, progress=not args.quiet)
        except ConfigError as e:  # a setting the family does not support: record why
            return {**out, "refused": str(e)}
        out["calib_seconds"] = round(time.time() - t0, 1)
        out["act_clip"], out["kv_clip"] = config.clips()
        for k in ("loss_first", "loss_last", "train_matmuls", "residual_rotation", "note",
                  "act_clip_by_site"):
            if k in report:
                out[k] = report[k]
        if "qsur_after" in report:
            out["qsur_before"] = report["qsur_before"]["mean"]
            out["qsur_after"] = report["qsur_after"]["mean"]
    out["ppl"] = perplexity(ck.model, windows, progress=not args.quiet)["ppl"]
    out["peak_memory_mb"] = round(peak_memory_mb(next(ck.model.parameters()).device))
    return out


def table(rows: list[dict]) -> str:
    fp = next((r["ppl"] for r in rows if r["row"] == "fp32"), None)
    lines = ["| row | ppl | ratio to FP | calib time (s) | peak memory (MB) |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['row']} | refused: {r['refused'].split(':')[0]} | - | - | - |")
            continue
        ratio = f"{r['ppl'] / fp:.3f}" if fp else "-"
        lines.append(f"| {r['row']} | {r['ppl']:.3f} | {ratio} | {r.get('calib_seconds', '-')} "
                     f"| {r['peak_memory_mb']} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default="all",
                    help="comma list of fp32 / METHOD:BITS, 'all' (13 rows) or 'gemma3' (the "
                         "w4a16 and w4a4kv4 rows)")
    ap.add_argument("--windows", type=int, default=20, help="WikiText-2 test windows")
    ap.add_argument("--seq-len", type=int, default=2048, help="tokens per evaluation window")
    ap.add_argument("--nsamples", type=int, default=16, help="calibration windows")
    ap.add_argument("--calib-seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=None, help="ostquant steps (default: config)")
    ap.add_argument("--lr-rot", type=float, default=None)
    ap.add_argument("--lr-scale", type=float, default=None)
    ap.add_argument("--train-seq-len", type=int, default=None)
    ap.add_argument("--lr-clip", type=float, default=None,
                    help="ostquant: learning rate of the learned activation clips")
    ap.add_argument("--act-clip", type=float, default=None,
                    help="for every row (default: each method's own)")
    ap.add_argument("--kv-clip", type=float, default=None)
    ap.add_argument("--text", default=str(DATA / "test.txt"))
    ap.add_argument("--calib", default=str(DATA / "valid.txt"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quant.json"))
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--single", default=None, help=argparse.SUPPRESS)  # child process: one row
    args = ap.parse_args(argv)

    if args.single:
        print(json.dumps(run_row(args, args.single)))
        return
    rows = {"all": ALL_ROWS, "gemma3": GEMMA_ROWS}.get(args.rows, args.rows.split(","))
    for r in rows:
        if r != "fp32" and (r.count(":") != 1 or r.split(":")[0] not in (*METHODS, *VARIANTS)):
            ap.error(f"bad row {r!r}: use fp32 or METHOD:BITS with METHOD in "
                     f"{METHODS + tuple(VARIANTS)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results, t_start = [], time.time()
    child_args = [a for a in (argv if argv is not None else sys.argv[1:])]
    for r in rows:
        t0 = time.time()
        proc = subprocess.run([sys.executable, __file__, *child_args, "--single", r],
                              stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            print(f"row {r} failed (exit {proc.returncode})", file=sys.stderr)
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["wall_seconds"] = round(time.time() - t0, 1)
        results.append(res)
        out.write_text(json.dumps({"model": args.model, "args": vars(args), "rows": results},
                                  indent=1))
        print(table(results).splitlines()[-1] if len(results) > 1 else table(results),
              flush=True)
    print(f"\n{args.model}, WikiText-2 test, {args.windows} x {args.seq_len} tokens "
          f"({time.time() - t_start:.0f} s)\n")
    print(table(results))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

"""NUPES against uniform and NF4 weight quantization on the real default model.

Rows (weight-only, lm_head and embeddings in full precision): RTN (MSE clip), GPTQ (the
repository's default: MSE clip, no act-order), GPTQ with act-order (the stronger variant, for
an honest comparison: NUPES data-driven uses act-order in its error feedback), NF4/FP4
(bitsandbytes, 4-bit, block = group size), NUPES data-free, NUPES data-driven, and a transform
(OSTQuant when ``editcomp.quant.ostquant`` exists, else QuaRot) with uniform GPTQ weights and
with NUPES weights. Every row is evaluated on the same WikiText-2 *test* windows; calibration
windows come from *valid* only. Ablations of the data-free grid: ``nupes-df-sym`` (symmetric
scales: 2^b - 1 levels inside the range), ``nupes-dd-sym`` (the same for data-driven),
``uniform-signed`` (signed scales, exponent 1) and ``nupes-df-power`` (the paper's rounding in the
power space instead of the nearest level), ``nupes-df-mse`` (the error-minimizing scales, without
the data-free default's unbiased refit) and, to show what that refit alone is worth,
``nf4-unbiased`` (bitsandbytes' NF4 codes with each block's absmax refit the same way; not a
bitsandbytes format option). The two transform rows share one trained transform
per weight setting. Prints a markdown table, writes JSON after every
row (so an interrupted run keeps what it measured) and a histogram of the NUPES exponents.

Example (quick look): ``python benchmarks/nupes.py --windows 2 --rows w3:rtn,gptq,nupes-dd``
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from editcomp import checkpoint  # noqa: E402
from editcomp.data import calibration_windows, token_windows  # noqa: E402
from editcomp.eval import perplexity  # noqa: E402
from editcomp.quant.nupes import NUPESConfig  # noqa: E402
from editcomp.quant.nupes_model import exponent_histogram  # noqa: E402
from editcomp.quant.ops import unbiased_scales  # noqa: E402
from editcomp.quant.pipeline import QuantizeConfig, quantize, transform  # noqa: E402
from editcomp.quant.runtime import quant_linears  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
METHODS = ("rtn", "gptq", "gptq-ao", "nf4", "fp4", "nupes-df", "nupes-dd", "xform", "xform-nupes",
           "nupes-df-sym", "nupes-dd-sym", "uniform-signed", "nupes-df-power", "nupes-df-mse",
           "nf4-unbiased")


def has_ostquant() -> bool:
    try:
        import editcomp.quant.ostquant  # noqa: F401
        return "ostquant" in __import__("editcomp.quant.pipeline", fromlist=["METHODS"]).METHODS
    except ImportError:
        return False


def weight_bytes(model) -> int:
    """Bytes of the quantized decoder linears as stored (codes, scales, zeros, exponents)."""
    total = 0
    for q in quant_linears(model).values():
        for name, b in q.named_buffers():
            if b is not None and name != "bias":
                total += b.numel() * b.element_size()
    return total


def float_bytes(model, dtype_bytes: int = 2) -> int:
    """Bytes of the same decoder linears in 16-bit floats (the FP reference)."""
    from editcomp.arch import get_adapter

    return sum(m.weight.numel() * dtype_bytes for p in get_adapter(model).layers()
               for m in p.linears().values())


def config_for(method: str, bits: int, group: int | None, args, transform: str):
    b = f"w{bits}a16"
    extra = {} if args.group_clip is None else {
        "group_clip_grid": tuple(float(c) for c in args.group_clip.split(","))}
    if args.clip is not None:
        extra["clip_grid"] = tuple(float(c) for c in args.clip.split(","))
    dd = NUPESConfig(steps=args.nupes_steps, min_calib_tokens=1, **extra)
    df = NUPESConfig(data_free=True, **extra)
    if method == "rtn":
        return QuantizeConfig(bits=b, method="rtn", group_size=group)
    if method in ("gptq", "gptq-ao"):  # gptq-ao: act-order is switched on in main()
        return QuantizeConfig(bits=b, method="gptq", group_size=group)
    if method in ("nf4", "fp4", "nf4-unbiased"):  # nf4-unbiased: refit in main()
        return QuantizeConfig(bits=b, method=method.split("-")[0], group_size=group or 64)
    if method == "nupes-df":
        return QuantizeConfig(bits=b, method="nupes", group_size=group, nupes=df)
    if method == "nupes-df-sym":  # ablation: symmetric scales (2^b - 1 levels in the range),
        # with the group clips that reach code qmin (the best symmetric setting we measured)
        sym = {"group_clip_grid": (1.0, 0.95, 0.9, 0.85, 0.8, 0.75), **extra}
        return QuantizeConfig(bits=b, method="nupes", group_size=group,
                              nupes=NUPESConfig(data_free=True, signed_scale=False, **sym))
    if method == "uniform-signed":  # ablation: signed scales, exponent fixed at 1 (uniform)
        return QuantizeConfig(bits=b, method="nupes", group_size=group,
                              nupes=NUPESConfig(data_free=True, min_exponent=1.0, **extra))
    if method == "nupes-df-mse":  # ablation: the error-minimizing scales, no unbiased refit
        return QuantizeConfig(bits=b, method="nupes", group_size=group,
                              nupes=NUPESConfig(data_free=True, unbiased_scale="never", **extra))
    if method == "nupes-df-power":  # ablation: the paper's rounding in the power space
        return QuantizeConfig(bits=b, method="nupes", group_size=group,
                              nupes=NUPESConfig(data_free=True, rounding="power", **extra))
    if method == "nupes-dd":
        return QuantizeConfig(bits=b, method="nupes", group_size=group, nupes=dd)
    if method == "nupes-dd-sym":  # ablation: data-driven with symmetric scales
        return QuantizeConfig(bits=b, method="nupes", group_size=group,
                              nupes=NUPESConfig(steps=args.nupes_steps, min_calib_tokens=1,
                                                signed_scale=False, **extra))
    if method == "xform":
        return QuantizeConfig(bits=b, method=transform, group_size=group, qsur=False)
    if method == "xform-nupes":
        return QuantizeConfig(bits=b, method=transform, group_size=group, qsur=False,
                              weights="nupes", nupes=dd)
    raise ValueError(method)


def parse_rows(text: str, groups: list[int | None]):
    """``w3:rtn,gptq;w4g64:nf4;w2c:rtn`` -> [(bits, group, method)] in that order.

    ``wN`` runs every ``--groups`` setting, ``wNgG`` only group G, ``wNc`` only per channel;
    nf4/fp4 rows need 4 bits and a group (they are skipped per channel).
    """
    rows = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        head, methods = part.split(":")
        m = re.fullmatch(r"w(\d)(c|g\d+)?", head.strip())
        if m is None:
            raise SystemExit(f"bad row setting {head!r}: expected wN, wNc or wNgG")
        bits = int(m.group(1))
        gs = groups if m.group(2) is None else [None if m.group(2) == "c" else int(m.group(2)[1:])]
        for g in gs:
            for meth in methods.split(","):
                meth = meth.strip()
                if meth not in METHODS:
                    raise SystemExit(f"unknown row method {meth!r}; valid: {', '.join(METHODS)}")
                if meth in ("nf4", "fp4", "nf4-unbiased") and (bits != 4 or g is None):
                    continue
                rows.append((bits, g, meth))
    return rows


#: the rows the targets need come first (a partial run still answers them)
DEFAULT_ROWS = ("w3c:rtn,gptq,nupes-df,nupes-dd,gptq-ao;w4g64:rtn,nf4,nupes-df;"
                "w3c:xform,xform-nupes;w4c:rtn,gptq,nupes-df,nupes-dd;w4g64:gptq,fp4,nupes-dd;"
                "w3g64:rtn,gptq,nupes-df,nupes-dd;w2:rtn,gptq,nupes-df,nupes-dd")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=20, help="test windows of --seq-len per row")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--rows", default=DEFAULT_ROWS,
                    help="bits:method,... separated by ';' (methods: " + ", ".join(METHODS) + ")")
    ap.add_argument("--groups", default="channel,64",
                    help="weight granularities, comma separated: channel and/or group sizes "
                         "(smollm2's width 576 is not a multiple of 128: 64 is the closest)")
    ap.add_argument("--nupes-steps", type=int, default=0,
                    help="Adam steps of the learned refinement per linear (0: error feedback only)")
    ap.add_argument("--clip", default=None,
                    help="NUPES clip ratios tried per channel, comma separated (default: "
                         "NUPESConfig.clip_grid)")
    ap.add_argument("--group-clip", default=None,
                    help="NUPES clip ratios tried per group, comma separated (default: "
                         "NUPESConfig.group_clip_grid)")
    ap.add_argument("--transform", choices=("auto", "ostquant", "quarot"), default="auto",
                    help="transform of the xform rows (auto: ostquant when it exists)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "nupes.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    groups = [None if g == "channel" else int(g) for g in args.groups.split(",")]
    rows = parse_rows(args.rows, groups)
    transform = args.transform if args.transform != "auto" else (
        "ostquant" if has_ostquant() else "quarot")

    base = checkpoint.load(args.model, device="cpu", dtype="fp32")
    tok = base.tokenizer
    windows = token_windows(tok, DATA / "test.txt", args.seq_len, args.windows)
    calib = calibration_windows(tok, DATA / "valid.txt", args.calib_windows, args.calib_seq_len,
                                seed=0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "windows": int(windows.shape[0]), "seq_len": args.seq_len,
              "calib": f"{args.calib_windows} x {args.calib_seq_len} tokens of valid.txt",
              "transform": transform, "nupes_steps": args.nupes_steps, "rows": []}
    t0 = time.time()
    fp = perplexity(base.model, windows, progress=False)["ppl"]
    fbytes = float_bytes(base.model)
    result["rows"].append({"setting": "fp", "method": "fp", "ppl": fp, "ratio": 1.0,
                           "seconds": 0.0, "bytes": fbytes, "eval_seconds": time.time() - t0})
    print(f"fp ppl {fp:.3f}", flush=True)
    out.write_text(json.dumps(result, indent=1))

    transformed = {}  # (bits, group) -> the fp model with its transform fused, seconds
    for bits, group, method in rows:
        setting = f"w{bits}a16" + ("" if group is None else f"g{group}")
        model = copy.deepcopy(base.model)
        cfg = config_for(method, bits, group, args, transform)
        row = {"setting": setting, "method": method}
        try:
            t = time.time()
            if method == "gptq-ao":
                rep = _gptq_act_order(model, cfg, calib)
            elif method in ("xform", "xform-nupes"):
                model, rep = _on_shared_transform(base.model, cfg, calib, transformed)
                row["transform_seconds"] = rep["transform_seconds"]
            else:
                rep = quantize(model, cfg, calib if cfg.needs_calibration else None,
                               progress=False)
            if method == "nf4-unbiased":
                _unbias_blocks(model, base.model)
            row["seconds"] = time.time() - t + row.get("transform_seconds", 0.0)
            t = time.time()
            row["ppl"] = perplexity(model, windows, progress=False)["ppl"]
            row["eval_seconds"] = time.time() - t
            row["ratio"] = row["ppl"] / fp
            row["bytes"] = weight_bytes(model)
            if "nupes" in rep:
                row["exponent_histogram"] = exponent_histogram(rep["nupes"]["exponents"])
                row["exponent_mean_per_layer"] = _mean_per_layer(rep["nupes"]["exponents"])
        except Exception as e:  # one failing row must not lose the others
            row["error"] = f"{type(e).__name__}: {e}"
        result["rows"].append(row)
        out.write_text(json.dumps(result, indent=1))
        print(_fmt(row), flush=True)
        del model

    result["total_seconds"] = time.time() - t0
    out.write_text(json.dumps(result, indent=1))
    print()
    print(table(result))
    print()
    print(histograms(result))
    print(f"\nwrote {out}")


def _on_shared_transform(base_model, cfg: QuantizeConfig, calib, cache: dict):
    """An ``xform`` / ``xform-nupes`` row: the transform is trained once per weight setting and
    shared, so the two rows differ only in their weight quantizer (uniform GPTQ vs NUPES).
    ``seconds`` counts the transform in full for both rows. Weight-only settings only."""
    key = (cfg.bits, cfg.group_size)
    if key not in cache:
        fp_t = copy.deepcopy(base_model)
        t = time.time()
        transform(fp_t, cfg, calib, progress=False)
        cache[key] = (fp_t, time.time() - t)
    fp_t, t_sec = cache[key]
    model = copy.deepcopy(fp_t)
    stage = dataclasses.replace(cfg, method=cfg.weight_stage, weights=None)
    if stage.bits_spec().act is not None:
        raise ValueError("shared transforms are for weight-only rows")
    rep = quantize(model, stage, calib, progress=False)
    rep["transform_seconds"] = t_sec
    return model, rep


def _unbias_blocks(model, base_model) -> None:
    """The ``nf4-unbiased`` row: keep bitsandbytes' codes, refit every block's absmax with
    ``ops.unbiased_scales`` against the float weights of ``base_model`` (same module names)."""
    float_linears = dict(base_model.named_modules())
    for name, q in quant_linears(model).items():
        W = float_linears[name].weight.detach().float()
        codes, absmax = q.codes(), q.scales.clone()
        q.set_codes(codes, torch.ones_like(absmax), None)
        unit = q.dequantize_weight()
        q.set_codes(codes, unbiased_scales(W, unit, absmax, q.w_spec), None)


def _gptq_act_order(model, cfg, calib):
    """GPTQ with act-order (static groups): the stronger uniform baseline."""
    from editcomp.quant.runtime import quantize_model
    from editcomp.quant.weights import gptq_weights

    bits = cfg.bits_spec()
    codes = gptq_weights(model, bits.weight, calib, damp=cfg.damp, mse_clip=cfg.mse_clip,
                         act_order=True, progress=False)
    quantize_model(model, bits, weights=codes)
    return {}


def _mean_per_layer(exps: dict) -> dict:
    per: dict[str, list[float]] = {}
    for name, vs in exps.items():
        layer = ".".join(p for p in name.split(".") if p.isdigit())
        per.setdefault(layer, []).extend(vs)
    return {k: sum(v) / len(v) for k, v in per.items()}


def _fmt(row):
    if "error" in row:
        return f"{row['setting']:<10} {row['method']:<12} ERROR {row['error']}"
    return (f"{row['setting']:<10} {row['method']:<12} ppl {row['ppl']:9.3f}  x{row['ratio']:.3f}"
            f"  {row['seconds']:7.1f} s  {row['bytes'] / 2**20:6.2f} MiB")


def table(result) -> str:
    lines = [f"smollm2 ({result['model']}), WikiText-2 test, {result['windows']} x "
             f"{result['seq_len']} tokens; calibration {result['calib']}; transform = "
             f"{result['transform']}",
             "",
             "| setting | method | ppl | ratio to FP | quant. time (s) | weight bytes (MiB) |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['setting']} | {r['method']} | error: {r['error']} | | | |")
            continue
        lines.append(f"| {r['setting']} | {r['method']} | {r['ppl']:.3f} | {r['ratio']:.3f} | "
                     f"{r['seconds']:.0f} | {r['bytes'] / 2**20:.2f} |")
    return "\n".join(lines)


def histograms(result) -> str:
    lines = []
    for r in result["rows"]:
        if "exponent_histogram" not in r:
            continue
        cells = ", ".join(f"[{lo:.1f},{hi:.1f}) {n}" for lo, hi, n in r["exponent_histogram"] if n)
        lines.append(f"exponents {r['setting']} {r['method']}: {cells}")
        per = r.get("exponent_mean_per_layer", {})
        if per:
            lines.append("  mean a per layer: " + " ".join(f"{k}:{v:.2f}" for k, v in per.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()

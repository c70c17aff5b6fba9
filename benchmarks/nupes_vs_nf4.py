"""Why does data-free NUPES lose to NF4 at 4 bits / group 64 when its weight error is lower?

A diagnostic, not a leaderboard (``nupes.py`` is that). For every decoder linear of the model it
quantizes the weight three ways -- NUPES data-free (the default search), RTN (the same search
with the exponent fixed at 1) and bitsandbytes NF4 (block = group) -- and reports:

1. the relative weight error ``||W_hat - W||^2 / ||W||^2`` of each, summed over the model;
2. WikiText-2 test perplexity with each everywhere;
3. perplexity with NF4 everywhere except one role (q, k, v, o, gate, up, down) or one range of
   layers in NUPES: where NUPES's extra perplexity comes from;
4. perplexity with one fixed exponent for every channel (clip 1): does the error-minimizing
   exponent track perplexity at all?

    python benchmarks/nupes_vs_nf4.py --windows 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from editcomp import checkpoint  # noqa: E402
from editcomp.arch import get_adapter  # noqa: E402
from editcomp.data import token_windows  # noqa: E402
from editcomp.eval import perplexity  # noqa: E402
from editcomp.quant.nf4 import NF4Config, quantize_4bit_weight  # noqa: E402
from editcomp.quant.nupes import (NUPESConfig, nupes_dequantize, range_ref,  # noqa: E402
                                  nupes_quantize, search_exponent)

DATA = ROOT.parent / "shared" / "data" / "wikitext-2"


def nupes_weight(W: torch.Tensor, config: NUPESConfig, exponent: float | None = None):
    """Data-free NUPES of ``W`` (``exponent``: that exponent for every channel, scale = range / R, clip 1)."""
    if exponent is None:
        a, s, _ = search_exponent(W, config)
    else:
        a = torch.full((W.shape[0], 1), exponent)
        s = range_ref(W, config.spec, config.signed_scale) / config.range_code
    rc = config.range_code
    return nupes_dequantize(nupes_quantize(W, s, a, config.spec, rc), s, a, config.spec, rc)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--exponents", default="0.6,0.7,0.85,1.0")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "nupes_vs_nf4.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    ck = checkpoint.load(args.model, device="cpu", dtype="fp32")
    model = ck.model
    windows = token_windows(ck.tokenizer, DATA / "test.txt", args.seq_len, args.windows)
    cfg = NUPESConfig(bits=4, group_size=args.group_size, data_free=True)
    rtn_cfg = NUPESConfig(bits=4, group_size=args.group_size, data_free=True, min_exponent=1.0,
                          golden_iters=0)
    layers = get_adapter(model).layers()
    slots = [(lp.index, role, lin) for lp in layers for role, lin in lp.linears().items()]
    orig = {(i, r): lin.weight.detach().float().clone() for i, r, lin in slots}
    quant = {"nupes": {}, "rtn": {}, "nf4": {}}
    err = {k: [0.0, 0.0] for k in quant}
    for i, r, _ in slots:
        W = orig[(i, r)]
        quant["nupes"][(i, r)] = nupes_weight(W, cfg)
        quant["rtn"][(i, r)] = nupes_weight(W, rtn_cfg)
        quant["nf4"][(i, r)] = quantize_4bit_weight(W, NF4Config(blocksize=args.group_size))[0]
        for k in quant:
            err[k][0] += float((quant[k][(i, r)] - W).pow(2).sum())
            err[k][1] += float(W.pow(2).sum())

    def ppl_with(pick) -> float:
        with torch.no_grad():
            for i, r, lin in slots:
                lin.weight.copy_(pick(i, r))
        return perplexity(model, windows, progress=False)["ppl"]

    result = {"args": vars(args), "fp": ppl_with(lambda i, r: orig[(i, r)]),
              "weight_rel_error": {k: e[0] / e[1] for k, e in err.items()}}
    result["ppl"] = {k: ppl_with(lambda i, r, k=k: quant[k][(i, r)]) for k in quant}
    swaps = {}
    n = len(layers)
    ranges = [(0, 2), (3, n - 1)]
    for role in dict.fromkeys(r for _, r, _ in slots):
        swaps[role] = ppl_with(lambda i, r, role=role: quant["nupes" if r == role else "nf4"][(i, r)])
    for lo, hi in ranges:
        swaps[f"layers {lo}-{hi}"] = ppl_with(
            lambda i, r, lo=lo, hi=hi: quant["nupes" if lo <= i <= hi else "nf4"][(i, r)])
    result["nf4_with_nupes_in"] = swaps
    fixed = {}
    for a in (float(x) for x in args.exponents.split(",")):
        fixed[str(a)] = ppl_with(lambda i, r, a=a: nupes_weight(orig[(i, r)], cfg, exponent=a))
    result["fixed_exponent_ppl"] = fixed
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

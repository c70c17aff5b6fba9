"""``editcomp run``: a YAML recipe of edit / quantize / distill steps."""

from __future__ import annotations

import click

from editcomp.cli.base import cli, emit, json_option


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

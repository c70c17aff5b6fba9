"""The ``editcomp`` group and what its commands share: the error handling, the common
options and the output helpers."""

from __future__ import annotations

import json

import click

from editcomp import __version__
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

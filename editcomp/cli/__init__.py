"""The ``editcomp`` command line: thin commands that parse, load, call one function, save, report.

Errors in the user's input (``EditcompError``) are printed as one message without a
traceback and exit with status 1. ``--json`` prints one JSON object as the last line of stdout;
progress bars and notices go to stderr so they never mix with it.

One module per command (``base`` holds the group and the shared options); importing this
package registers them all.
"""

from editcomp.cli import distill, edit, evaluate, export, models, quantize, run  # noqa: F401
from editcomp.cli.base import cli

__all__ = ["cli", "main"]


def main():
    cli(prog_name="editcomp")

"""One edit as the CLI runs it: measure, edit, measure again, and the lineage entry for the checkpoint."""

from __future__ import annotations

from editcomp.data import Fact
from editcomp.edit.ftl import FTLConfig, ftl_edit
from editcomp.edit.lafn import LAFNConfig, lafn_edit, preservation_moments
from editcomp.edit.prompts import training_items
from editcomp.eval.edit_metrics import edit_metrics, locality_reference

METHODS = ("lafn", "ft-l")


def check_edit_inputs(facts: list[Fact], tokenizer, langs=None) -> None:
    """Every training pair tokenizes (a ``DataError`` naming file, line and field otherwise)."""
    training_items(facts, tokenizer, langs, 0)


def edit_and_measure(model, tokenizer, facts: list[Fact], config: LAFNConfig | FTLConfig, langs=None,
                     progress: bool = True, preserve_text=None) -> dict:
    """Locality reference of the unedited model, the edit, then the edit metrics -> report with
    ``"metrics"`` (per language and mean: reliability, generality, locality, portability).
    ``preserve_text``: LAFN's generic text (``preservation_moments``), or None; the caller
    (``jobs.edit_job``) passes one only to LAFN with a preservation weight above 0."""
    preserve = (preservation_moments(model, tokenizer, preserve_text, config, progress)
                if preserve_text else None)  # first: a bad text fails before any other work
    reference = locality_reference(model, tokenizer, facts, langs, progress=progress)
    if isinstance(config, FTLConfig):
        report = ftl_edit(model, tokenizer, facts, config, langs, progress=progress)
    else:
        report = lafn_edit(model, tokenizer, facts, config, langs, progress=progress,
                           preserve=preserve)
    report["metrics"] = edit_metrics(model, tokenizer, facts, langs, progress=progress,
                                     reference=reference)
    return report

"""One edit as the CLI runs it: measure, edit, measure again, and the lineage entry for the checkpoint."""

from __future__ import annotations

from editcomp.data import Fact, load_text
from editcomp.edit.answers import answer_spans
from editcomp.edit.ftl import FTLConfig, ftl_edit
from editcomp.edit.lafn import LAFNConfig, lafn_edit, preservation_moments
from editcomp.edit.prompts import training_items
from editcomp.eval.edit_metrics import edit_metrics, locality_reference

METHODS = ("lafn", "ft-l")


def check_edit_inputs(facts: list[Fact], tokenizer, langs=None) -> None:
    """Every training pair tokenizes (a ``DataError`` naming file, line and field otherwise)."""
    training_items(facts, tokenizer, langs, 0)


def edit_and_measure(model, tokenizer, facts: list[Fact], config: LAFNConfig | FTLConfig, langs=None,
                     progress: bool = True, preserve_text=None, questions=None) -> dict:
    """Locality reference of the unedited model, the edit, then the edit metrics -> report with
    ``"metrics"`` (per language and mean: reliability, generality, locality, portability).
    ``preserve_text``: LAFN's generic text, or None; the caller (``jobs.edit_job``) passes one
    only where ``LAFNConfig.uses_generic_text``: its activation moments for the preservation term
    (``preservation_moments``), its names and dates for the foreign answers (answers.py).
    ``questions``: LAFN's unrelated questions for this model, if the caller has them (sampled:
    ``question_cache``; or given: ``unrelated.given_questions``); None: sampled by the edit
    where it needs them."""
    lafn = isinstance(config, LAFNConfig) and preserve_text
    # first: a bad text fails before any other work
    preserve = (preservation_moments(model, tokenizer, preserve_text, config, progress)
                if lafn and config.preserve_weight > 0 else None)
    spans = (answer_spans(load_text(preserve_text))
             if lafn and config.foreign_answers_for(len(facts), questions is not None
                                                    and questions.given) > 0 else None)
    reference = locality_reference(model, tokenizer, facts, langs, progress=progress)
    if isinstance(config, FTLConfig):
        report = ftl_edit(model, tokenizer, facts, config, langs, progress=progress)
    else:
        report = lafn_edit(model, tokenizer, facts, config, langs, progress=progress,
                           preserve=preserve, answer_spans=spans, questions=questions)
    report["metrics"] = edit_metrics(model, tokenizer, facts, langs, progress=progress,
                                     reference=reference)
    return report

"""Jobs: one operation from checkpoint to checkpoint -- validate, load, run, measure, save.

The CLI commands and the recipe steps both call these, so a recipe step does exactly what the
command of the same name does. Every job checks its inputs before loading a model, refuses an
existing output unless ``force``, writes the output atomically with a lineage entry (plus any
``lineage_extra`` the caller adds, e.g. a recipe's step hash) and returns a JSON-able result whose
``metrics`` are also in the lineage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from editcomp.defaults import DEFAULT_CALIB, DEFAULT_TEXT
from editcomp.edit import FTLConfig, LAFNConfig
from editcomp.errors import ConfigError, DataError, EditcompError


def _refuse_existing(out, force: bool) -> None:
    if Path(out).exists() and not force:
        raise EditcompError(f"{out} already exists; choose another --out or pass --force")


def _eval_windows(tokenizer, text, seq_len: int, windows: int):
    from editcomp.data import token_windows

    return token_windows(tokenizer, text, seq_len, windows) if text and windows else None


def _save(ck, out, entry, force: bool) -> Path:
    """Save in the model's own format: quantized models keep their codes and scales."""
    from editcomp import checkpoint
    from editcomp.quant.checkpoint_io import save_quantized
    from editcomp.quant.runtime import quant_linears

    if quant_linears(ck.model):
        return save_quantized(ck.model, ck.tokenizer, out, entry, parent=ck, force=force)
    return checkpoint.save(ck.model, ck.tokenizer, out, entry, parent=ck, force=force)


# -------------------------------------------------------------------------------------- quantize


def quantize_job(model, config, out, calib=DEFAULT_CALIB, eval_text=DEFAULT_TEXT,
                 eval_windows: int = 4, force: bool = False, device=None, dtype=None,
                 lineage_extra: dict | None = None) -> dict:
    """Quantize ``model`` (a path or name) as ``config`` (a ``QuantizeConfig``) says into ``out``.

    Perplexity before/after on ``eval_windows`` windows of ``config.seq_len`` tokens of
    ``eval_text`` (0 skips it), time, peak memory, QSUR and the method's own report go into the
    lineage and the result.
    """
    from editcomp import checkpoint
    from editcomp.data import calibration_windows
    from editcomp.device import peak_memory_mb
    from editcomp.eval import perplexity
    from editcomp.quant.pipeline import quantize

    config.bits_spec()  # a bad bits string fails here, before anything is loaded
    _refuse_existing(out, force)
    ck = checkpoint.load(model, device=device, dtype=dtype)
    calib_ids = (calibration_windows(ck.tokenizer, calib, config.nsamples, config.seq_len,
                                     seed=config.seed) if config.needs_calibration else None)
    windows = _eval_windows(ck.tokenizer, eval_text, config.seq_len, eval_windows)
    metrics = {}
    if windows is not None:
        metrics["ppl_before"] = perplexity(ck.model, windows)["ppl"]
    report = quantize(ck.model, config, calib_ids)
    if windows is not None:
        metrics["ppl_after"] = perplexity(ck.model, windows)["ppl"]
    metrics.update(seconds=round(report["seconds"], 1),
                   peak_memory_mb=round(peak_memory_mb(next(ck.model.parameters()).device)))
    if report.get("losses"):
        metrics.update(kl_top_first=report["loss_first"], kl_top_last=report["loss_last"])
    if "act_clip_by_site" in report:  # OSTQuant's learned clips (each module's is in its spec)
        metrics["act_clip_by_site"] = report["act_clip_by_site"]
    entry = checkpoint.lineage_entry("quantize", config=report["config"], metrics=metrics,
                                     parent=ck, calib=str(calib) if calib_ids is not None else None,
                                     **(lineage_extra or {}))
    path = _save(ck, out, entry, force)
    result = {"out": str(path), "bits": report["bits"], "method": config.method,
              "metrics": metrics, **metrics}
    if "note" in report:
        result["note"] = report["note"]
    if "nupes" in report:
        result["exponent_histogram"] = report["nupes"]["exponent_histogram"]
    if "qsur_after" in report:
        def points(row):
            return {k: v for k, v in row.items() if k != "layer"}
        result["qsur"] = [{"layer": b["layer"], "before": points(b), "after": points(a)}
                          for b, a in zip(report["qsur_before"]["layers"],
                                          report["qsur_after"]["layers"])]
        result["qsur_mean"] = {"before": report["qsur_before"]["mean"],
                               "after": report["qsur_after"]["mean"]}
    return result


# ------------------------------------------------------------------------------------------ edit


@dataclass
class EditConfig:
    """Which editor and its settings: ``method`` ``lafn`` (``lafn`` settings) or ``ft-l``
    (``ftl`` settings). What a recipe's ``edit`` step and ``editcomp edit`` build."""

    method: str = "lafn"
    lafn: LAFNConfig = field(default_factory=LAFNConfig)
    ftl: FTLConfig = field(default_factory=FTLConfig)

    def __post_init__(self):
        if self.method not in ("lafn", "ft-l"):
            raise ConfigError(f"unknown edit method {self.method!r}; valid: lafn, ft-l")

    def validate(self) -> None:
        self.method_config().validate()

    def method_config(self):
        return self.lafn if self.method == "lafn" else self.ftl


def edit_job(model, config: EditConfig, out, facts, langs=None, limit=None, offset: int = 0,
             report_file=None, force: bool = False, device=None, dtype=None,
             lineage_extra: dict | None = None, preserve_text=DEFAULT_CALIB,
             question_cache: bool = True, questions_file=None) -> dict:
    """Edit the facts of ``facts`` into ``model``; measure reliability / generality / locality /
    portability per language against the unedited model; save with the facts' sha256.
    ``preserve_text`` (lafn): generic text whose FFN activations the edit must keep changing
    little (``lafn.preservation_moments``) and whose names and dates facts edited together take
    as foreign answers (``answers.py``); WikiText-2 valid.txt by default. Read only where
    ``config.lafn.uses_generic_text``; None: neither. ``question_cache`` (lafn): the questions
    an edit samples from the checkpoint are kept under ``$EDITCOMP_HOME/questions`` and read
    there by the next edit of the same checkpoint (``question_cache.py``); False: sampled
    anew and not kept. ``questions_file`` (lafn): a questions JSONL (``data.load_questions``)
    whose questions in the edited languages replace the sampled ones
    (``unrelated.given_questions``)."""
    from editcomp import checkpoint
    from editcomp.data import facts_sha256, load_facts, load_questions, load_text
    from editcomp.edit.run import check_edit_inputs, edit_and_measure
    from editcomp.eval.edit_metrics import languages_of

    if isinstance(langs, str):
        langs = [s.strip() for s in langs.split(",") if s.strip()] or None
    fact_list = load_facts(facts, langs=langs, limit=limit, offset=offset)
    used_langs = languages_of(fact_list, langs)
    given = None
    if questions_file is not None:  # checked before the model loads
        if config.method != "lafn":
            raise ConfigError("questions apply to the lafn method only")
        given = load_questions(questions_file)
        _check_questions_cover(given, used_langs, questions_file)
    if config.method != "lafn" or not config.lafn.uses_generic_text(len(fact_list),
                                                                     given is not None):
        preserve_text = None
    if preserve_text:  # missing or empty: say so before loading the model
        try:
            load_text(preserve_text)
        except DataError as e:
            raise DataError(f"{e} (LAFN's generic text: give another (--preserve-text), or edit "
                            "without it: preserve weight 0 and, for facts edited together, "
                            "foreign answers 0)") from None
    _refuse_existing(out, force)
    config.validate()
    method_config = config.method_config()
    ck = checkpoint.load(model, device=device, dtype=dtype)
    check_edit_inputs(fact_list, ck.tokenizer, langs)  # every target tokenizes
    questions = None
    # a fact edited alone reads shorter continuations than facts edited together (lafn_config)
    alone = config.method == "lafn" and method_config.edits_alone(len(fact_list))
    if given is not None:
        from editcomp.edit.unrelated import given_questions
        questions = given_questions(ck.model, ck.tokenizer, given, used_langs, method_config,
                                    alone=alone)
    elif (question_cache and config.method == "lafn" and ck.path is not None
            and method_config.samples_questions(len(fact_list))):
        from editcomp.edit.question_cache import cached_questions
        questions = cached_questions(ck.model, ck.tokenizer, ck.weights_sha256,
                                     used_langs, method_config, alone=alone)
    report = edit_and_measure(ck.model, ck.tokenizer, fact_list, method_config, langs,
                              preserve_text=preserve_text, questions=questions)
    metrics = {"edit": report["metrics"], "losses": report["losses"],
               "seconds": round(report["seconds"], 1)}
    if config.method == "lafn":
        metrics["neurons"] = report["neurons"]
    entry = checkpoint.lineage_entry(
        "edit", config={"method": config.method, **report["config"]}, metrics=metrics, parent=ck,
        facts={"path": str(facts), "sha256": facts_sha256(facts), "count": len(fact_list),
               "offset": offset, "limit": limit, "langs": langs},
        paraphrase_source=report["paraphrase_source"],
        # the KL term's prompts: hand-written, then any the model sampled (a batch's questions)
        **({"unrelated_prompts": {"texts": report["kl_prompts"],
                                  "sampled_questions": report["sampled_questions"],
                                  "foreign_answers": report["foreign_answers"]}}
           if config.method == "lafn" else {}),
        **({"preserve_text": {"path": str(preserve_text), "sha256": facts_sha256(preserve_text)}}
           if preserve_text else {}),
        **({"questions": {"path": str(questions_file), "sha256": facts_sha256(questions_file)}}
           if given is not None else {}),
        **(lineage_extra or {}))
    path = _save(ck, out, entry, force)
    if report_file and config.method == "lafn":
        Path(report_file).write_text(json.dumps(report["locate"], indent=2, ensure_ascii=False)
                                     + "\n")
    return {"out": str(path), "method": config.method, "facts": len(fact_list),
            "metrics": metrics, **metrics}


def _check_questions_cover(questions: list, langs: list[str], path) -> None:
    """A questions file with none in the edited ``langs`` is a ``DataError`` naming the file and
    the languages it has (``given_questions`` keeps only those languages' questions)."""
    if not any(q.lang in langs for q in questions):
        have = ", ".join(dict.fromkeys(q.lang for q in questions))
        raise DataError(f"{path}: no questions in the edited languages ({', '.join(langs)}); "
                        f"it has {have}")


# --------------------------------------------------------------------------------------- distill


def distill_job(student, config, out, teacher, text=None, generate: int = 0, facts=None,
                eval_text=DEFAULT_TEXT, eval_windows: int = 4, eval_seq_len: int = 2048,
                force: bool = False, device=None, dtype=None,
                lineage_extra: dict | None = None) -> dict:
    """Distill ``student`` towards ``teacher`` (``DistillConfig``); save in the student's format."""
    from editcomp import checkpoint
    from editcomp.data import load_facts
    from editcomp.distill import build_data, distill
    from editcomp.eval import perplexity

    if not (text or generate or facts):
        raise EditcompError("no training data: give --text FILE, --generate N and/or --facts FILE")
    _refuse_existing(out, force)
    if facts:
        load_facts(facts)  # a bad facts file fails here, before any model is loaded
    t_ck = checkpoint.load(teacher, device=device, dtype=dtype)
    s_ck = checkpoint.load(student, device=device, dtype=dtype)
    if t_ck.tokenizer.get_vocab() != s_ck.tokenizer.get_vocab():
        raise EditcompError(f"teacher {teacher} and student {student} have different tokenizers "
                            f"({len(t_ck.tokenizer)} vs {len(s_ck.tokenizer)} tokens); this "
                            "version distills between models with one tokenizer")
    data = build_data(s_ck.tokenizer, t_ck.model, config, text=text, generate=generate,
                      facts=facts)
    windows = _eval_windows(s_ck.tokenizer, eval_text, eval_seq_len, eval_windows)
    metrics = {}
    if windows is not None:
        metrics["ppl_teacher"] = perplexity(t_ck.model, windows)["ppl"]
        metrics["ppl_before"] = perplexity(s_ck.model, windows)["ppl"]
    report = distill(s_ck.model, t_ck.model, config, data)
    if windows is not None:
        metrics["ppl_after"] = perplexity(s_ck.model, windows)["ppl"]
    curve = report["loss_curve"]
    metrics.update(loss_first=curve["first"], loss_last=curve["last"], seconds=report["seconds"])
    entry = checkpoint.lineage_entry(
        "distill", config=dict(config.identity(), lr=config.learning_rate), metrics=metrics,
        parent=s_ck, teacher={"path": str(t_ck.path), "weights_sha256": t_ck.weights_sha256},
        data=report["data"], loss_curve=curve, trainable_params=report["trainable_params"],
        **(lineage_extra or {}))
    path = _save(s_ck, out, entry, force)
    return {"out": str(path), "loss": config.loss, "train": config.train, "steps": config.steps,
            "trainable_params": report["trainable_params"], "metrics": metrics, **metrics,
            "loss_curve": curve["means"]}


"""``editcomp edit``: LAFN or FT-L knowledge edits, written as a new checkpoint."""

from __future__ import annotations

import click

from editcomp.cli.base import (autocast_option, cli, device_option, dtype_option, emit,
                               format_edit_table, json_option)
from editcomp.defaults import DEFAULT_CALIB
from editcomp.errors import EditcompError


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
              help="Optimizer steps at most [default: lafn 80 for a fact edited alone, 120 for "
                   "facts edited together (200 with --questions); ft-l 25].")
@click.option("--top-frac", default=None, type=float,
              help="lafn: a neuron is a candidate for a prompt when its |activation| is in its "
                   "layer's top fraction [default: 0.02].")
@click.option("--share", default=None, type=float,
              help="lafn: ... and the fact's when a candidate for this share of its prompts, "
                   "all languages together [default: 0.9].")
@click.option("--max-neurons", default=None, type=int,
              help="lafn: neurons per fact at most, the most consistent first [default: 48].")
@click.option("--neurons-per-token", default=None, type=int,
              help="lafn: a fact edited alone may keep this many neurons per token of its "
                   "longest target when that is more than --max-neurons: a long target (a "
                   "name spelled in many byte tokens) needs more columns to land; 0: off "
                   "[default: 12].")
@click.option("--min-neurons", default=None, type=int,
              help="lafn: a fact sharing fewer neurons than this (after dropping form and generic "
                   "ones) takes its --max-neurons most consistent candidates instead: too few "
                   "cannot carry the edit [default: 24].")
@click.option("--selectivity", default=None, type=float,
              help="lafn: under --max-neurons, rank a fact's equally consistent neurons by how "
                   "far they fire above their own level on unrelated text (1) rather than by "
                   "strength (0), or between: quieter neurons leak less into other answers, "
                   "most with --answer-preserve [default: 1 for a fact edited alone (one fact, "
                   "or --sequential), 0 for facts edited together].")
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
                   "other questions' answers; also the pool --risk-questions picks from; with "
                   "--questions, the most of that file's questions taken per language "
                   "[default: 128 sampled, or up to 512 of --questions; 0: off].")
@click.option("--foreign-answers", default=None, type=int,
              help="lafn, facts edited together: each question also joins the KL term "
                   "this many times teacher-forced on a name or date from the --preserve-text "
                   "text, an answer the model does not know, as the ones the batch leaks into "
                   "[default: 1 for sampled questions, 0 for --questions, whose answers are "
                   "their own; 0: off].")
@click.option("--risk-questions", default=None, type=int,
              help="lafn, a fact edited alone (one fact, or --sequential): of those "
                   "questions (sampled, or --questions), how many whose answers most excite the "
                   "fact's located neurons join its KL term, where its edit would otherwise "
                   "leak [default: 8 with --questions, 0 with sampled questions, where they did "
                   "not help].")
@click.option("--answer-preserve", default=None, type=float,
              help="lafn: weight of a second preservation term, over the positions where the "
                   "sampled questions (--batch-questions) are answered: where an edit leaks "
                   "its target into other answers. Costs some generality and, for a fact edited "
                   "alone, sampling those questions (~80 s for gemma3-270m on a 2-core CPU, "
                   "once per checkpoint: see --no-question-cache) [default: 10 for a fact edited "
                   "alone, 0 for facts edited together].")
@click.option("--question-cache/--no-question-cache", default=True,
              help="lafn: keep the questions sampled from MODEL under $EDITCOMP_HOME/questions "
                   "(default ~/.cache/editcomp), keyed by its weights' sha256, languages, "
                   "sampling settings, device and dtype, so the next edit of MODEL reads them "
                   "instead of sampling again; the edit is the same either way "
                   "[default: on].")
@click.option("--questions", "questions_file", default=None, type=click.Path(dir_okay=False),
              help="lafn: a JSONL file of unrelated questions, one {\"lang\", \"question\", "
                   "\"answer\"} per line (answer optional: the model's own then), used instead of "
                   "sampled ones wherever the edit takes questions (up to 512 per language, in "
                   "file order: --batch-questions; no foreign answers: --foreign-answers). "
                   "Questions like the ones the edit must not touch, with their true answers, "
                   "guard them far better: a held-out split of your locality set (gemma3-270m, "
                   "batches of 100 BMIKE-53 facts, 512 such questions per language instead of "
                   "128 sampled, at --kl-weight 20 over 200 steps: locality en 0.86-0.88 -> "
                   "0.928-0.961, de/fr/zh/es 0.68-0.81 -> 0.916-0.945, with a peak of 15-18 GB "
                   "of memory). Format: docs/facts.md.")
@click.option("--kl-weight", default=None, type=float,
              help="lafn: weight of the KL term that keeps the unedited model's next-token "
                   "distribution on unrelated prompts and questions [default: 10; 20 with "
                   "--questions: facts edited together then run 200 steps (their German and "
                   "Chinese locality needs it), a fact alone weighs its risk questions so; "
                   "0: off].")
@click.option("--nll-floor", default=None, type=float,
              help="lafn: a training pair whose target NLL is below this gets no further push: "
                   "facts edited together reach their targets at different steps, and the ones "
                   "done early would keep growing their margins, which leaks into other "
                   "answers [default: 0 for a fact edited alone, 0.5 for facts edited together].")
@click.option("--lr-decay/--no-lr-decay", default=None,
              help="lafn: facts edited together decay their lr (cosine) to 0 over --steps, so "
                   "the run settles instead of moving its deltas at full pace to the end; a "
                   "fact edited alone never decays. gemma3-270m's batches of 100, 80 constant "
                   "steps -> 120 decaying: reliability up in 7 of 8 language rows (zh 0.845 -> "
                   "0.865), locality in 6, 1.25x the time [default: on].")
@click.option("--keep-best/--last-step", default=None,
              help="lafn: a fact edited alone that reaches its step cap short of its target "
                   "writes the deltas of its best step (most target tokens at the argmax, then "
                   "the lowest loss) instead of its last. gemma3-270m, 100 single zh edits: "
                   "reliability en/zh 0.977/0.947 -> 0.998/0.971, locality equal or up "
                   "[default: keep-best].")
@click.option("--layer", default=None, type=int,
              help="ft-l: the layer whose down_proj is tuned [default: at 21/32 of the depth, "
                   "EasyEdit's llama-7b layer].")
@click.option("--norm-constraint", default=None, type=float,
              help="ft-l: keep every tuned weight within this of its original value (ROME's "
                   "constrained FT-L: 5e-5 for GPT-J, 5e-4 for GPT-2) [default: none, as "
                   "EasyEdit's FT settings].")
@click.option("--objective", default=None, type=click.Choice(["prompt_last", "target_new"]),
              help="ft-l: prompt_last scores every target token at the prompt's last position "
                   "(EasyEdit's FT-L); target_new is the teacher-forced NLL of each target token "
                   "(EasyEdit's FT-M, a stronger edit of multi-token answers) [default: "
                   "prompt_last].")
@autocast_option("lafn", "The deltas and the written weights stay in the checkpoint's dtype.")
@click.option("--report", "report_file", default=None, type=click.Path(dir_okay=False),
              help="Write the neuron-location report (lafn) as JSON here.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@device_option
@dtype_option
@json_option
def edit_cmd(facts, model, out, method, langs, limit, offset, sequential, paraphrases, steps,
             top_frac, share, max_neurons, neurons_per_token, min_neurons, selectivity, form_share,
             preserve_text, preserve_weight, neighbors, batch_questions, foreign_answers,
             risk_questions, answer_preserve, question_cache, questions_file, kl_weight, nll_floor,
             lr_decay, keep_best, layer, norm_constraint, objective, autocast, report_file, force,
             device, dtype, as_json):
    """Edit the facts in FACTS (facts JSONL or BMIKE-53 JSON) into MODEL; write a checkpoint.

    \b
    Example:
      editcomp edit examples/facts.jsonl --model gemma3-270m --langs en,de --out out/edited
    """
    from editcomp.edit import FTLConfig, LAFNConfig, LocateConfig
    from editcomp.jobs import EditConfig, edit_job

    where = {"top_frac": top_frac, "share": share, "max_neurons": max_neurons,
             "neurons_per_token": neurons_per_token, "min_neurons": min_neurons,
             "selectivity": selectivity, "form_share": form_share}
    where = {k: v for k, v in where.items() if v is not None}
    if method == "ft-l" and (sequential or where or preserve_text or preserve_weight is not None
                             or neighbors is not None or batch_questions is not None
                             or foreign_answers is not None or risk_questions is not None
                             or answer_preserve is not None or nll_floor is not None
                             or kl_weight is not None
                             or lr_decay is not None or keep_best is not None
                             or questions_file):
        raise EditcompError("--sequential, --top-frac, --share, --max-neurons, "
                            "--neurons-per-token, --min-neurons, "
                            "--selectivity, --form-share, --neighbors, --batch-questions, "
                            "--foreign-answers, --risk-questions, --answer-preserve, "
                            "--questions, --kl-weight, --nll-floor, --[no-]lr-decay, "
                            "--keep-best/--last-step and "
                            "--preserve-text/--preserve-weight apply to --method lafn only")
    if method == "lafn" and (layer is not None or norm_constraint is not None or objective):
        raise EditcompError("--layer, --norm-constraint and --objective apply to --method ft-l only")
    extra = {k: v for k, v in (("paraphrases", paraphrases), ("steps", steps)) if v is not None}
    lafn_extra = {k: v for k, v in (("preserve_weight", preserve_weight), ("neighbors", neighbors),
                                    ("batch_questions", batch_questions),
                                    ("foreign_answers", foreign_answers),
                                    ("risk_questions", risk_questions),
                                    ("answer_preserve", answer_preserve),
                                    ("kl_weight", kl_weight), ("nll_floor", nll_floor),
                                    ("keep_best", keep_best))
                  if v is not None}
    lafn_extra["autocast"] = autocast
    lafn_extra["lr_decay"] = lr_decay
    if method == "lafn":
        config = EditConfig(method="lafn", lafn=LAFNConfig(sequential=sequential,
                                                           locate=LocateConfig(**where), **extra,
                                                           **lafn_extra))
    else:
        if objective:
            extra["objective"] = objective
        config = EditConfig(method="ft-l", ftl=FTLConfig(layer=layer, norm_constraint=norm_constraint,
                                                         **extra))
    result = edit_job(model, config, out, facts=facts, langs=langs, limit=limit, offset=offset,
                      report_file=report_file, force=force, device=device, dtype=dtype,
                      preserve_text=preserve_text or DEFAULT_CALIB, question_cache=question_cache,
                      questions_file=questions_file)

    def human(r):
        click.echo(f"wrote {r['out']}  ({method}, {r['facts']} facts, {r['seconds']} s)")
        if "neurons" in r:
            n = r["neurons"]
            click.echo(f"neurons: {n['total']} ({n['per_fact_mean']:.1f} per fact), per layer "
                       f"{n['layer_histogram']}")
        click.echo(format_edit_table(r["edit"]))
    emit(result, as_json, human)

"""LAFN's settings (``LAFNConfig``): each default with the measurement that chose it.

Kept apart from the algorithm (lafn.py) because most of a field's comment is the evidence for
its default, which grows with every benchmark session.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from editcomp.device import check_autocast_mode
from editcomp.edit.locate import LocateConfig
from editcomp.errors import ConfigError


SINGLE_LR = 0.1   # LAFNConfig.learning_rate: one fact at a time
BATCH_LR = 0.05   # ... several facts edited together
BATCH_NLL_FLOOR = 0.5  # LAFNConfig.nll_floor for facts edited together
SINGLE_ANSWER_PRESERVE = 10.0  # LAFNConfig.answer_preserve for a fact edited alone
SINGLE_CONTINUATION = 4  # LAFNConfig.kl_continuation of a fact edited alone (see there): at 8,
#                      the continuations were a quarter of a single edit's tokens a step (16
#                      prompts in rows of 8 x 64 tokens: smollm2-135m). Session 46, 8 -> 4:
#                      smollm2-135m, the 100 single zh edits in one run, 5.50 -> 5.10 s per
#                      edit, 22.2 -> 22.8 steps, locality en/zh 0.907/0.887 -> 0.912/0.892;
#                      gemma3-270m, the 100 edits of each language, paired to the rows of
#                      record: locality en/L de 0.969/0.955 -> 0.974/0.955, fr 0.969/0.944 ->
#                      0.960/0.942, zh 0.967/0.949 -> 0.964/0.958, es 0.953/0.967 ->
#                      0.950/0.952, every difference inside its interval
BATCH_CONTINUATION = 8  # ... of facts edited together (the batch rows of session 40)
SINGLE_STEPS = 80  # LAFNConfig.steps for a fact edited alone (an upper bound: see stop_nll)
BATCH_STEPS = 120  # ... for facts edited together (all run: the lr decays to 0 over them)
KL_WEIGHT = 10.0  # LAFNConfig.kl_weight (see there), but for ...
GIVEN_BATCH_KL_WEIGHT = 20.0  # ... facts edited together with the caller's questions, which
GIVEN_BATCH_STEPS = 200  # ... then run this many steps. A question of a held-out case with its
#                      gold answer is the locality probes' kind, so a stronger KL over them
#                      guards the probes, and the longer run gives back the reliability it
#                      costs. gemma3-270m, batches of 100, 512 held-out questions per language,
#                      KL 10 / 120 steps -> 20 / 120 -> 20 / 200 (sessions 39-40), en/L:
#                      zh reliability 0.942/0.855 -> 0.922/0.820 -> 0.945/0.858, locality
#                      0.925/0.892 -> 0.913/0.907 -> 0.928/0.916. KL 10 / 120 -> 20 / 200:
#                      locality de 0.943/0.883 -> 0.953/0.921, fr 0.950/0.904 -> 0.961/0.926,
#                      es 0.944/0.925 -> 0.936/0.945; reliability de 0.944/0.914 ->
#                      0.940/0.920, fr 0.957/0.925 -> 0.941/0.899, es 0.938/0.921 ->
#                      0.934/0.902; ppl x0.989-1.011; 602-1034 s a batch on a 2-core CPU
GIVEN_SINGLE_KL_WEIGHT = 20.0  # ... a fact edited alone whose KL term holds the caller's risk
#                      questions (GIVEN_RISK_QUESTIONS): real questions with their answers, like
#                      the probes. gemma3-270m, the first 100 single edits per language, KL 10 ->
#                      20 (session 47), locality en/L: de 0.974/0.955 -> 0.976/0.962, es
#                      0.950/0.952 -> 0.974/0.958, fr 0.960/0.942 -> 0.974/0.934, zh 0.964/0.958 ->
#                      0.953/0.954; generality de 0.954/0.873 -> 0.949/0.854, es 0.959/0.946
#                      -> 0.925/0.928, fr 0.963/0.884 -> 0.941/0.881, zh 0.875/0.901 ->
#                      0.857/0.885; reliability the same or up; steps +0.3-0.5. smollm2-135m
#                      zh: locality the same, steps 22.8 -> 24.3, 4.58 -> 4.87 s per edit
SAMPLED_QUESTIONS = 128  # LAFNConfig.batch_questions: questions per language the model samples
GIVEN_QUESTIONS = 512  # ... the most of the caller's questions per language (--questions), with
#                      no foreign answers (their own answers stand for those). Real questions
#                      with their answers, like the locality probes, guard those probes where
#                      sampled ones barely do. gemma3-270m, batches of 100 BMIKE-53 cases, the
#                      later cases' locality questions, locality en/L (benchmarks/results,
#                      sessions 37-39): sampled 128 -> given 256 with a foreign answer each ->
#                      given 512: de 0.880/0.808 -> 0.945/0.886 -> 0.943/0.883, fr 0.879/0.679
#                      -> 0.943/0.890 -> 0.950/0.904, zh 0.860/0.748 -> 0.923/0.885 ->
#                      0.925/0.892, es 0.870/0.786 -> 0.939/0.917 -> 0.944/0.925
GIVEN_RISK_QUESTIONS = 8  # LAFNConfig.risk_questions of a fact edited alone, from the caller's
#                      questions (sampled ones: 0, see risk_questions). gemma3-270m, 20 single
#                      edits in each of de/fr/zh/es, a pool of 512 held-out BMIKE-53 locality
#                      questions per language, 0 -> 8 (session 39): locality en/L de
#                      0.938/0.936 -> 0.975/0.988, fr 0.935/0.906 -> 0.968/0.932, zh
#                      0.936/0.954 -> 0.936/0.965, es 0.924/0.945 -> 0.943/0.970; generality
#                      -0.03 to +0.01; 2.5-4.3 -> 4.6-9.2 s per edit on a 2-core CPU


@dataclass
class LAFNConfig:
    """LAFN settings. Defaults from 6 gemma3-270m / BMIKE-53 de cases, then 20 per language
    (benchmarks/results/README.md). Since the location drops
    prompt-form neurons (``LocateConfig.form_share``) fewer neurons carry the fact, and 30 steps
    left half of the edits short of the target. The preservation term slows the NLL's fall
    (at weight 20, 8 of 20 single de edits ran to a 60-step cap, 5 of them short of the
    target: reliability de 0.90), so a fact edited alone runs 80 steps at most (``stop_nll``
    ends most edits in 10-40 steps); facts edited together run 120 with a decaying lr
    (``steps_for``, ``lr_decay``), or 200 under a stronger KL term with the caller's questions
    (``GIVEN_BATCH_STEPS``)."""
    locate: LocateConfig = field(default_factory=LocateConfig)
    paraphrases: int = 1          # template paraphrases added per language (prompts.py)
    steps: int | None = None      # optimizer steps (a fact edited alone: an upper bound, see
    #                               stop_nll); None: ``SINGLE_STEPS`` for a fact edited alone,
    #                               ``BATCH_STEPS`` for facts edited together, or
    #                               ``GIVEN_BATCH_STEPS`` with the caller's questions
    #                               (``steps_for``)
    lr: float | None = None       # Adam, on deltas in units of the edited columns' RMS; None:
    #                               ``SINGLE_LR`` for a fact edited alone (single edits and
    #                               --sequential), ``BATCH_LR`` for facts edited together (see
    #                               ``learning_rate``)
    kl_weight: float | None = None  # KL(unedited || edited) on unrelated prompts' next token;
    #                               None: ``KL_WEIGHT``, or with the caller's questions
    #                               ``GIVEN_BATCH_KL_WEIGHT`` for facts edited together and
    #                               ``GIVEN_SINGLE_KL_WEIGHT`` for a fact alone
    #                               (``kl_weight_for``). A fact edited alone, at
    #                               lr 0.1, 5 -> 10: locality de 0.943 -> 0.963, zh 0.834 ->
    #                               0.844 (20 single edits each). With lr 0.1, against the
    #                               session-13 defaults (lr 0.05, KL 5), gemma3-270m, 20 single
    #                               edits in each of de/fr/zh/es, means of the 8 language rows
    #                               (session 14): 15.0 -> 10.2 s per edit, reliability 0.988 ->
    #                               0.997, generality 0.892 -> 0.914, locality 0.918 -> 0.915
    norm_weight: float = 0.5      # ||D||^2 / ||W[:, idx]||^2 (NeuronDeltas.relative_norm)
    norm_on_text: bool = False    # ... or the change of the edited columns' output on the
    #                               unrelated prompts' tokens (their activation covariance)
    stop_nll: float | None = 0.3  # stop once every target token is the argmax and the mean NLL is below
    #                               this (a fact edited alone; facts edited together stop at
    #                               their floor, ``target_floor``). The argmax is what
    #                               reliability scores; a lower NLL buys the rephrasings a
    #                               little generality for a larger change elsewhere.
    #                               gemma3-270m, the first 100 single fr edits (pack 64,
    #                               session 43), stop 0.1 / 0.2 / 0.3 / 0.5: locality en/fr
    #                               0.959/0.925 (at pack 512) / 0.965/0.938 / 0.969/0.942 /
    #                               0.970/0.942, generality 0.945/0.895 / 0.950/0.883 /
    #                               0.945/0.881 / 0.943/0.878, 16.1 / 12.6 / 11.4 / 10.9 steps.
    #                               With ``pack`` 64, all four languages' 100 single edits
    #                               against 0.1 at 512: locality (mean of the 8 language rows)
    #                               0.961 -> 0.960, generality 0.912 -> 0.905, steps -31%;
    #                               smollm2-135m's first 10 de edits 8.95 -> 5.12 s per edit
    nll_floor: float | None = None  # a pair below this target NLL is not pushed further
    #                               (update.optimize); None: 0 for a fact edited alone (its
    #                               edit stops at ``stop_nll`` anyway), ``BATCH_NLL_FLOOR`` for
    #                               facts edited together (see ``target_floor``)
    sequential: bool = False      # edit facts one after another instead of all together
    lr_growth: float = 2.0        # a fact edited alone: the lr is multiplied by this after every
    lr_growth_steps: int = 16     # ... this many steps (update.optimize; 1.0: a constant lr).
    #                               An edit that needs large deltas descends its NLL at Adam's
    #                               constant pace; lr 0.2 from the start cut smollm2-135m's steps
    #                               33.9 -> 25.2 but gemma3-270m's en locality 0.93 -> 0.85 (20
    #                               single de edits each, session 23). Growth leaves the edits
    #                               done in 16 steps as they were (78 of gemma3's first 100 zh
    #                               cases). The other 22, 1 / 2 / 1.5 in one run (session 31):
    #                               22.3 / 16.4 / 16.8 s per edit, 33.7 / 27.5 / 29.1 steps,
    #                               locality en/zh 0.878/0.932 / 0.949/0.913 / 0.94/0.92,
    #                               reliability 0.994/0.991 / 1.0/1.0 / 1.0/0.99. smollm2, whose
    #                               edits mostly run longer: steps 33.9 -> 28.7, locality en/de
    #                               0.968/0.878 -> 0.949/0.862 (20 single de edits, session 23)
    stall_steps: int | None = None  # a fact edited alone stops once the best mean target NLL of
    stall_drop: float = 0.1       # its last ``stall_steps`` steps is less than this fraction below
    #                               the best before them. smollm2-135m, 20 single de edits: one
    #                               edit held two tokens short by the KL and norm terms stops at
    #                               step 36 instead of 80; the rule also cuts slow edits that
    #                               would have got there (a tiny test model's), so it is off
    keep_best: bool = True        # a fact edited alone that does not reach ``stop_nll`` within
    #                               its steps writes the deltas of its best step (most target
    #                               tokens at the argmax, then the lowest loss: update.optimize)
    #                               instead of its last: each doubling of the lr (``lr_growth``)
    #                               can throw an edit out of a point where all but one token had
    #                               landed, and the cap then wrote the worse state.
    #                               gemma3-270m, the first 100 single edits, held-out questions
    #                               (session 42; only capped edits change: 19 zh, 5 de, 4 fr,
    #                               4 es): reliability en/zh 0.977/0.947 -> 0.998/0.971, de
    #                               0.990/0.989 -> 0.999/0.996, fr 0.994/0.991 -> 1.0/0.997,
    #                               es 0.998/0.995 -> 1.0/0.999; locality equal or up in all 8
    #                               language rows (fr 0.959/0.922 -> 0.959/0.925)
    batch_size: int = 32          # training pairs per optimizer step
    kl_prompts: tuple[str, ...] | None = None  # default: prompts.KL_PROMPTS in the edited languages
    kl_per_lang: int = 4          # gemma3-270m, 20 single fr edits (benchmarks/edit.py): 8 -> 4
    #                               17.6 -> 11.6 s per edit, locality en/fr 0.91/0.85 -> 0.88/0.93
    kl_continuation: int | None = None  # the unedited model's greedy continuation (tokens)
    #                               appended to each unrelated prompt: the KL term then covers
    #                               answer positions, where locality probes are scored, not only
    #                               the question. None: ``SINGLE_CONTINUATION`` for a fact edited
    #                               alone, ``BATCH_CONTINUATION`` for facts edited together
    #                               (``continuation_for``)
    kl_answers: bool = True       # unrelated questions carry a short answer (prompts.KL_ANSWERS)
    #                               before their continuation, so the KL covers answer positions
    #                               (where locality is scored); 20 single fr edits: locality
    #                               en/fr 0.88/0.93 -> 0.91/0.92, 11.6 -> 9.8 s per edit
    neighbors: int = 0            # per fact and language: its prompt with the subject replaced by
    #                               a stand-in (prompts.neighbor_prompts), added to the KL term
    #                               with the unedited model's continuation. 2 on 20 single fr
    #                               edits: locality en/fr 0.88/0.93 -> 0.91/0.93 at 1.5x the time
    nll_vocab: int | None = 512   # the target NLL's softmax over the target and the model's top
    #                               tokens there, refreshed before stopping (runner.TrainBatch);
    #                               None: the full vocabulary (gemma3-270m: 48 -> 37 s per edit,
    #                               the same edits and locality on 6 de cases)
    kl_groups: int = 1            # a step's KL covers 1/kl_groups of the unrelated prompts
    #                               (rotating; runner.build_batches): fewer tokens per step. 4 on
    #                               gemma3-270m, 6 de cases: 37 -> 23 s per edit, de locality
    #                               0.98 -> 0.89
    kl_vocab: int | None = 64     # KL over the unedited model's top tokens per position plus the
    #                               targets (runner.TrainBatch); None: the full vocabulary
    preserve_weight: float = 5.0  # weight of NeuronDeltas.preservation, the edited columns'
    #                               output change on generic text; applies when lafn_edit gets
    #                               that text's activation moments (``preserve``; the CLI reads
    #                               WikiText-2 valid.txt unless told otherwise). It keeps the
    #                               edit off text where the located neurons also fire (a 1944
    #                               target's neurons fire in other dates: that case's locality
    #                               en/de 0.67/0.67 -> 0.89/0.78 at 10). gemma3-270m, 20 single
    #                               edits in each of de/fr/zh/es, means of the 8 language rows
    #                               at weight 0 / 5 / 10 (benchmarks/results/README.md, session
    #                               13): locality 0.894 / 0.918 / 0.929, generality 0.947 /
    #                               0.892 / 0.866, reliability 0.997 / 0.988 / 0.975, seconds
    #                               per edit 12.5 / 15.0 / 17.9. One batch of 16 de cases: ppl
    #                               +22.5% at 0, +6.8% at 20, +3.2% at 100 (locality 0.50 /
    #                               0.69 / 0.81): raise it for large batches
    autocast: str = "auto"        # the update steps' matmuls in bf16 where the device does
    #                               them natively (device.train_autocast; "bf16", "off"):
    #                               gemma3-270m, 8 single de edits on this AVX512-BF16 CPU:
    #                               21.1 -> 16.2 s per edit, the same metrics but en generality
    #                               1.0 -> 0.975 (benchmarks/edit.py, lafn vs lafn-fp32)
    attention: str | None = "auto"  # the attention kernel of the update steps (runner.
    #                               attention_kernel; None: the model's own; "auto": see
    #                               ``attention_for``)
    pack: int | None = 64         # a fact edited alone: its update steps lay their sequences end
    #                               to end in rows of at most this many tokens (layout.packed)
    #                               instead of one padded row each (None); see ``pack_for``.
    #                               Narrow rows keep the eager attention's score matrices small
    #                               (quadratic in the row's width): smollm2-135m, 10 single de
    #                               edits, 512 -> 64: 0.277 -> 0.192 s a step, 8.95 -> 6.87 s
    #                               per edit (session 43); gemma3-270m, 100 single fr edits,
    #                               6.07 -> 5.95 s, locality en/fr 0.959/0.922 -> 0.959/0.928
    #                               (session 41)
    row_cache_mb: int = 64        # a step batch keeps the output rows its KL and NLL read
    #                               (runner.TrainBatch ``row_cache``) when they fit in this many
    #                               MiB (each set; 0: gathered at every step). A single edit's
    #                               fit; a batch of many facts' do not
    preserve_windows: int = 16    # windows of generic text read for the moments ...
    preserve_seq_len: int = 256   # ... of this many tokens each
    batch_questions: int | None = None  # facts edited together: this many unrelated questions
    #                               per language join the KL term's prompts, the location's
    #                               generic prompts and (their tokens' moments) the preservation
    #                               text; 0: off. A batch edit otherwise leaks its targets into
    #                               other questions' answers (session 15: see questions.py).
    #                               None: ``SAMPLED_QUESTIONS`` that the unedited model samples
    #                               (questions.py) with its greedy answers, or, given the
    #                               caller's questions (``unrelated.given_questions``), up to
    #                               ``GIVEN_QUESTIONS`` of those (``questions_per_lang``)
    kl_per_step: int = 32         # the most unrelated prompts one step's KL covers; more are dealt
    #                               into rotating groups (as ``kl_groups``)
    foreign_answers: int | None = None  # facts edited together: each unrelated question joins
    #                               the KL term this many more times, teacher-forced on a name or
    #                               date from the generic text (answers.py; lafn_edit's
    #                               ``answer_spans``), like the locality probes' gold answers the
    #                               model does not know; 0: off. None: 1 with sampled questions,
    #                               0 with given ones, whose own answers do that job
    #                               (``foreign_answers_for``). gemma3-270m, batches of 100 in
    #                               each of de/zh/fr/es, 0 -> 1 (session 22): locality mean of
    #                               the 8 language rows 0.717 -> 0.748 (7 rows up, de -0.03),
    #                               WikiText-2 ppl x1.047/1.034/1.010/0.974 -> x1.003/0.982/
    #                               1.025/0.994, reliability the same (+-0.03), edit +14-19%
    risk_questions: int | None = None  # a fact edited alone (single, --sequential): this
    #                               many questions of the pool (``questions_per_lang``) join its
    #                               KL term: those whose answers most excite its located neurons
    #                               (``riskiest``), where its edit would leak. None:
    #                               ``GIVEN_RISK_QUESTIONS`` from the caller's questions, 0 from
    #                               sampled ones (``risk_questions_for``).
    #                               gemma3-270m, 20 single edits each of en+de / en+zh, 0 -> 8:
    #                               locality en/de 0.930/0.963 -> 0.958/0.969, en/zh 0.930/0.834
    #                               -> 0.929/0.899 (de/fr/es/zh rows: mean 0.914 -> 0.936);
    #                               generality -0.01 to -0.04; 5.2-6.5 -> 9.1-11.1 s
    #                               per edit, plus sampling the pool once per call (then ~300 s,
    #                               now ~60 s a language with its answer activations). Off by
    #                               default for that cost: a one-fact call would pay it whole.
    #                               With the session-28 location it no longer helps: the first
    #                               30 zh cases, 0 -> 8: locality 0.928/0.914 -> 0.923/0.904,
    #                               9.95 -> 16.2 s per edit (``answer_preserve`` does better).
    #                               From a pool of real questions it does help: see
    #                               ``GIVEN_RISK_QUESTIONS``

    answer_preserve: float | None = None  # weight of the preservation term over the sampled
    #                               questions' answer positions (their last token and what
    #                               follows it: unrelated.answer_moments, NeuronDeltas.
    #                               answer_preservation), where a single edit's worst leaks are:
    #                               the target's token as the first answer token of another
    #                               question. None: ``SINGLE_ANSWER_PRESERVE`` for a fact edited
    #                               alone, 0 for facts edited together (``answer_preserve_for``).
    #                               Alone it pays off with the selective neuron ranking
    #                               (``LocateConfig.selectivity_for``), which puts quiet neurons
    #                               first, whose output there is cheap to keep. gemma3-270m, the
    #                               first 20 single edits of each of de/fr/zh/es against session
    #                               33's defaults (0 and selectivity 0): locality en/L de
    #                               0.92/0.94 -> 0.938/0.925, fr 0.91/0.86 -> 0.936/0.944, zh
    #                               0.91/0.90 -> 0.949/0.923, es 0.90/0.89 -> 0.913/0.921;
    #                               generality 0.90-1.00; 4.0-6.4 -> 5.3-9.4 s per edit, plus
    #                               ~80 s once per call to sample the questions. Either alone
    #                               moved little (fr: 0.912/0.858 -> 0.901/0.877 at 10, 0.900/0.845
    #                               with selectivity 1). At 20: locality de 0.938/0.988, zh
    #                               0.936/0.971, es 0.924/0.946, but zh ran 15.8 s per edit (3 of
    #                               20 to the 80-step cap) and generality fell to 0.85-0.87 in zh
    #                               and de (session 34). The de batch of 100 at 20 lost locality
    #                               and reliability (0.873/0.783 -> 0.846/0.739; 0.93/0.91 ->
    #                               0.90/0.86; session 29), so a batch keeps 0
    lr_decay: bool | None = None  # facts edited together: the lr decays (cosine) to 0 over
    #                               ``steps`` (update.optimize), so a longer run settles: Adam
    #                               moves every delta by about the lr each step however small
    #                               its gradient, and with most pairs at the NLL floor the late
    #                               steps would only shift the deltas. None or True: on for
    #                               facts edited together; a fact edited alone never decays
    #                               (``lr_decay_for``). gemma3-270m, batches of 100, 80 constant
    #                               steps -> 120 decaying (session 36): reliability up in 7 of 8
    #                               language rows (zh 0.845 -> 0.865, the 0.85),
    #                               locality in 6 (fr's French 0.710 -> 0.679), 1.25x the time;
    #                               WikiText-2 ppl of the fr batch x1.0045 -> x1.0078 over 16
    #                               windows (x1.019 -> x1.025 over 4: mostly noise). 120
    #                               constant steps had cost fr 0.09 of locality (session 35)

    def steps_for(self, n_facts: int, given: bool = False) -> int:
        """The optimizer steps for ``n_facts`` edited together: ``steps`` if set, else
        ``SINGLE_STEPS`` for one fact and ``BATCH_STEPS`` for more (see ``lr_decay``), or
        ``GIVEN_BATCH_STEPS`` with the caller's questions (``given``)."""
        if self.steps is not None:
            return self.steps
        if n_facts == 1:
            return SINGLE_STEPS
        return GIVEN_BATCH_STEPS if given else BATCH_STEPS

    def kl_weight_for(self, n_facts: int, given: bool = False) -> float:
        """The KL term's weight for ``n_facts`` edited together: ``kl_weight`` if set, else
        with the caller's questions in the KL term (``given``) ``GIVEN_BATCH_KL_WEIGHT`` for
        facts edited together and ``GIVEN_SINGLE_KL_WEIGHT`` for a fact alone, and
        ``KL_WEIGHT`` otherwise."""
        if self.kl_weight is not None:
            return self.kl_weight
        if not given:
            return KL_WEIGHT
        return GIVEN_BATCH_KL_WEIGHT if n_facts > 1 else GIVEN_SINGLE_KL_WEIGHT

    def learning_rate(self, n_facts: int) -> float:
        """The lr for ``n_facts`` edited together: ``lr`` if set, else ``SINGLE_LR`` for one
        fact and ``BATCH_LR`` for more. One fact's ~46 columns take 0.1 in half the steps of
        0.05 with the same locality; a batch moves thousands of columns at once, and 0.1 there
        costs perplexity (gemma3-270m, 100 de cases in one batch, session 14: ppl x1.86 at
        0.1, x1.40 at 0.05, locality en/de 0.35/0.31 vs 0.39/0.33)."""
        if self.lr is not None:
            return self.lr
        return SINGLE_LR if n_facts == 1 else BATCH_LR

    def answer_preserve_for(self, n_facts: int) -> float:
        """The weight of the answer-position preservation term for ``n_facts`` edited together:
        ``answer_preserve`` if set, else ``SINGLE_ANSWER_PRESERVE`` for one fact and 0 for more."""
        if self.answer_preserve is not None:
            return self.answer_preserve
        return SINGLE_ANSWER_PRESERVE if n_facts == 1 else 0.0

    def target_floor(self, n_facts: int) -> float:
        """The NLL below which a pair is not pushed further: ``nll_floor`` if set, else 0 for one
        fact and ``BATCH_NLL_FLOOR`` for more. A batch runs until its slowest facts reach their
        targets (all its steps for 100 facts); without a floor the facts done early keep growing
        their margins meanwhile, and the larger push leaks into other questions' answers."""
        if self.nll_floor is not None:
            return self.nll_floor
        return 0.0 if n_facts == 1 else BATCH_NLL_FLOOR

    def attention_for(self, n_facts: int) -> str | None:
        """The attention kernel for ``n_facts`` edited together: ``attention`` unless "auto";
        "auto" is "eager" for one fact and the model's own for more. 20 single de edits on this
        CPU, eager instead of sdpa: gemma3-270m 5.49 -> 5.14 s per edit, smollm2-135m 11.39 ->
        9.35, the same metrics to the third digit. The de batch of 100 in bf16 autocast:
        locality en/de 0.787/0.741 -> 0.751/0.696, generality 0.84/0.88 -> 0.89/0.92 (one run
        each; eager rounds the attention scores to bf16, and 80 steps of 100 facts amplify
        it), so a batch keeps the model's kernel (benchmarks/results/README.md, session 21)."""
        if self.attention != "auto":
            return self.attention
        return "eager" if n_facts == 1 else None

    def pack_for(self, n_facts: int) -> int | None:
        """The row width of packed update steps for ``n_facts`` edited together (None: padded
        rows): ``pack`` for one fact. A single edit's dozen sequences of 15-40 tokens are about a
        third padding when padded. Packed (in rows of 512, session 24), the losses are the same
        in fp32, and single de edits took 16% less time on this CPU (interleaved with padded
        ones: smollm2-135m 17.5 -> 14.7 s, gemma3-270m 10.6 -> 8.9 s per edit, the same
        optimizer steps). Facts edited together keep padded rows: bf16 steps round differently
        once packed, and 80 steps over 100 facts amplify such differences (as with the attention
        kernel), so that needs its own batch measurement first."""
        return self.pack if n_facts == 1 else None

    def lr_growth_for(self, n_facts: int) -> tuple[float, int] | None:
        """``optimize``'s ``lr_growth`` for ``n_facts`` edited together: a fact edited alone only
        (a batch runs all its steps against the NLL floor, where a growing lr costs perplexity)."""
        if n_facts != 1 or self.lr_growth == 1:
            return None
        return self.lr_growth, self.lr_growth_steps

    def lr_decay_for(self, n_facts: int) -> bool:
        """Whether ``optimize`` decays the lr for ``n_facts`` edited together: a batch unless
        ``lr_decay`` is False (a fact edited alone stops at its target and grows its lr
        instead)."""
        return self.lr_decay is not False and n_facts > 1

    def stall_for(self, n_facts: int) -> tuple[int, float] | None:
        """``optimize``'s ``stall`` rule for ``n_facts`` edited together: a fact edited alone only."""
        return (self.stall_steps, self.stall_drop) if n_facts == 1 and self.stall_steps else None

    def keep_best_for(self, n_facts: int) -> bool:
        """``optimize``'s ``keep_best`` for ``n_facts`` edited together: a fact edited alone only
        (a batch's lr decays to 0, so its last step is where it settled)."""
        return self.keep_best and n_facts == 1

    def questions_per_lang(self, given: bool = False) -> int:
        """Unrelated questions per language: ``batch_questions`` if set, else
        ``SAMPLED_QUESTIONS`` sampled ones or up to ``GIVEN_QUESTIONS`` of the caller's
        (``given``), which cost no sampling and guard locality far better the more there are."""
        if self.batch_questions is not None:
            return self.batch_questions
        return GIVEN_QUESTIONS if given else SAMPLED_QUESTIONS

    def foreign_answers_for(self, n_facts: int, given: bool = False) -> int:
        """Foreign answers per question for ``n_facts`` edited together: only facts edited
        together (not one, not --sequential) with questions take them; None: 1 for sampled
        questions, 0 for ``given`` ones (see ``GIVEN_QUESTIONS``)."""
        together = n_facts > 1 and not self.sequential
        if not together or self.questions_per_lang(given) == 0:
            return 0
        if self.foreign_answers is not None:
            return self.foreign_answers
        return 0 if given else 1

    def edits_alone(self, n_facts: int) -> bool:
        """Whether an edit of ``n_facts`` trains each fact by itself (one fact, or
        ``sequential``): the mode whose unrelated prompts a caller makes with ``alone=True``."""
        return n_facts == 1 or self.sequential

    def continuation_for(self, n_facts: int) -> int:
        """Tokens of the unedited model's continuation after each unrelated prompt of an edit of
        ``n_facts`` together (1: a fact edited alone, also under ``sequential``):
        ``kl_continuation`` if set, else ``SINGLE_CONTINUATION`` or ``BATCH_CONTINUATION``."""
        if self.kl_continuation is not None:
            return self.kl_continuation
        return SINGLE_CONTINUATION if n_facts == 1 else BATCH_CONTINUATION

    def samples_questions(self, n_facts: int) -> bool:
        """Whether an edit of ``n_facts`` samples questions from the model (``lafn_edit``'s
        ``questions``): facts edited together for their unrelated prompts, a fact edited alone
        for its riskiest questions or its answer-preservation term."""
        if self.questions_per_lang() == 0:
            return False
        if n_facts > 1 and not self.sequential:
            return True
        return self.takes_risk_questions() or self.answer_preserve_for(1) > 0

    def risk_questions_for(self, given: bool = False) -> int:
        """Risk questions of a fact edited alone: ``risk_questions`` if set, else
        ``GIVEN_RISK_QUESTIONS`` from the caller's questions (``given``) and 0 from sampled."""
        if self.risk_questions is not None:
            return self.risk_questions
        return GIVEN_RISK_QUESTIONS if given else 0

    def takes_risk_questions(self, given: bool = False) -> bool:
        """Whether a fact edited alone adds its riskiest questions (of the caller's: ``given``)
        to its KL term."""
        return self.risk_questions_for(given) > 0 and self.kl_weight_for(1) > 0

    def uses_generic_text(self, n_facts: int, given: bool = False) -> bool:
        """Whether an edit of ``n_facts`` (with the caller's questions: ``given``) reads generic
        text: for the preservation term's moments, or for the names and dates of its foreign
        answers."""
        return self.preserve_weight > 0 or self.foreign_answers_for(n_facts, given) > 0

    def validate(self) -> None:
        self.locate.validate()
        for name in ("kl_vocab", "nll_vocab", "pack", "steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 or None, got {getattr(self, name)}")
        if self.kl_continuation is not None and self.kl_continuation < 0:
            raise ConfigError(f"kl_continuation must be >= 0, got {self.kl_continuation}")
        if self.neighbors < 0:
            raise ConfigError(f"neighbors must be >= 0, got {self.neighbors}")
        for name in ("batch_questions", "risk_questions", "foreign_answers", "row_cache_mb"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr_growth <= 0:
            raise ConfigError(f"lr_growth must be > 0, got {self.lr_growth}")
        if not 0 <= self.stall_drop < 1:
            raise ConfigError(f"stall_drop must be in [0, 1), got {self.stall_drop}")
        if self.stall_steps is not None and self.stall_steps < 1:
            raise ConfigError(f"stall_steps must be >= 1 or None, got {self.stall_steps}")
        for name in ("batch_size", "kl_groups", "preserve_windows", "preserve_seq_len",
                     "kl_per_step", "lr_growth_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_autocast_mode(self.autocast)
        if self.attention is not None and not (isinstance(self.attention, str) and self.attention):
            raise ConfigError(f"attention must be a kernel name or None, got {self.attention!r}")
        if self.paraphrases < 0:
            raise ConfigError(f"paraphrases must be >= 0, got {self.paraphrases}")
        for name in ("lr", "kl_weight", "norm_weight", "preserve_weight", "nll_floor",
                     "answer_preserve"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)

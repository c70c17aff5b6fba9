"""Locate a fact's language-agnostic factual neurons (LAFN step 1-2).

Every training prompt of a fact (each language x its prompt, given paraphrases and template
paraphrases) is run once; at the last prompt token each FFN neuron's activation (the input of
down_proj) is recorded through a forward pre-hook on every layer's ``down`` (found by the adapter).
A neuron is a *candidate* for a prompt when its |activation| is in that layer's top ``top_frac``;
the fact's neurons are the candidates of at least ``share`` of its prompts, across all languages
(with ``continuation``, for multi-token targets also at the positions that predict the later
target tokens).
Neurons that are also candidates at ``generic_share`` of the positions of unrelated prompts fire
for everything (massive-activation neurons) and are dropped: editing them would change unrelated
answers. So are neurons that are candidates at ``form_share`` of the unrelated prompts' *last*
tokens: they mark the prompt's form ("a question ends here"), fire at every question's answer
position, and editing them made unrelated questions answer with the edit's target (gemma3-270m,
6 BMIKE-53 de cases: German locality 0.61 with them, 0.98 without). A fact left with too few
of its shared neurons falls back to its most consistent unbanned candidates (``fallback``).
Under ``max_neurons`` the most consistent come first, then the strongest (or, with
``selectivity``, those quietest on unrelated text for their strength); a fact located alone
whose target is long may keep ``neurons_per_token`` per token of it instead.

``editcomp edit ... --report FILE`` writes the location report (layer histogram, neurons per fact,
overlap between languages) as JSON.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from editcomp.arch import get_adapter
from editcomp.edit.prompts import TrainItem
from editcomp.edit.layout import right_pad
from editcomp.edit.runner import ModelRunner
from editcomp.errors import ConfigError


@dataclass
class LocateConfig:
    """Thresholds of the location step."""
    top_frac: float = 0.02       # a neuron is a candidate for a prompt if in its layer's top fraction
    share: float = 0.9           # ... and a fact's neuron if a candidate for this share of its prompts
    generic_share: float | None = 0.25  # drop candidates at this share of unrelated positions
    form_share: float | None = 0.25  # ... or at this share of unrelated prompts' last tokens: those
    #                                  neurons answer the prompt's form ("a question ends here"),
    #                                  not the fact, and editing them moves every answer
    max_neurons: int | None = 48  # per fact, the most consistent ones first (None: no cap)
    neurons_per_token: int | None = 12  # a fact located alone: its cap is at least this many
    #                              neurons per token of its longest target (None or 0:
    #                              ``max_neurons`` whatever the length; see ``budget``). A long
    #                              target needs more columns to land: smollm2-135m spells a
    #                              Chinese name in ~10 byte tokens, and at 48 neurons its first
    #                              100 single zh edits ran 50 steps (41 to the 80-step cap),
    #                              11.6 s, reliability en/zh 0.989/0.816. The first 30 zh cases,
    #                              48 -> 6 / 8 / 10 / 12 / 16 per token (session 45): 10.3 ->
    #                              8.7 / 7.4 / 5.9 / 4.5 / 3.6 s per edit, zh reliability 0.852
    #                              -> 0.904 / 0.977 / 0.988 / 0.992 / 1.0, zh generality 0.678
    #                              -> 0.725 / 0.773 / 0.847 / 0.823 / 0.900, locality en/zh
    #                              0.916/0.927 -> 0.897/0.921 / 0.863/0.891 / 0.869/0.895 /
    #                              0.877/0.903 / 0.880/0.883; all 100 at 12: 50.2 -> 22.2 steps,
    #                              11.55 -> 5.38 s, reliability 0.989/0.816 -> 1.0/0.995,
    #                              generality 0.540/0.630 -> 0.692/0.843, locality 0.925/0.916
    #                              -> 0.907/0.887. gemma3-270m, the issue's 100 single
    #                              edits per language at 12 (only targets of 5+ tokens change:
    #                              25-39 cases a language): steps -25 to -35%, reliability
    #                              0.989-1.0 in all 8 language rows, generality +0.01 to +0.04
    #                              in all 8, locality en/L de 0.969/0.958 -> 0.969/0.955, fr
    #                              0.969/0.942 -> 0.969/0.944, zh 0.968/0.961 -> 0.967/0.949, es
    #                              0.953/0.963 -> 0.953/0.967
    min_layer: float = 0.5       # consider layers from this fraction of the depth on (the upper half:
    #                              fewer layers to re-run per step; the lower half held generic neurons)
    continuation: bool = False  # also locate at the positions predicting later target tokens.
    #                             Those neurons fire inside any name being spelled out, not only
    #                             the fact's: gemma3-270m, 12 single zh edits whose locality the
    #                             default missed most, True -> False: locality en/zh 0.856/0.477
    #                             -> 0.879/0.723, generality 0.889/0.942 -> 0.972/0.949, the
    #                             same reliability (1.00/1.00) and 16.2 -> 15.2 steps (a subset
    #                             chosen where it leaked, so this overstates it). The de batch
    #                             of 100, both in one run: locality 0.78/0.71 -> 0.87/0.78,
    #                             reliability 0.95/0.93 -> 0.93/0.91. The first 100 single de
    #                             edits (with min_neurons 8 -> 24): locality 0.913/0.911 ->
    #                             0.906/0.911, generality 0.975/0.934 -> 0.992/0.960, steps
    #                             15.7 -> 8.1 (session 31)
    fallback: bool = True       # a fact left with fewer than ``min_neurons`` shared neurons after
    min_neurons: int = 24       # the bans takes its ``max_neurons`` most consistent unbanned
    #                             candidates (the shared ones first) instead. With none, its
    #                             edit would change nothing (smollm2-135m, BMIKE-53 de case 18:
    #                             all 63 shared neurons mark the question's form); with 1-4,
    #                             gemma3-270m could not reach the target (100 single de edits:
    #                             cases 20, 48, 52, 76 ran 80 steps to reliability 0). Without
    #                             ``continuation`` neurons, 10-12 were still too few (de cases
    #                             12, 75, 90 ran 80 steps to reliability 0.6-0.8); 8 -> 24 on
    #                             the 8 de/zh cases with fewer than 24: all reach the target, in
    #                             4-19 steps instead of 9-80
    selectivity: float | None = None  # which of a fact's equally consistent neurons come
    #                             first under ``max_neurons``: |activation| on its prompts over
    #                             the layer's top-fraction threshold (strength) ** (1 - s) times
    #                             over the neuron's own mean |activation| on unrelated text ** s.
    #                             None: 1 for a fact located alone, 0 for facts located
    #                             together (``selectivity_for``). Alone, with the
    #                             answer-position preservation term (``LAFNConfig.
    #                             answer_preserve_for``) it keeps other answers best (session
    #                             34); by itself it moved little. Session 27, with
    #                             ``continuation`` on and min_neurons 8, gemma3-270m, 36 single
    #                             zh edits whose locality the default missed, 0 -> 1: locality
    #                             en/zh 0.89/0.68 -> 0.91/0.85, reliability 1.00/1.00 ->
    #                             0.98/0.91, 11.6 -> 25.4 s per edit (quiet neurons needed larger
    #                             deltas: 18 -> 41 steps); with today's location the steps hardly
    #                             change. Facts located together keep 0: not measured on a batch
    batch_size: int = 16

    def selectivity_for(self, n_facts: int) -> float:
        """The selectivity for ``n_facts`` located together: ``selectivity`` if set, else 1 for
        one fact and 0 for more."""
        if self.selectivity is not None:
            return self.selectivity
        return 1.0 if n_facts == 1 else 0.0

    def budget(self, target_tokens: int, n_facts: int) -> int | None:
        """The most neurons a fact whose longest target has ``target_tokens`` tokens keeps:
        ``max_neurons``, raised to ``neurons_per_token`` per token for a fact located alone."""
        if self.max_neurons is None or not self.neurons_per_token or n_facts != 1:
            return self.max_neurons
        return max(self.max_neurons, self.neurons_per_token * target_tokens)

    def validate(self) -> None:
        if not 0 < self.top_frac <= 1:
            raise ConfigError(f"top_frac must be in (0, 1], got {self.top_frac}")
        if not 0 < self.share <= 1:
            raise ConfigError(f"share must be in (0, 1], got {self.share}")
        for name in ("generic_share", "form_share"):
            v = getattr(self, name)
            if v is not None and not 0 < v <= 1:
                raise ConfigError(f"{name} must be in (0, 1] or None, got {v}")
        if self.selectivity is not None and not 0 <= self.selectivity <= 1:
            raise ConfigError(f"selectivity must be in [0, 1], got {self.selectivity}")
        if self.min_neurons < 1:
            raise ConfigError(f"min_neurons must be >= 1, got {self.min_neurons}")
        if self.max_neurons is not None and self.max_neurons < 1:
            raise ConfigError(f"max_neurons must be >= 1, got {self.max_neurons}")
        if self.neurons_per_token is not None and self.neurons_per_token < 0:
            raise ConfigError("neurons_per_token must be >= 0 (0: off), "
                              f"got {self.neurons_per_token}")
        if not 0 <= self.min_layer < 1:
            raise ConfigError(f"min_layer must be in [0, 1), got {self.min_layer}")


def _down_inputs(runner: ModelRunner, seqs: list[list[int]], layers: list[int], take,
                 batch_size: int, desc: str, progress: bool) -> None:
    """Run ``seqs`` through the decoder in right-padded batches; for each batch and each of
    ``layers``, ``take(layer, x, start, mask)`` gets that layer's down_proj input ``x``
    ``[b, T, I]`` (the batch holds ``seqs[start:start + b]``; ``mask`` marks real tokens)."""
    parts = {lp.index: lp for lp in runner.adapter.layers()}
    box: dict = {}

    def make_hook(li):
        def hook(mod, args):
            take(li, args[0].detach(), box["start"], box["mask"])
        return hook

    handles = [parts[li].down.register_forward_pre_hook(make_hook(li)) for li in layers]
    try:
        with torch.no_grad():
            for s in tqdm(range(0, len(seqs), batch_size), desc=desc, unit="batch",
                          disable=not progress, leave=False):
                ids, mask = right_pad(seqs[s:s + batch_size], runner.pad, runner.device)
                box["start"], box["mask"] = s, mask
                runner.adapter.decoder(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()


def _position_index(positions: list[list[int]], batch_size: int, device
                    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Batch start -> (rows, cols) of that batch's ``positions``: ``x[rows, cols]`` picks them
    from a ``[b, T, I]`` batch in sequence order, then position."""
    where = {}
    for s in range(0, len(positions), batch_size):
        pos = positions[s:s + batch_size]
        where[s] = (torch.tensor([i for i, p in enumerate(pos) for _ in p], device=device),
                    torch.tensor([c for p in pos for c in p], device=device))
    return where


def activations_at(runner: ModelRunner, seqs: list[list[int]], positions: list[list[int]],
                   batch_size: int = 16, progress: bool = False, signed: bool = False) -> torch.Tensor:
    """|activation| (the activation with ``signed``) of every FFN neuron at the given positions of
    each sequence -> ``[layers, sum(len(p) for p in positions), intermediate]`` (sequence order,
    then position)."""
    layers = [lp.index for lp in runner.adapter.layers()]
    out = [[] for _ in layers]
    where = _position_index(positions, batch_size, runner.device)

    def take(li, x, s, mask):
        a = x[where[s]].float()
        out[li].append((a if signed else a.abs()).cpu())

    _down_inputs(runner, seqs, layers, take, batch_size, "locate", progress)
    return torch.stack([torch.cat(o) for o in out])


def mean_activations(runner: ModelRunner, seqs: list[list[int]], positions: list[list[int]],
                     batch_size: int = 16) -> torch.Tensor:
    """Each sequence's mean |activation| of every FFN neuron over its ``positions`` ->
    ``[layers, n, intermediate]`` (reduced batch by batch: a pool of hundreds of questions'
    every position would not fit)."""
    layers = [lp.index for lp in runner.adapter.layers()]
    out: dict[int, list[torch.Tensor]] = {li: [] for li in layers}
    weights: dict[int, torch.Tensor] = {}  # batch start -> [b, T]: 1/len at each position

    def take(li, x, s, mask):
        if s not in weights:
            w = torch.zeros(x.shape[:2], device=x.device)
            for i, pos in enumerate(positions[s:s + x.shape[0]]):
                w[i, pos] = 1.0 / max(1, len(pos))
            weights.clear()
            weights[s] = w
        out[li].append(torch.einsum("bt,bti->bi", weights[s], x.float().abs()).cpu())

    _down_inputs(runner, seqs, layers, take, batch_size, "answer activations", False)
    return torch.stack([torch.cat(out[li]) for li in layers])


def activation_moments(runner: ModelRunner, seqs: list[list[int]], layers: list[int],
                       batch_size: int = 8, progress: bool = False,
                       positions: list[list[int]] | None = None) -> dict[int, torch.Tensor]:
    """Second moments ``C = X^T X / n`` of the FFN activations (down_proj's input, signed) over
    every real token of ``seqs`` (or only each sequence's ``positions``), for each of ``layers``
    -> ``{layer: [I, I]}`` (fp32, on CPU).

    ``tr(D^T C[idx, idx] D)`` is then the mean squared change of the residual stream that deltas
    ``D`` on the columns ``idx`` cause on that text, without running the model: LAFN's
    preservation term (MEMIT's, restricted to the located columns)."""
    sums: dict[int, torch.Tensor] = {}
    where = _position_index(positions, batch_size, runner.device) if positions is not None else None

    def take(li, x, s, mask):
        a = (x[mask.bool()] if where is None else x[where[s]]).float()
        sums[li] = sums.get(li, 0) + a.T @ a

    _down_inputs(runner, seqs, layers, take, batch_size, "text moments", progress)
    n = sum(len(q) for q in (seqs if positions is None else positions))
    return {li: (c / max(1, n)).cpu() for li, c in sums.items()}


def last_token_activations(runner: ModelRunner, prompts: list[list[int]], batch_size: int = 16,
                           progress: bool = False) -> torch.Tensor:
    """|activation| of every FFN neuron at each prompt's last token -> ``[layers, n, intermediate]``."""
    return activations_at(runner, prompts, [[len(p) - 1] for p in prompts], batch_size, progress)


def generic_activations(runner: ModelRunner, prompts: list[list[int]], batch_size: int = 16
                        ) -> torch.Tensor:
    """Signed activations at every position of unrelated prompts -> ``[layers, positions, I]``:
    what ``LAFNConfig.norm_on_text`` measures the deltas' output on. The location itself only
    needs their sums (``generic_stats``)."""
    return activations_at(runner, prompts, [list(range(len(p))) for p in prompts], batch_size,
                          signed=True)


@dataclass(frozen=True)
class GenericStats:
    """What the location takes from unrelated prompts' FFN activations, summed position by
    position as they are run: per neuron, at how many positions it is a ``top_frac`` candidate
    (a neuron that is one at many fires on ordinary text, often hugely at the first token, and
    must not be edited), at how many of the prompts' ends (where their own text ends: such a
    neuron marks the form "a question ends here"), and its summed |activation| (by which
    ``selectivity`` ranks). Sums instead of the activations themselves: those take 147 KB a
    position on gemma3-270m (18 layers x 2048 neurons, fp32), and a batch's unrelated prompts,
    hundreds of questions per language with answers and continuations, hold tens of thousands."""
    top_frac: float
    prompts: int                 # how many prompts were summed ...
    positions: int               # ... holding this many positions
    candidates: torch.Tensor     # [layers, I] int64: positions where the neuron is a candidate
    end_candidates: torch.Tensor  # [layers, I] int64: the same at the prompts' ends
    abs_sum: torch.Tensor        # [layers, I] float64: |activation| summed over the positions

    def __add__(self, other: "GenericStats") -> "GenericStats":
        if other.top_frac != self.top_frac:
            raise ValueError(f"cannot add stats of top_frac {self.top_frac} and {other.top_frac}")
        return GenericStats(self.top_frac, self.prompts + other.prompts,
                            self.positions + other.positions, self.candidates + other.candidates,
                            self.end_candidates + other.end_candidates, self.abs_sum + other.abs_sum)

    @classmethod
    def of(cls, acts: torch.Tensor, ends: list[int], top_frac: float, prompts: int | None = None
           ) -> "GenericStats":
        """The stats of activations ``[layers, positions, I]`` already at hand; ``ends``: the
        columns that are a prompt's end (one per prompt unless ``prompts`` says otherwise)."""
        a = acts.float().abs()
        return cls(top_frac, len(ends) if prompts is None else prompts, a.shape[1],
                   _candidate_counts(a, top_frac), _candidate_counts(a[:, ends], top_frac),
                   a.double().sum(1))

    @property
    def mean_abs(self) -> torch.Tensor:
        """``[layers, I]``: each neuron's mean |activation| over the positions."""
        return (self.abs_sum / max(1, self.positions)).float()


def _candidate_counts(acts: torch.Tensor, top_frac: float) -> torch.Tensor:
    """``[..., n, I]`` |activations| -> ``[..., I]``: at how many of the n rows each neuron is among
    the row's top ``top_frac`` (``candidates``, counted without its ``[..., n, I]`` mask)."""
    top = acts.topk(_top_k(top_frac, acts.shape[-1]), dim=-1).indices
    counts = torch.zeros(*acts.shape[:-2], acts.shape[-1], dtype=torch.int64, device=acts.device)
    return counts.scatter_add_(-1, top.flatten(-2), torch.ones_like(top.flatten(-2)))


def generic_stats(runner: ModelRunner, prompts: list[list[int]], ends: list[int] | None,
                  top_frac: float, batch_size: int = 16) -> GenericStats:
    """``GenericStats`` of unrelated ``prompts`` (``ends[k]``: where prompt k's own text ends,
    before an appended continuation; default: its last token), summed batch by batch."""
    ends = [len(p) - 1 for p in prompts] if ends is None else ends
    layers = [lp.index for lp in runner.adapter.layers()]
    n_inner = runner.adapter.layers()[0].down.in_features
    cand = torch.zeros(len(layers), n_inner, dtype=torch.int64)
    end_cand, abs_sum = torch.zeros_like(cand), torch.zeros(len(layers), n_inner, dtype=torch.float64)

    def take(li, x, s, mask):
        a = x.float().abs()
        rows = torch.arange(a.shape[0], device=a.device)
        at_end = a[rows, torch.tensor(ends[s:s + a.shape[0]], device=a.device)]
        real = a[mask.bool()]
        cand[li] += _candidate_counts(real, top_frac).cpu()
        end_cand[li] += _candidate_counts(at_end, top_frac).cpu()
        abs_sum[li] += real.double().sum(0).cpu()

    _down_inputs(runner, prompts, layers, take, batch_size, "unrelated prompts", False)
    return GenericStats(top_frac, len(prompts), sum(map(len, prompts)), cand, end_cand, abs_sum)


def item_activations(runner: ModelRunner, items: list[TrainItem], batch_size: int = 16,
                     progress: bool = False, continuation: bool = True
                     ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Activations at the last prompt token and (``continuation``) at each position that predicts
    a later target token -> (``[L, n_obs, I]``, ``[(item, target position), ...]``; position 0 =
    the last prompt token)."""
    seqs = [list(it.prompt_ids) + list(it.target_ids[:-1]) for it in items]
    depth = [len(it.target_ids) if continuation else 1 for it in items]
    positions = [[len(it.prompt_ids) - 1 + j for j in range(d)] for it, d in zip(items, depth)]
    obs = [(i, j) for i, d in enumerate(depth) for j in range(d)]
    return activations_at(runner, seqs, positions, batch_size, progress), obs


def _top_k(top_frac: float, width: int) -> int:
    """How many of a layer's ``width`` neurons its top ``top_frac`` holds (at least one)."""
    return max(1, int(round(top_frac * width)))


def candidates(acts: torch.Tensor, top_frac: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (candidate mask ``[L, n, I]``, |activation| / the layer's k-th largest, same shape)."""
    top = acts.topk(_top_k(top_frac, acts.shape[-1]), dim=-1)
    mask = torch.zeros_like(acts, dtype=torch.bool).scatter_(-1, top.indices, True)
    kth = top.values[..., -1:].clamp_min(1e-12)
    return mask, acts / kth


def _shared(mask: torch.Tensor, share: float) -> torch.Tensor:
    """Neurons that are candidates for at least ``share`` of the prompts: ``[L, n, I]`` -> ``[L, I]``."""
    return _often(mask.sum(1), mask.shape[1], share)


def _often(counts: torch.Tensor, n: int, share: float) -> torch.Tensor:
    """Neurons whose candidate ``counts`` reach ``share`` of ``n``: ``[L, I]`` -> ``[L, I]``."""
    return counts >= max(1, math.ceil(share * n - 1e-9))


def _most_consistent(cons: torch.Tensor, strength: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` neurons ranked first by consistency (the share of prompts they are a
    candidate for), then by strength."""
    order = strength.argsort(descending=True, stable=True)
    order = order[cons[order].argsort(descending=True, stable=True)]
    return order[:k]


def locate_neurons(acts: torch.Tensor, items: list[TrainItem], n_facts: int, config: LocateConfig,
                   generic: GenericStats | None = None, obs: list[tuple[int, int]] | None = None
                   ) -> tuple[list[dict[int, list[int]]], dict]:
    """Per fact ``{layer: [neuron, ...]}`` from activations ``[L, n_obs, I]`` (``generic``: the
    unrelated prompts' ``GenericStats``, made with ``config.top_frac``) and the location report.

    ``obs`` names each observation ``(item, j)``: ``j = 0`` is the last prompt token (the LAFN rule,
    across languages and paraphrases); ``j >= 1`` the position predicting target token ``j``, located
    the same way over the pairs whose target is that long (with ``config.continuation``), so
    multi-token targets get the neurons that carry their continuation too. Without ``obs`` each
    column is one item's last prompt token.
    """
    if obs is None:
        obs = [(i, 0) for i in range(len(items))]
    config.validate()
    if generic is not None and generic.top_frac != config.top_frac:
        raise ValueError(f"the unrelated prompts' stats count top_frac {generic.top_frac} "
                         f"candidates, the location asks for {config.top_frac}")
    n_layers = acts.shape[0]
    first = int(math.floor(config.min_layer * n_layers))
    mask, rel = candidates(acts, config.top_frac)
    mask[:first] = False
    banned = torch.zeros(acts.shape[0], acts.shape[2], dtype=torch.bool)
    if generic is not None and config.generic_share is not None and generic.positions:
        banned = _often(generic.candidates, generic.positions, config.generic_share)
    n_generic = int(banned.sum())
    if generic is not None and config.form_share is not None and generic.prompts:
        banned |= _often(generic.end_candidates, generic.prompts, config.form_share)
    selectivity = config.selectivity_for(n_facts)
    if selectivity > 0 and generic is not None and generic.positions:
        usual = generic.mean_abs.unsqueeze(1).clamp_min(1e-6)  # [L, 1, I]
        rel = rel.clamp_min(1e-12) ** (1 - selectivity) * (acts / usual) ** selectivity
    per_fact: list[dict[int, list[int]]] = []
    fact_rows = []
    overlap: dict[str, list[float]] = {}
    for fi in range(n_facts):
        idx = [k for k, (i, j) in enumerate(obs) if items[i].fact == fi and j == 0]
        if not idx:
            per_fact.append({})
            fact_rows.append({"neurons": 0, "prompts": 0, "generic_dropped": 0})
            continue
        m = mask[:, idx]
        sel = _shared(m, config.share)
        n_first = int((sel & ~banned).sum())
        cons, strength = m.float().mean(1), rel[:, idx].mean(1)  # [L, I] each
        depth = max(j for i, j in obs if items[i].fact == fi) if config.continuation else 0
        for j in range(1, depth + 1):  # continuation positions of multi-token targets
            jdx = [k for k, (i, jj) in enumerate(obs) if items[i].fact == fi and jj == j]
            sel |= _shared(mask[:, jdx], config.share)
            cons_j, strength_j = mask[:, jdx].float().mean(1), rel[:, jdx].mean(1)
            better = (cons_j > cons) | ((cons_j == cons) & (strength_j > strength))
            cons = torch.where(better, cons_j, cons)
            strength = torch.where(better, strength_j, strength)
        dropped = int((sel & banned).sum())
        sel &= ~banned
        fallback = config.fallback and int(sel.sum()) < config.min_neurons
        if fallback:  # too few shared neurons survive the bans: the most consistent candidates
            sel = m.any(1) & ~banned
        li, ni = sel.nonzero(as_tuple=True)
        cap = config.budget(max(len(items[obs[k][0]].target_ids) for k in idx), n_facts)
        if cap is not None and li.numel() > cap:
            keep = _most_consistent(cons[li, ni], strength[li, ni], cap)
            li, ni = li[keep], ni[keep]
        chosen: dict[int, list[int]] = {}
        for a, b in sorted(zip(li.tolist(), ni.tolist())):
            chosen.setdefault(a, []).append(b)
        per_fact.append(chosen)
        # languages: each one's own shared set, and how much the sets overlap
        langs = list(dict.fromkeys(items[obs[k][0]].lang for k in idx))
        sets = {}
        for lang in langs:
            li_ = [k for k in idx if items[obs[k][0]].lang == lang]
            s = _shared(mask[:, li_], config.share) & ~banned
            sets[lang] = set(map(tuple, s.nonzero().tolist()))
        for a in range(len(langs)):
            for b in range(a + 1, len(langs)):
                sa, sb = sets[langs[a]], sets[langs[b]]
                j = len(sa & sb) / len(sa | sb) if sa | sb else 0.0
                overlap.setdefault(f"{langs[a]}-{langs[b]}", []).append(j)
        fact_rows.append({"neurons": int(li.numel()), "prompts": len(idx),
                          "last_token_neurons": n_first,
                          "per_lang": {lang: len(s) for lang, s in sets.items()},
                          "generic_dropped": dropped,
                          "fallback": fallback,
                          "layers": {str(k): len(v) for k, v in chosen.items()}})
    hist = [0] * n_layers
    for chosen in per_fact:
        for layer, ns in chosen.items():
            hist[layer] += len(ns)
    counts = [r["neurons"] for r in fact_rows]
    report = {
        "config": asdict(config),
        "selectivity": selectivity,
        "layers": n_layers,
        "layer_histogram": hist,
        "neurons_total": sum(counts),
        "neurons_per_fact": {"mean": sum(counts) / max(1, len(counts)), "min": min(counts, default=0),
                             "max": max(counts, default=0)},
        "facts_without_neurons": sum(1 for c in counts if c == 0),
        "generic_neurons": n_generic,
        "form_neurons": int(banned.sum()) - n_generic,
        "language_overlap_jaccard": {k: sum(v) / len(v) for k, v in overlap.items()},
        "facts": fact_rows,
    }
    return per_fact, report


def run_and_locate(runner: ModelRunner, items: list[TrainItem], n_facts: int, config: LocateConfig,
                   kl_prompts: list[list[int]] | None = None, kl_ends: list[int] | None = None,
                   progress: bool = False, known: GenericStats | None = None
                   ) -> tuple[list[dict[int, list[int]]], dict]:
    """Run the training and unrelated prompts and locate -> ``(per_fact, report)`` (``kl_ends``
    as in ``locate``). ``known``: ``generic_stats`` of the first ``known.prompts`` unrelated
    prompts, already made (a caller that edits one unedited model many times); only the rest
    are run."""
    acts, obs = item_activations(runner, items, config.batch_size, progress, config.continuation)
    generic = None
    if kl_prompts:
        if known is not None and (known.prompts > len(kl_prompts) or known.positions != sum(
                len(p) for p in kl_prompts[:known.prompts]) or known.top_frac != config.top_frac):
            raise ValueError(f"the known stats ({known.prompts} prompts, {known.positions} "
                             f"positions, top_frac {known.top_frac}) are not the first prompts'")
        covered = known.prompts if known is not None else 0
        rest = kl_prompts[covered:]
        run = (generic_stats(runner, rest, None if kl_ends is None else kl_ends[covered:],
                             config.top_frac, config.batch_size) if rest else None)
        generic = run if known is None else known if run is None else known + run
    return locate_neurons(acts, items, n_facts, config, generic, obs)


def locate(model, tokenizer, items: list[TrainItem], n_facts: int, config: LocateConfig,
           kl_prompts: list[list[int]] | None = None, progress: bool = False,
           kl_ends: list[int] | None = None) -> tuple[list[dict[int, list[int]]], dict]:
    """Run the training prompts (and unrelated prompts) and locate each fact's neurons.

    ``kl_ends``: the position where each unrelated prompt's own text ends, when a continuation is
    appended to it (as ``lafn_edit`` does); default: its last token."""
    per_fact, report = run_and_locate(ModelRunner(model, tokenizer), items, n_facts, config,
                                      kl_prompts, kl_ends, progress)
    report["model"] = get_adapter(model).describe()
    return per_fact, report

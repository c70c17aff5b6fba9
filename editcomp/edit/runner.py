"""Running a model for an editor: logits at chosen positions only, and a prefix cache (the input
rows themselves: layout.py).

Editors change FFN weights in layers ``>= start`` only, so the residual stream entering layer
``start`` is the same at every optimisation step: ``TrainBatch.prepare`` computes it once and every step
re-runs only the upper layers (lower layers are swapped for pass-through modules for the duration of
the call). Logits are computed only where a loss needs them: a model with a 262k vocabulary would
otherwise spend most of a step in the output projection.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from editcomp.arch import get_adapter
from editcomp.data import pad_id
from editcomp.edit.layout import packed, right_pad
from editcomp.errors import ConfigError
from editcomp.eval.perplexity import model_device


def _layout(runner: ModelRunner, seqs: list[list[int]], pack: int | None):
    """``packed`` rows when ``pack`` is set and one mask can serve every layer (no sequence longer
    than a sliding window), else one padded row per sequence -> (ids, mask, position ids or None,
    each sequence's ``(row, offset)``)."""
    if pack is None or (runner.window is not None and max(map(len, seqs)) > runner.window):
        ids, mask = right_pad(seqs, runner.pad, runner.device)
        return ids, mask, None, [(i, 0) for i in range(len(seqs))]
    return packed(seqs, pack, runner.pad, runner.device, runner.dtype)


class _PassThrough(nn.Module):
    """Stands in for a decoder layer whose output is already in the cached residual stream."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _layer_list(adapter) -> nn.ModuleList:
    """The ModuleList that holds the decoder layers, found by identity (no module names)."""
    first = adapter.layer(0).module
    for mod in adapter.decoder.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == adapter.num_layers and mod[0] is first:
            return mod
    raise RuntimeError("the decoder's layer list was not found")


class ModelRunner:
    """Forward passes over padded batches, returning logits only at the requested positions."""

    def __init__(self, model, tokenizer):
        self.model, self.adapter = model, get_adapter(model)
        self.pad, self.device = pad_id(tokenizer), model_device(model)
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self._layers = _layer_list(self.adapter)
        # the attention window of a family with sliding-window layers (None: every layer sees all)
        self.window = getattr(model.config, "sliding_window", None)
        self.dtype = self.adapter.lm_head.weight.dtype  # the model's float dtype
        self.vocab_size = self.adapter.lm_head.weight.shape[0]

    def head(self, hidden: torch.Tensor, vocab: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states -> logits (with the family's final soft-capping, if any);
        with ``vocab`` (token ids) only those columns, in that order."""
        lm = self.adapter.lm_head
        if vocab is None:
            logits = lm(hidden).float()
        else:
            bias = lm.bias[vocab] if lm.bias is not None else None
            logits = torch.nn.functional.linear(hidden, lm.weight[vocab], bias).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def head_rows(self, hidden: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """Logits of row ``n`` of ``hidden`` ``[N, H]`` at its own token ids ``ids[n]`` -> ``[N, K]``:
        the output rows are gathered, so the cost is ``N * K`` dot products, not the vocabulary.
        ``rows``: those output rows already gathered (``out_rows(ids)``)."""
        lm = self.adapter.lm_head
        if rows is None:
            rows = self._gather_rows(ids)
        logits = torch.bmm(hidden.unsqueeze(1).to(rows.dtype), rows).squeeze(1)
        if lm.bias is not None:
            logits = logits + lm.bias[ids]
        logits = logits.float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def out_rows(self, ids: torch.Tensor, budget: int) -> torch.Tensor | None:
        """The output layer's rows of token ids ``ids`` ``[N, K]``, laid out as ``head_rows``'s
        batched matmul reads them: ``[N, H, K]``, contiguous, in the dtype matmuls run in now
        (``matmul_dtype``); None when they would take more than ``budget`` bytes (``head_rows``
        then gathers them at each call). Rows kept as gathered (``[N, K, H]``, fp32) cost a
        transposing, casting copy of every value at each call: 6 ms of a 160 ms smollm2 step."""
        weight = self.adapter.lm_head.weight
        if ids.numel() * weight.shape[1] * self.matmul_dtype().itemsize > budget:
            return None
        return self._gather_rows(ids)

    def _gather_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """``out_rows``'s rows whatever their size (one function: kept and gathered rows score
        alike to the bit)."""
        return (self.adapter.lm_head.weight.detach()[ids].transpose(-1, -2)
                .to(self.matmul_dtype()).contiguous())

    def matmul_dtype(self) -> torch.dtype:
        """The dtype this model's matmuls run in at this point: the autocast dtype inside an
        autocast block on its device, else the model's own."""
        kind = self.device.type
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else self.dtype

    @contextlib.contextmanager
    def _skip_below(self, start: int):
        saved = [self._layers[i] for i in range(start)]
        try:
            for i in range(start):
                self._layers[i] = _PassThrough()
            yield
        finally:
            for i, mod in enumerate(saved):
                self._layers[i] = mod

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor, start: int = 0,
               cached: torch.Tensor | None = None, pos: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states ``[B, T, H]``; with ``cached`` (the residual stream entering
        layer ``start``) only layers ``>= start`` run. ``mask``: ``[B, T]`` padding, or a prepared
        ``[B, 1, T, T]`` additive mask with its position ids ``pos`` (``packed``)."""
        if cached is None or start == 0:
            out = self.adapter.decoder(input_ids=ids, attention_mask=mask, position_ids=pos,
                                       use_cache=False)
            return out.last_hidden_state
        with self._skip_below(start):
            out = self.adapter.decoder(inputs_embeds=cached, attention_mask=mask, position_ids=pos,
                                       use_cache=False)
        return out.last_hidden_state

    def layer_input(self, ids: torch.Tensor, mask: torch.Tensor, start: int,
                    pos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One no-gradient pass -> (residual stream entering layer ``start``, for ``hidden(cached=)``;
        final-normed hidden states)."""
        box = {}

        def grab(mod, args, kwargs):
            box["h"] = (args[0] if args else kwargs["hidden_states"]).detach()

        h = self.adapter.layer(start).module.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                out = self.adapter.decoder(input_ids=ids, attention_mask=mask, position_ids=pos,
                                           use_cache=False)
        finally:
            h.remove()
        return box["h"], out.last_hidden_state


def gather_positions(hidden: torch.Tensor, rows: list[int], cols: list[int]) -> torch.Tensor:
    """``hidden[rows[i], cols[i]]`` for every i -> ``[N, H]``."""
    r = torch.tensor(rows, dtype=torch.long, device=hidden.device)
    c = torch.tensor(cols, dtype=torch.long, device=hidden.device)
    return hidden[r, c]


ROW_CACHE = 64 << 20  # TrainBatch's default ``row_cache`` (bytes): a single edit's rows fit


class TrainBatch:
    """A padded batch of (prompt, target) sequences and unrelated (KL) prompts, with the positions
    the losses read: each target token is predicted at the position before it; KL prompts are
    compared at every position after their first token.

    ``kl_vocab``: the KL compares the unedited and edited next-token distributions renormalized
    over the unedited model's ``kl_vocab`` most likely tokens *at that position* plus every edit
    target token (None: the full vocabulary). A 262k-token output layer at every KL position is
    otherwise most of an edit step's time; the tokens that matter for keeping unrelated answers are
    the ones the model already ranks high and the ones the edit pushes up. Each position's own
    top tokens are gathered (``N x k`` output rows), so the cost does not grow with the union
    of all positions' top tokens (up to N * k columns, most of a step with a shared vocabulary).

    ``nll_vocab``: the target NLL's softmax runs over the target and the ``nll_vocab`` tokens the
    model currently ranks highest at that position (None: the full vocabulary). Reading a 262k x
    640 output matrix forward and backward is most of a single edit's step even for a dozen target
    tokens; the normalizer is dominated by the top tokens, and ``optimize`` checks the stopping
    rule with the full vocabulary and refreshes the candidates (``refresh``) before it stops.

    ``pack``: lay the sequences end to end in rows of at most that many tokens (``packed``)
    instead of one padded row each (None). Its one mask serves every layer, so a model with
    sliding-window layers is packed only while no sequence is longer than the window.

    ``kl_top``: per KL prompt, its top tokens already known (``top_next_tokens`` of the unedited
    model, at least ``kl_vocab`` wide) or None; ``prepare`` then skips the full output layer
    there, most of its time for a single edit.

    ``row_cache``: bytes: the output rows of the KL's top tokens and of the NLL's candidates are
    gathered once (when each set is made) if they fit, instead of at every step. Gathering them
    from a 262k x 640 output matrix is scattered reads of ~30 MB a step for a single edit; a batch
    of many facts has too many rows to keep (the default fits a single edit).

    ``prompt_last``: every target token is scored at the prompt's last position instead of the
    position before it (the target is not fed in): EasyEdit's FT-L objective
    (``objective_optimization: prompt_last``, from ROME's FT baseline). A pair's NLL is then the
    mean over its target tokens of -log p(token | prompt), and a multi-token target cannot have
    every token as the argmax there."""

    def __init__(self, runner: ModelRunner, pairs: list[tuple[list[int], list[int]]],
                 kl_prompts: list[list[int]], kl_vocab: int | None = None,
                 nll_vocab: int | None = None, pack: int | None = None,
                 kl_top: list[torch.Tensor | None] | None = None, row_cache: int = ROW_CACHE,
                 prompt_last: bool = False):
        fed = [list(p) if prompt_last else list(p) + list(t[:-1]) for p, t in pairs]
        seqs = fed + [list(p) for p in kl_prompts]
        # pos: the position ids of a packed batch (None: padded)
        self.ids, self.mask, self.pos, where = _layout(runner, seqs, pack)
        self.n_pairs, self.n_kl = len(pairs), len(kl_prompts)
        self.rows, self.cols, self.labels, self.owner = [], [], [], []
        for i, (p, t) in enumerate(pairs):
            row, at = where[i]
            for j, tok in enumerate(t):
                self.rows.append(row)
                self.cols.append(at + len(p) - 1 + (0 if prompt_last else j))
                self.labels.append(int(tok))
                self.owner.append(i)
        # KL at every position of the unrelated prompts (after the first token): the located
        # neurons also fire inside ordinary text, not only at a question's last token
        kl_where = where[len(pairs):]
        self.kl_rows = [r for (r, _), p in zip(kl_where, kl_prompts) for _ in range(1, len(p))]
        self.kl_cols = [at + c for (_, at), p in zip(kl_where, kl_prompts) for c in range(1, len(p))]
        dev = runner.device
        self.labels_t = torch.tensor(self.labels, dtype=torch.long, device=dev)
        self.owner_t = torch.tensor(self.owner, dtype=torch.long, device=dev)
        self.kl_vocab = kl_vocab
        self.top: torch.Tensor | None = None     # each KL position's top token ids [N, k] (None: all)
        self.row_cache = row_cache
        self.top_rows: torch.Tensor | None = None  # their output rows [N, H, k] (None: not kept)
        self.targets = self.labels_t.unique()    # edit target ids, compared at every KL position
        self.dup: torch.Tensor | None = None     # [N, n_targets]: a target already in that row's top
        self.nll_vocab = nll_vocab
        self.cand: torch.Tensor | None = None    # [n_tokens, 1 + nll_vocab]: the target, then rivals
        self.cand_dup: torch.Tensor | None = None  # a rival that is the target itself
        self.cand_rows: torch.Tensor | None = None  # their output rows (None: not kept)
        self.nll_start: torch.Tensor | None = None  # exact NLL per pair before any update
        self.cached: torch.Tensor | None = None
        self.kl_ref: torch.Tensor | None = None  # log-probs of the unedited model at the KL positions
        # each KL position's given top tokens (a row of ``kl_top``) or None: found by ``prepare``
        given = kl_top if kl_top is not None else [None] * len(kl_prompts)
        if len(given) != len(kl_prompts):
            raise ValueError(f"kl_top has {len(given)} entries for {len(kl_prompts)} KL prompts")
        self.kl_given = [None if t is None else t[c - 1] for t, p in zip(given, kl_prompts)
                         for c in range(1, len(p))]

    def losses(self, runner: ModelRunner, start: int, full: bool = False, keep_logits: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (mean target NLL per pair ``[n_pairs]``, KL per KL-prompt position, target hit
        per token ``[n_tokens]``), running layers ``>= start`` on the cached stream; ``full``: the
        NLL and hits over the whole vocabulary, not the candidates (``keep_logits``: and keep those
        logits in ``self.full_logits``)."""
        h = runner.hidden(self.ids, self.mask, start, self.cached, self.pos)
        nll = h.new_zeros(self.n_pairs)
        hits = torch.zeros(0, dtype=torch.bool)
        if self.rows:
            ht = gather_positions(h, self.rows, self.cols)
            if self.cand is None or full:
                logits = runner.head(ht)
                tok_nll = torch.nn.functional.cross_entropy(logits, self.labels_t, reduction="none")
                hits = (logits.argmax(-1) == self.labels_t).detach().cpu()
                if keep_logits:
                    self.full_logits = logits.detach()
            else:  # column 0 is the target
                logits = runner.head_rows(ht, self.cand, self.cand_rows)
                logits = torch.cat([logits[:, :1], logits[:, 1:].masked_fill(self.cand_dup, -1e4)], -1)
                tok_nll = -torch.log_softmax(logits, -1)[:, 0]
                hits = (logits.argmax(-1) == 0).detach().cpu()
            nll = self._per_pair(tok_nll)
        kl = h.new_zeros(len(self.kl_rows))
        if self.kl_rows and self.kl_ref is not None:
            logp = torch.log_softmax(self._kl_logits(runner, gather_positions(h, self.kl_rows,
                                                                              self.kl_cols)), -1)
            kl = (self.kl_ref.exp() * (self.kl_ref - logp)).sum(-1)
        return nll, kl, hits

    def _kl_logits(self, runner: ModelRunner, hidden: torch.Tensor) -> torch.Tensor:
        """Logits at the KL positions over each one's own top tokens, then the edit targets (a
        target already among a row's top tokens is -1e4 there, probability 0: each token counts once)."""
        if self.top is None:
            return runner.head(hidden)
        return torch.cat([runner.head_rows(hidden, self.top, self.top_rows),
                          runner.head(hidden, self.targets).masked_fill(self.dup, -1e4)], -1)

    def _per_pair(self, tok_nll: torch.Tensor) -> torch.Tensor:
        count = torch.zeros(self.n_pairs, device=tok_nll.device).index_add_(
            0, self.owner_t, torch.ones_like(tok_nll))
        return torch.zeros(self.n_pairs, device=tok_nll.device).index_add_(
            0, self.owner_t, tok_nll) / count

    def _set_candidates(self, runner: ModelRunner, logits: torch.Tensor) -> None:
        """The NLL's rivals: the ``nll_vocab`` highest of full-vocabulary ``logits`` per target token."""
        if self.nll_vocab is None or self.nll_vocab >= logits.shape[-1] or not self.rows:
            return
        top = logits.topk(self.nll_vocab, dim=-1).indices
        self.cand = torch.cat([self.labels_t[:, None], top], -1)
        self.cand_dup = top == self.labels_t[:, None]
        self.cand_rows = runner.out_rows(self.cand, self.row_cache)

    @torch.no_grad()
    def refresh(self, runner: ModelRunner, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The exact losses (full vocabulary) at the current weights, and new NLL candidates from
        them: the tokens an update has pushed up since the last refresh become rivals too."""
        out = self.losses(runner, start, full=True, keep_logits=True)
        if self.rows:
            self._set_candidates(runner, self.full_logits)
            self.full_logits = None
        return out

    def prepare(self, runner: ModelRunner, start: int) -> None:
        """Cache the residual stream entering ``start``, the unedited KL distributions, the NLL
        candidates and the exact starting NLL (one pass)."""
        cached, h = runner.layer_input(self.ids, self.mask, start, self.pos)
        self.cached = cached if start > 0 else None
        if self.rows:
            with torch.no_grad():
                logits = runner.head(gather_positions(h, self.rows, self.cols))
                self.nll_start = self._per_pair(torch.nn.functional.cross_entropy(
                    logits, self.labels_t, reduction="none")).cpu()
                self._set_candidates(runner, logits)
        if self.kl_rows:
            with torch.no_grad():
                hk = gather_positions(h, self.kl_rows, self.kl_cols)
                if self.kl_vocab is not None and self.kl_vocab < runner.vocab_size:
                    self.top = self._top_tokens(runner, hk)
                    self.top_rows = runner.out_rows(self.top, self.row_cache)
                    self.dup = (self.top[:, :, None] == self.targets[None, None]).any(1)
                    logits = self._kl_logits(runner, hk)
                else:
                    logits = runner.head(hk)
                self.kl_ref = torch.log_softmax(logits, -1).detach()

    def _top_tokens(self, runner: ModelRunner, hk: torch.Tensor) -> torch.Tensor:
        """Each KL position's ``kl_vocab`` top tokens: given ones (``kl_top``), the rest from the
        full output layer at ``hk``."""
        have = [t is not None and len(t) >= self.kl_vocab for t in self.kl_given]
        top = torch.empty(len(have), self.kl_vocab, dtype=torch.long, device=hk.device)
        if not all(have):
            at = torch.tensor([r for r, h in enumerate(have) if not h], device=hk.device)
            top[at] = runner.head(hk[at]).topk(self.kl_vocab, dim=-1).indices
        if any(have):
            at = torch.tensor([r for r, h in enumerate(have) if h], device=hk.device)
            top[at] = torch.stack([t[:self.kl_vocab] for t, h in zip(self.kl_given, have)
                                   if h]).to(hk.device)
        return top


@contextlib.contextmanager
def frozen(model):
    """No parameter of ``model`` collects gradients for the block (editors train their own tensors)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def attention_kernel(model, name: str | None):
    """The block runs ``model``'s attention with ``name`` ("eager", "sdpa", ...; None: unchanged).

    An edit's update steps run a few hundred short tokens; there PyTorch's CPU flash-attention
    backward costs ~5 ms a call and was a fifth of a smollm2-135m step, while the eager kernel's
    small matmuls cost almost nothing. An unknown name is a ``ConfigError``."""
    old = getattr(model.config, "_attn_implementation", None)
    if name is None or old is None or name == old:  # None: a model without a choice of kernel
        yield
        return
    try:
        model.set_attn_implementation(name)
    except (ValueError, ImportError) as e:
        raise ConfigError(f"attention kernel {name!r}: {e}") from None
    try:
        yield
    finally:
        model.set_attn_implementation(old)


@contextlib.contextmanager
def weights_held_as(runner: ModelRunner, start: int, dtype: torch.dtype | None):
    """For the block, the plain ``nn.Linear`` weights of layers ``>= start`` are ``dtype`` copies
    (None: unchanged); the original parameters come back afterwards, untouched.

    Under bf16 autocast every matmul casts its fp32 weight again, forward and backward (autocast
    caches the casts of tensors that need a gradient only, and the model is frozen), so a step
    of an edit re-reads and converts each re-run layer's weights several times. Holding bf16
    copies gives the same results (autocast would compute with exactly these values)."""
    swapped = []
    try:
        if dtype is not None:
            for i in range(start, runner.adapter.num_layers):
                for mod in runner.adapter.layer(i).module.modules():
                    if type(mod) is nn.Linear and mod.weight.dtype != dtype:
                        swapped.append((mod, mod.weight))
                        mod.weight = nn.Parameter(mod.weight.detach().to(dtype), requires_grad=False)
        yield
    finally:
        for mod, weight in swapped:
            mod.weight = weight


def build_batches(runner: ModelRunner, pairs: list[tuple[list[int], list[int]]],
                  kl_prompts: list[list[int]], batch_size: int, kl_vocab: int | None = None,
                  kl_groups: int = 1, nll_vocab: int | None = None, pack: int | None = None,
                  kl_top: list[torch.Tensor | None] | None = None, row_cache: int = ROW_CACHE,
                  prompt_last: bool = False) -> list[TrainBatch]:
    """Pairs in chunks of ``batch_size`` (similar lengths together), each with a share of the KL
    prompts: they are dealt into ``kl_groups`` groups (every ``kl_groups``-th prompt, so each group
    mixes the languages) and batch ``b`` carries group ``b % kl_groups``. With fewer chunks than
    groups the chunks repeat, so one optimizer round still sees every KL prompt once: the KL term
    is then a rotating sample, and a step runs ``1 / kl_groups`` of the unrelated tokens.
    ``pack``, ``kl_top`` (one per KL prompt), ``row_cache`` (bytes per batch), ``prompt_last``:
    see ``TrainBatch``."""
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    chunks = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if not chunks:
        return []
    groups = max(1, min(kl_groups, len(kl_prompts)))
    kl_sets = [kl_prompts[g::groups] for g in range(groups)]
    tops = kl_top if kl_top is not None else [None] * len(kl_prompts)
    top_sets = [tops[g::groups] for g in range(groups)]
    n = max(len(chunks), groups) if kl_prompts else len(chunks)
    return [TrainBatch(runner, [pairs[i] for i in chunks[b % len(chunks)]], kl_sets[b % groups],
                       kl_vocab, nll_vocab, pack, top_sets[b % groups], row_cache, prompt_last)
            for b in range(n)]


@torch.no_grad()
def top_next_tokens(runner: ModelRunner, seqs: list[list[int]], k: int, batch_size: int = 16
                    ) -> list[torch.Tensor]:
    """Each sequence's ``k`` most likely next tokens at every position after its first ->
    ``[len - 1, k]`` per sequence (``TrainBatch``'s ``kl_top``): the KL term's vocabulary at
    those positions, made once for unrelated prompts that many edits of one model share."""
    out = []
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s:s + batch_size]
        ids, mask = right_pad(chunk, runner.pad, runner.device)
        h = runner.hidden(ids, mask)
        out += [runner.head(h[b, 1:len(p)]).topk(min(k, runner.vocab_size), dim=-1).indices.cpu()
                for b, p in enumerate(chunk)]
    return out

"""Incremental decoding with a KV cache: one step (``next_logits``, also the distillation's
data-free sampler's) and nucleus sampling of many continuations of one prompt
(``sample_continuations``, questions.py's unrelated questions).

transformers 5.x names the cache argument and output field ``cache``; earlier versions named
them ``past_key_values``.
"""

from __future__ import annotations

import inspect

import torch


def next_logits(model, ids, cache=None):
    """``(logits, cache)``: the logits that follow each row's last token of ``ids`` ``[batch,
    vocab]``, and the cache that now holds ``ids`` after what ``cache`` held (None: nothing)."""
    kwargs = {_cache_argument(model): cache} if cache is not None else {}
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs)
    return out.logits[:, -1], out.get("cache", None) or out.get("past_key_values", None)


def _cache_argument(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def nucleus_pick(probs: torch.Tensor, top_p: float, u: torch.Tensor, first_k: int = 1024
                 ) -> torch.Tensor:
    """One token per row of ``probs`` ``[n, vocab]``, drawn by inverse CDF at ``u`` ``[n]`` (uniform
    in [0, 1)) from the row's nucleus: the fewest most likely tokens whose mass reaches ``top_p``,
    the set transformers' ``TopPLogitsWarper`` keeps. Only the top ``first_k`` tokens are sorted
    unless a row's nucleus is larger, then 4x as many until every row's is covered: the same
    nucleus as a sort of gemma3's 262k-token vocabulary, which took a quarter of sampling's time."""
    vocab = probs.shape[-1]
    k = min(first_k, vocab)
    while True:
        top, idx = probs.topk(k, dim=-1)
        cum = top.cumsum(-1)
        if k == vocab or bool((cum[:, -1] >= top_p).all()):
            break
        k = min(4 * k, vocab)
    mass = (top * ((cum - top) < top_p)).cumsum(-1)
    pick = torch.searchsorted(mass, (u.to(mass) * mass[:, -1]).unsqueeze(1), right=True)
    return idx.gather(1, pick.clamp(max=k - 1)).squeeze(1)


@torch.no_grad()
def sample_continuations(model, ids: torch.Tensor, n: int, max_new_tokens: int, stop: list[int],
                         top_p: float = 0.95) -> list[list[int]]:
    """``n`` continuations of the one prompt ``ids`` ``[1, length]``, sampled from the nucleus
    (``nucleus_pick``, temperature 1), each up to and including its first ``stop`` token or
    ``max_new_tokens`` long. The prompt runs once and its cache is repeated for the ``n`` rows
    (``generate(num_return_sequences=n)`` runs it n times: 128 gemma3-270m questions took ~150 s,
    mostly that); a row that stops leaves the batch. Draws ``n`` uniforms from the global RNG
    per step, so a row's tokens do not depend on when the others stop."""
    logits, cache = next_logits(model, ids)
    cache.batch_repeat_interleave(n)
    logits = logits.float().expand(n, -1)
    rows = torch.arange(n)
    stop_ids = torch.tensor(stop, dtype=torch.long, device=ids.device)
    seqs: list[list[int]] = [[] for _ in range(n)]
    for step in range(max_new_tokens):
        u = torch.rand(n)[rows]
        nxt = nucleus_pick(torch.softmax(logits, -1), top_p, u)
        for r, t in zip(rows.tolist(), nxt.tolist()):
            seqs[r].append(t)
        going = ~torch.isin(nxt, stop_ids)
        if step == max_new_tokens - 1 or not bool(going.any()):
            break
        if not bool(going.all()):
            cache.batch_select_indices(going.nonzero().squeeze(1))
            rows, nxt = rows[going.cpu()], nxt[going]
        logits, cache = next_logits(model, nxt[:, None], cache)
        logits = logits.float()
    return seqs

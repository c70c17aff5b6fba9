"""One step of incremental decoding with a KV cache, for the samplers that write text
(questions.py's unrelated questions, the distillation's data-free sequences).

transformers 5.x names the cache argument and output field ``cache``; earlier versions named
them ``past_key_values``.
"""

from __future__ import annotations

import inspect


def next_logits(model, ids, cache=None):
    """``(logits, cache)``: the logits that follow each row's last token of ``ids`` ``[batch,
    vocab]``, and the cache that now holds ``ids`` after what ``cache`` held (None: nothing)."""
    kwargs = {_cache_argument(model): cache} if cache is not None else {}
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs)
    return out.logits[:, -1], out.get("cache", None) or out.get("past_key_values", None)


def _cache_argument(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

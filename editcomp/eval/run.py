"""One call that evaluates a loaded checkpoint the way the CLI, recipes and benchmarks report it."""

from __future__ import annotations

import time

from editcomp.checkpoint import Checkpoint


def evaluate(ck: Checkpoint, text=None, seq_len: int = 2048, max_windows=None, facts=None,
             langs=None, reference=None, teacher=None, device=None, dtype=None,
             progress: bool = True) -> dict:
    """Perplexity on ``text``, edit metrics on ``facts``, KL to ``teacher``: whichever are given.

    ``reference`` and ``teacher`` may be checkpoint paths/names or loaded ``Checkpoint``s.
    """
    from editcomp import checkpoint
    from editcomp.data import token_windows
    from editcomp.eval import edit_metrics, kl_to_teacher, locality_reference, perplexity

    result: dict = {"checkpoint": str(ck.path) if ck.path else None,
                    "weights_sha256": ck.weights_sha256, "lineage": ck.history}
    windows = None
    if text:
        windows = token_windows(ck.tokenizer, text, seq_len, max_windows)
        t0 = time.time()
        result["perplexity"] = dict(perplexity(ck.model, windows, progress=progress),
                                    seconds=time.time() - t0, text=str(text), seq_len=seq_len)
    if facts:
        ref = None
        if reference is not None:
            ref_ck = reference if isinstance(reference, Checkpoint) else checkpoint.load(
                reference, device=device, dtype=dtype)
            ref = locality_reference(ref_ck.model, ref_ck.tokenizer, facts)
        result["edit"] = edit_metrics(ck.model, ck.tokenizer, facts, langs=langs,
                                      reference=ref, progress=progress)
    if teacher is not None and windows is not None:
        t_ck = teacher if isinstance(teacher, Checkpoint) else checkpoint.load(
            teacher, device=device, dtype=dtype)
        result["kl"] = kl_to_teacher(ck.model, t_ck.model, windows, progress=progress)
    return result

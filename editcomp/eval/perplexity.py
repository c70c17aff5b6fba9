"""Perplexity over fixed token windows: the one quality number every checkpoint in a pipeline reports.

Architecture-agnostic: only ``model(input_ids=...)`` is called. The NLL is computed in chunks of
positions so a large vocabulary (49k-262k) never needs a second full fp32 copy of ``[L, vocab]``, and
summed in float64 so long evaluations do not lose precision.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from editcomp.errors import DataError

CHUNK = 512  # positions per log-softmax chunk


def model_device(model) -> torch.device:
    """The device the model's (first) parameters live on; inputs go there."""
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(*models):
    """Put models in eval mode (no dropout) for the block and restore their previous mode after."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, was in zip(models, modes):
            m.train(was)


def check_windows(windows) -> torch.Tensor:
    """Windows must be a 2-D integer tensor ``[n, L]`` with L >= 2 (one prediction at least)."""
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype not in (
            torch.long, torch.int32, torch.int64):
        raise DataError("token windows must be an integer tensor of shape [n, seq_len]")
    if windows.shape[0] < 1 or windows.shape[1] < 2:
        raise DataError(f"token windows have shape {tuple(windows.shape)}; need at least 1 window of 2 tokens")
    return windows.long()


def logits_of(model, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Full-sequence logits from any HF causal LM (``logits_to_keep`` defaults to all positions)."""
    return model(input_ids=input_ids, use_cache=False, **kwargs).logits


def nll_sum(logits: torch.Tensor, labels: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Sum of token NLLs for ``logits [T, V]`` predicting ``labels [T]``, in float64, chunked over T."""
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for s in range(0, labels.shape[0], chunk):
        ce = F.cross_entropy(logits[s:s + chunk].float(), labels[s:s + chunk], reduction="sum")
        total += ce.double()
    return total


def perplexity(model, windows: torch.LongTensor, batch_size: int = 1, progress: bool = True) -> dict:
    """exp(mean NLL) of predicting tokens 1..L-1 of every window from the tokens before them.

    Returns ``{"ppl", "nll", "tokens", "windows"}``; ``nll`` is the mean per-token NLL in nats.
    """
    windows = check_windows(windows)
    device = model_device(model)
    total = torch.zeros((), dtype=torch.float64, device=device)
    n, seq_len = windows.shape
    with eval_mode(model), torch.inference_mode():
        for batch in tqdm(windows.split(batch_size), desc="perplexity", unit="batch",
                          disable=not progress, leave=False):
            ids = batch.to(device)
            logits = logits_of(model, ids)
            for b in range(ids.shape[0]):
                total += nll_sum(logits[b, :-1], ids[b, 1:])
            del logits
    tokens = n * (seq_len - 1)
    nll = total.item() / tokens
    return {"ppl": float(torch.tensor(nll, dtype=torch.float64).exp()), "nll": nll,
            "tokens": tokens, "windows": n}

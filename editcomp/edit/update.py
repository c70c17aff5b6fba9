"""The update loop that both editors run (``optimize``): Adam on their own tensors over
``runner.TrainBatch`` steps, with the stopping rule, the lr schedule (growth for a fact edited
alone, cosine decay for facts edited together), the stall rule and ``keep_best``.

Kept apart from runner.py, which runs the model (truncated passes, chosen positions, packed
rows); this module decides when and how far to step.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from editcomp.edit.runner import ModelRunner, TrainBatch
from editcomp.errors import NumericalError


def optimize(runner: ModelRunner, batches: list[TrainBatch], params: list[torch.Tensor], start: int,
             steps: int, lr: float, kl_weight: float = 0.0, penalty=None, after_step=None,
             stop_nll: float | None = None, progress: bool = False, desc: str = "edit",
             nll_floor: float = 0.0, lr_growth: tuple[float, int] | None = None,
             stall: tuple[int, float] | None = None, lr_decay: bool = False,
             keep_best: bool = False) -> dict:
    """Adam on ``params``: mean target NLL + ``kl_weight`` * mean KL + ``penalty()``, one step per
    batch, cycling; stops early once every target token is the argmax and the mean NLL is below
    ``stop_nll`` (checked per round; when the batches score the NLL over candidates, confirmed
    with the full vocabulary, which also refreshes the candidates if it fails).

    ``nll_floor``: a pair whose NLL is below it is not pushed further (its NLL counts as the
    floor): facts edited together reach their targets at different steps, and the ones done
    early would otherwise keep growing their margin while the rest catch up. The stopping rule
    then reads ``max(stop_nll, nll_floor)``.

    ``lr_growth``: ``(factor, every)``: the lr is multiplied by ``factor`` after each ``every``
    steps. Adam moves each parameter about ``lr`` a step whatever its gradient, so an edit that
    needs large deltas descends its NLL at a constant pace; growing the lr shortens such edits
    and leaves the quick ones (stopped before the first growth) as they were.
    ``lr_decay``: the lr follows a cosine from ``lr`` down to 0 at ``steps``: Adam moves each
    parameter about ``lr`` a step however small its gradient, so a run that goes on after most of
    its pairs reached the floor keeps shifting the deltas at full pace; decaying lets it settle.
    ``stall``: ``(window, drop)``: stop once the best mean NLL of the last ``window`` steps is
    less than the fraction ``drop`` below the best before them (``stall_stopped`` in the
    result): an edit held short of its target by the KL and norm terms otherwise runs to
    ``steps`` for nothing.

    ``keep_best``: a run that ends without reaching the stopping rule (at ``steps``, or
    stalled) keeps the parameters of its best step after the first instead of its last: the
    most target tokens at the argmax, then the lowest loss. A growing lr can throw an edit out
    of a point where all but one token had landed, and the cap then writes the worse state.
    Only for a single batch (each step's losses then read the same pairs); ignored otherwise.

    -> ``{"steps", "stall_stopped", "best_step", "nll_start", "nll_end", "nll_end_max",
    "kl_end", "token_acc_end"}`` (``best_step``: the step whose parameters were kept, None: the
    last); a NaN/Inf loss is a ``NumericalError`` (the caller has written nothing yet).
    """
    for b in batches:
        b.prepare(runner, start)
    opt = torch.optim.Adam(params, lr=lr)
    last = [None] * len(batches)
    nll_start = None  # the mean target NLL of the first round
    step, exact, stalled, reached = 0, None, False, False
    keep_best = keep_best and len(batches) == 1
    best: tuple | None = None  # (score, step, parameters) of the best step so far
    trace: list[float] = []  # mean NLL after each round (the stall rule's)
    window = -(-stall[0] // len(batches)) if stall is not None else 0  # the stall rule's rounds
    if stop_nll is not None:
        stop_nll = max(stop_nll, nll_floor)
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress, leave=False)
    try:
        while step < steps:
            for bi, b in enumerate(batches):
                nll, kl, hits = b.losses(runner, start)
                loss = _fit(nll, kl, kl_weight, nll_floor)
                pen = penalty() if penalty is not None else None
                if pen is not None:
                    loss = loss + pen
                if not torch.isfinite(loss):
                    raise NumericalError(f"the edit loss became {loss.item()} at step {step}; "
                                         f"nothing was written (lower the learning rate)")
                last[bi] = (nll.detach().cpu(), kl.detach().cpu(), hits,
                            float(pen.detach()) if pen is not None else 0.0)
                if keep_best and step > 0:  # (the unedited start is no candidate)
                    score = _score(hits, loss)
                    if best is None or score > best[0]:
                        best = (score, step, [p.detach().clone() for p in params])
                if nll_start is None and bi == len(batches) - 1:
                    nll_start = float(torch.cat(
                        [b.nll_start if b.nll_start is not None else x[0]
                         for b, x in zip(batches, last)]).mean())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if after_step is not None:
                    with torch.no_grad():
                        after_step()
                step += 1
                if lr_growth is not None or lr_decay:
                    for group in opt.param_groups:
                        group["lr"] = lr * _lr_factor(step, steps, lr_growth, lr_decay)
                bar.update(1)
                bar.set_postfix(nll=f"{float(nll.detach().mean()):.3f}")
                if step >= steps:
                    break
            done = all(x is not None for x in last)
            if done and stop_nll is not None and _reached(last, stop_nll):
                if not any(b.cand is not None for b in batches):
                    reached = True
                    break
                exact = [b.refresh(runner, start) for b in batches]
                if _reached(exact, stop_nll):
                    reached = True
                    break
                exact = None
            if done and stall is not None:
                trace.append(_mean_nll(last))
                # the window's best against the best before it: a bouncing NLL is not a stall
                if (len(trace) > window
                        and min(trace[-window:]) > (1 - stall[1]) * min(trace[:-window])):
                    stalled = True
                    break
    finally:
        bar.close()
    # the state after the last update (the stopping check's pass, or one more), full vocabulary
    if exact is None:
        with torch.no_grad():
            exact = [b.losses(runner, start, full=True) for b in batches]
    best_step = None
    if keep_best and not reached and best is not None:
        with torch.no_grad():  # the best step's state, if it beats the last in the full vocabulary
            last_score = _exact_score(exact[0], kl_weight, nll_floor, penalty)
            if best[0] > last_score:
                last_state = [p.detach().clone() for p in params]
                for p, kept in zip(params, best[2]):
                    p.copy_(kept)
                kept_exact = [b.losses(runner, start, full=True) for b in batches]
                if _exact_score(kept_exact[0], kl_weight, nll_floor, penalty) > last_score:
                    exact, best_step = kept_exact, best[1]
                else:  # its candidates had flattered it
                    for p, kept in zip(params, last_state):
                        p.copy_(kept)
    ev = exact
    nll = torch.cat([e[0].cpu() for e in ev])
    kl = torch.cat([e[1].cpu() for e in ev])
    hits = torch.cat([e[2] for e in ev])
    return {"steps": step, "stall_stopped": stalled, "best_step": best_step,
            "nll_start": nll_start,
            "nll_end": float(nll.mean()),
            "nll_end_max": float(nll.max()), "kl_end": float(kl.mean()) if kl.numel() else 0.0,
            "token_acc_end": float(hits.float().mean()) if hits.numel() else None}


def _lr_factor(step: int, steps: int, growth: tuple[float, int] | None, decay: bool) -> float:
    """The lr's multiple after ``step`` of ``steps``: ``growth[0]`` per ``growth[1]`` steps
    done, times the cosine decay."""
    factor = growth[0] ** (step // growth[1]) if growth is not None else 1.0
    if decay:
        factor *= 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    return factor


def _score(hits: torch.Tensor, loss: torch.Tensor) -> tuple[int, float]:
    """How good a step is for ``keep_best`` (higher is better): target tokens at the argmax,
    then the lower loss."""
    return int(hits.sum()), -float(loss.detach())


def _fit(nll: torch.Tensor, kl: torch.Tensor, kl_weight: float, nll_floor: float) -> torch.Tensor:
    """The loss before the penalty: the mean floored target NLL (floor 0: the plain mean, NLL >=
    0) plus ``kl_weight`` times the mean KL."""
    fit = nll.clamp_min(nll_floor).mean()
    return fit + kl_weight * kl.mean() if kl.numel() else fit


def _exact_score(result, kl_weight: float, nll_floor: float, penalty) -> tuple[int, float]:
    """``_score`` of a batch's full-vocabulary ``(nll, kl, hits)`` at the current parameters."""
    nll, kl, hits = result
    loss = _fit(nll, kl, kl_weight, nll_floor)
    return _score(hits, loss + penalty() if penalty is not None else loss)


def _reached(results, stop_nll: float) -> bool:
    """Every target token is the argmax and the mean NLL is below ``stop_nll``; ``results``: a
    ``(nll, kl, hits, ...)`` per batch."""
    return bool(torch.cat([r[2] for r in results]).all()) and _mean_nll(results) < stop_nll


def _mean_nll(results) -> float:
    """The mean target NLL over every pair of ``results`` (a ``(nll, ...)`` per batch)."""
    return float(torch.cat([r[0].detach().cpu() for r in results]).mean())

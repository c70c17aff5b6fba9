"""Distillation losses between a student's and a teacher's next-token distributions, per token.

``p`` is the teacher's distribution, ``q`` the student's; every function takes raw logits
``[..., V]`` (any float dtype) and returns one loss per position ``[...]`` in fp32:

- ``fkl``   forward KL(p || q): mode-covering, the classic KD loss;
- ``rkl``   reverse KL(q || p): mode-seeking (MiniLLM);
- ``jsd``   generalized JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
  (GKD; beta = 0.5 is the usual symmetric JSD);
- ``skl``   skew KL(p || alpha p + (1 - alpha) q) (DistiLLM, alpha = 0.1);
- ``srkl``  skew reverse KL(q || alpha q + (1 - alpha) p) (DistiLLM);
- ``kltop`` the KL terms of the teacher's top-k classes only (OSTQuant's KL-Top, shared with
  ``editcomp.quant.klloss``: the tail of a 50k-260k vocabulary is noise that swamps the signal);
- ``cakld`` gamma RKL + (1 - gamma) FKL with gamma = the teacher's mean top-1 confidence
  (BitDistiller): a confident teacher asks for mode seeking, an unsure one for coverage.

Log-softmax is always computed in fp32 (bf16 logits lose the tail of the distribution), and
``token_losses`` works in chunks of positions, recomputing each chunk in the backward pass, so a
big vocabulary never needs more than ``chunk x V`` fp32 intermediates at once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from editcomp.errors import ConfigError
from editcomp.quant.klloss import teacher_topk

CHUNK = 512  # positions per fp32 log-softmax chunk


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits.float(), dim=-1)


def _kl_logp(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) over the last dim from log-probabilities; classes where ``a`` is 0 (in the
    compute dtype) contribute 0, also when ``b`` rules them out, where a naive product gives
    ``0 * inf = NaN`` -- in the value and in the gradient."""
    pa = logp_a.exp()
    diff = torch.where(pa > 0, logp_a - logp_b, torch.zeros_like(logp_a))
    return (pa * diff).sum(-1)


def _log_mix(logp_a: torch.Tensor, logp_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w a + (1 - w) b), stably (never forms the probabilities of a mixture in log space)."""
    if w <= 0.0:
        return logp_b
    if w >= 1.0:
        return logp_a
    return torch.logaddexp(logp_a + math.log(w), logp_b + math.log1p(-w))


def fkl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Forward KL(p_teacher || q_student) per position."""
    return _kl_logp(_log_probs(teacher_logits), _log_probs(student_logits))


def rkl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Reverse KL(q_student || p_teacher) per position."""
    return _kl_logp(_log_probs(student_logits), _log_probs(teacher_logits))


def jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence with teacher weight ``beta`` in (0, 1)."""
    _check_open("beta", beta)
    lq, lp = _log_probs(student_logits), _log_probs(teacher_logits)
    lm = _log_mix(lp, lq, beta)
    return beta * _kl_logp(lp, lm) + (1.0 - beta) * _kl_logp(lq, lm)


def skl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """Skew KL(p || alpha p + (1 - alpha) q); alpha = 0 is the forward KL."""
    _check_skew(alpha)
    lq, lp = _log_probs(student_logits), _log_probs(teacher_logits)
    return _kl_logp(lp, _log_mix(lp, lq, alpha))


def srkl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """Skew reverse KL(q || alpha q + (1 - alpha) p); alpha = 0 is the reverse KL."""
    _check_skew(alpha)
    lq, lp = _log_probs(student_logits), _log_probs(teacher_logits)
    return _kl_logp(lq, _log_mix(lq, lp, alpha))


def kltop(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int = 1000) -> torch.Tensor:
    """OSTQuant's KL-Top per position: ``sum over the teacher's top-k of p (log p - log q)``.

    The same definition as ``editcomp.quant.klloss.kl_top`` (full-vocabulary softmaxes read at
    the teacher's top-k ids, not renormalised), whose ``teacher_topk`` it uses, kept per position.
    """
    top = teacher_topk(teacher_logits, int(k))
    logq = _log_probs(student_logits).gather(-1, top.idx)
    return (top.logp.exp() * (top.logp - logq)).sum(-1)


def cakld(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
          gamma: float | None = None) -> torch.Tensor:
    """BitDistiller's confidence-aware KL: gamma RKL + (1 - gamma) FKL.

    ``gamma`` None: the teacher's mean top-1 probability over these positions (the trainer
    fixes it once over its training data instead, as BitDistiller does).
    """
    lq, lp = _log_probs(student_logits), _log_probs(teacher_logits)
    if gamma is None:
        gamma = float(lp.detach().amax(-1).exp().mean()) if lp.numel() else 0.5
    _check_closed("gamma", gamma)
    return gamma * _kl_logp(lq, lp) + (1.0 - gamma) * _kl_logp(lp, lq)


def _check_open(name: str, v: float) -> None:
    if not 0.0 < float(v) < 1.0:
        raise ConfigError(f"{name} must be in (0, 1), got {v}")


def _check_closed(name: str, v: float) -> None:
    if not 0.0 <= float(v) <= 1.0:
        raise ConfigError(f"{name} must be in [0, 1], got {v}")


def _check_skew(alpha: float) -> None:
    if not 0.0 <= float(alpha) < 1.0:
        raise ConfigError(f"alpha must be in [0, 1), got {alpha}")


#: loss name -> per-position function ``f(student_logits, teacher_logits, **params)``.
LOSSES = {"fkl": fkl, "rkl": rkl, "jsd": jsd, "skl": skl, "srkl": srkl, "kltop": kltop,
          "cakld": cakld}
#: loss name -> the keyword parameters it takes (the others are not passed to it).
LOSS_PARAMS = {"fkl": (), "rkl": (), "jsd": ("beta",), "skl": ("alpha",), "srkl": ("alpha",),
               "kltop": ("k",), "cakld": ("gamma",)}


def get_loss(name: str):
    """The per-position function of a loss name, or a ``ConfigError`` listing the valid ones."""
    if name not in LOSSES:
        raise ConfigError(f"unknown distillation loss {name!r}; valid: {', '.join(LOSSES)}")
    return LOSSES[name]


def loss_params(name: str, params: dict) -> dict:
    """The entries of ``params`` that loss ``name`` takes (None values left out: defaults)."""
    get_loss(name)
    return {k: params[k] for k in LOSS_PARAMS[name] if params.get(k) is not None}


def teacher_confidence(teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
                       chunk: int = CHUNK) -> tuple[float, int]:
    """``(sum of top-1 probabilities, positions)`` of the teacher over the masked positions
    (summed so callers can pool batches; divide for CAKLD's gamma)."""
    rows = _rows(teacher_logits, mask)
    total = 0.0
    with torch.no_grad():
        for s in range(0, rows.shape[0], chunk):
            lp = _log_probs(rows[s:s + chunk])
            total += float(lp.amax(-1).exp().double().sum())
    return total, rows.shape[0]


def _rows(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    flat = logits.reshape(-1, logits.shape[-1])
    if mask is None:
        return flat
    return flat[mask.reshape(-1).to(torch.bool)]


def token_losses(name: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 mask: torch.Tensor | None = None, chunk: int = CHUNK, **params) -> torch.Tensor:
    """Per-position loss ``[...]`` (fp32; 0 where ``mask`` is False) of logits ``[..., V]``.

    Only masked positions are computed, ``chunk`` at a time; with gradients each chunk is
    recomputed in the backward pass instead of keeping its fp32 ``[chunk, V]`` intermediates.
    """
    fn = get_loss(name)
    kw = loss_params(name, params)
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ConfigError(f"student and teacher vocabularies differ ({student_logits.shape[-1]} vs "
                          f"{teacher_logits.shape[-1]} logits); distillation needs one tokenizer")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logits shapes differ: {tuple(student_logits.shape)} vs "
                         f"{tuple(teacher_logits.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(f"mask of shape {tuple(mask.shape)} for logits "
                         f"{tuple(student_logits.shape)}")
    if name == "cakld" and kw.get("gamma") is None:  # one gamma for the whole batch, not per chunk
        conf, n = teacher_confidence(teacher_logits, mask, chunk)
        kw["gamma"] = conf / n if n else 0.5
    s_rows = _rows(student_logits, mask)
    t_rows = _rows(teacher_logits.detach(), mask)
    grad = torch.is_grad_enabled() and s_rows.requires_grad
    parts = []
    for s in range(0, s_rows.shape[0], chunk):
        sc, tc = s_rows[s:s + chunk], t_rows[s:s + chunk]
        if grad:
            parts.append(checkpoint(lambda a, b: fn(a, b, **kw), sc, tc, use_reentrant=False))
        else:
            parts.append(fn(sc, tc, **kw))
    flat = torch.cat(parts) if parts else s_rows.new_zeros(0, dtype=torch.float32)
    if mask is None:
        return flat.reshape(student_logits.shape[:-1])
    out = flat.new_zeros(mask.numel())
    out = out.masked_scatter(mask.reshape(-1).to(torch.bool), flat)
    return out.reshape(mask.shape)


def distill_loss(name: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 mask: torch.Tensor | None = None, chunk: int = CHUNK, **params) -> torch.Tensor:
    """Mean of ``token_losses`` over the masked positions (0 when none are masked)."""
    per = token_losses(name, student_logits, teacher_logits, mask, chunk, **params)
    n = per.numel() if mask is None else int(mask.sum())
    return per.sum() / max(n, 1)

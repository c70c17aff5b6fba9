"""KL-Top: KL divergence from a teacher to a student restricted to the teacher's top-k tokens.

OSTQuant (and distillation) train a student against a full-precision teacher. The full-vocab
KL spends most of its gradient on the teacher's long, noisy tail; KL-Top keeps only the k most
probable teacher tokens at each position:

    loss = mean over positions of  sum_{i in top-k(p)} p_i (log p_i - log q_i)

where ``p`` and ``q`` are the *full-vocab* softmaxes (read at the top-k indices, not
renormalized over them). The teacher's part can be precomputed once (``teacher_topk``), so the
teacher model does not have to stay in memory while the student trains.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from editcomp.errors import ConfigError


class TopK(NamedTuple):
    """The teacher's top-k tokens per position: full-vocab log-probs and their token ids."""

    logp: torch.Tensor  # [..., k] float
    idx: torch.Tensor  # [..., k] long


def teacher_topk(teacher_logits: torch.Tensor, k: int = 1000) -> TopK:
    """Top-``k`` full-vocab log-probabilities of ``teacher_logits [..., vocab]`` (fp32)."""
    if k < 1:
        raise ConfigError(f"KL-Top k must be at least 1, got {k}")
    logp = F.log_softmax(teacher_logits.detach().float(), dim=-1)
    vals, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return TopK(vals, idx)


def kl_top(student_logits: torch.Tensor, teacher: torch.Tensor | TopK, k: int = 1000,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL-Top loss (a scalar), differentiable w.r.t. ``student_logits [..., vocab]``.

    ``teacher`` is either the teacher's logits (same shape as the student's) or a precomputed
    ``TopK`` (then ``k`` is the cache's). ``mask [...]`` (bool or 0/1) selects the positions that
    count; the loss is the mean over them.
    """
    if not isinstance(teacher, TopK):
        if teacher.shape != student_logits.shape:
            raise ConfigError(f"teacher logits {tuple(teacher.shape)} and student logits "
                              f"{tuple(student_logits.shape)} differ in shape")
        teacher = teacher_topk(teacher, k)
    if teacher.idx.shape[:-1] != student_logits.shape[:-1]:
        raise ConfigError(f"teacher top-k positions {tuple(teacher.idx.shape[:-1])} do not match "
                          f"student positions {tuple(student_logits.shape[:-1])}")
    logq = F.log_softmax(student_logits.float(), dim=-1).gather(-1, teacher.idx.long())
    logp = teacher.logp.to(logq.device).float()
    per_pos = (logp.exp() * (logp - logq)).sum(-1)
    if mask is None:
        return per_pos.mean()
    m = mask.to(per_pos.device, per_pos.dtype)
    return (per_pos * m).sum() / m.sum().clamp_min(1.0)


__all__ = ["TopK", "teacher_topk", "kl_top"]

"""KL divergence of a student (edited/quantized) to its teacher: how far compression moved the model.

Forward KL(teacher || student), averaged over every position of every window, over the full vocabulary.
Chunked over positions and accumulated in float64, like perplexity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from editcomp.errors import ConfigError
from editcomp.eval.perplexity import CHUNK, check_windows, eval_mode, logits_of, model_device


def kl_sum(teacher_logits: torch.Tensor, student_logits: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Sum over positions of KL(softmax(teacher) || softmax(student)) for ``[T, V]`` logits, float64."""
    total = torch.zeros((), dtype=torch.float64, device=student_logits.device)
    for s in range(0, student_logits.shape[0], chunk):
        log_s = F.log_softmax(student_logits[s:s + chunk].float(), dim=-1)
        log_t = F.log_softmax(teacher_logits[s:s + chunk].to(log_s.device).float(), dim=-1)
        total += F.kl_div(log_s, log_t, log_target=True, reduction="sum").double()
    return total


def kl_to_teacher(student, teacher, windows: torch.LongTensor, batch_size: int = 1,
                  progress: bool = True) -> dict:
    """Mean per-token KL(teacher || student) on the same windows -> ``{"kl", "tokens"}``.

    The two models may live on different devices; the teacher's logits are moved to the student's.
    """
    windows = check_windows(windows)
    s_dev, t_dev = model_device(student), model_device(teacher)
    total = torch.zeros((), dtype=torch.float64, device=s_dev)
    with eval_mode(student, teacher), torch.inference_mode():
        for batch in tqdm(windows.split(batch_size), desc="KL to teacher", unit="batch",
                          disable=not progress, leave=False):
            t_logits = logits_of(teacher, batch.to(t_dev))
            s_logits = logits_of(student, batch.to(s_dev))
            if t_logits.shape[-1] != s_logits.shape[-1]:
                raise ConfigError(f"student and teacher vocabularies differ ({s_logits.shape[-1]} vs "
                                  f"{t_logits.shape[-1]} logits); KL needs the same tokenizer")
            for b in range(batch.shape[0]):
                total += kl_sum(t_logits[b], s_logits[b])
            del t_logits, s_logits
    tokens = windows.numel()
    return {"kl": total.item() / tokens, "tokens": tokens}

"""Token sequences as model input rows: one right-padded row per sequence, or several sequences
packed end to end in one row with a block-diagonal causal mask (no padding to compute)."""

from __future__ import annotations

import torch


def right_pad(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids ``[B, T]``, attention mask ``[B, T]``), right-padded (every query sees itself)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """Sequence indices grouped into rows of at most ``width`` tokens (first fit, longest first;
    a sequence longer than ``width`` gets a row of its own)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(width - lengths[i])
    return rows


def packed(seqs: list[list[int]], width: int, pad: int, device, dtype=torch.float32
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Sequences laid end to end in rows (``pack_rows``) -> (ids ``[R, W]``, additive attention
    mask ``[R, 1, W, W]`` in ``dtype`` (the model's, as transformers' own masks): 0 where a token
    sees an earlier token of its own sequence, the dtype's minimum elsewhere; position ids
    ``[R, W]`` restarting at 0 for each sequence; each sequence's ``(row, offset)``). The same
    tokens as ``right_pad`` without its padding: a step of a single edit runs a dozen sequences
    of very different lengths, and a third of a padded batch is padding that every matmul still
    computes."""
    groups = pack_rows([len(s) for s in seqs], width)
    wide = max(sum(len(seqs[i]) for i in g) for g in groups)
    ids = torch.full((len(groups), wide), pad, dtype=torch.long)
    pos = torch.zeros((len(groups), wide), dtype=torch.long)
    seg = torch.full((len(groups), wide), -1, dtype=torch.long)  # -1: padding
    where = [(0, 0)] * len(seqs)
    for r, group in enumerate(groups):
        at = 0
        for i in group:
            n = len(seqs[i])
            ids[r, at:at + n] = torch.tensor(seqs[i], dtype=torch.long)
            pos[r, at:at + n] = torch.arange(n)
            seg[r, at:at + n] = i
            where[i] = (r, at)
            at += n
    idx = torch.arange(wide)
    causal = idx[None, :] <= idx[:, None]
    same = seg[:, :, None] == seg[:, None, :]
    # a padding position sees itself only (a row of nothing but the minimum would still be finite,
    # but its output is never read either way)
    see = (same & causal & (seg[:, :, None] >= 0)) | torch.eye(wide, dtype=torch.bool)
    mask = torch.zeros(see.shape, dtype=dtype).masked_fill(~see, torch.finfo(dtype).min)
    return ids.to(device), mask[:, None].to(device), pos.to(device), where

"""How far a mean over edit cases can be trusted: a percentile bootstrap over the cases.

A locality or generality mean over 100 BMIKE-53 cases moves by about +-0.01 when a setting
changes nothing but which near-tie probe tokens flip (gemma3-270m's 100 single fr edits, session
44: a 95% interval of 0.911-0.967 around a French locality of 0.942). A benchmark row carries this
interval, so that two rows, or a row and a target, are compared against it.
"""

from __future__ import annotations

import torch


def bootstrap_ci(values, weights=None, level: float = 0.95, samples: int = 4000,
                 seed: int = 0) -> tuple[float, float] | None:
    """The ``level`` percentile-bootstrap interval of the weighted mean of ``values``.

    ``values[i]`` is case i's mean over its ``weights[i]`` probes (None: 1 each), so the
    resampled mean weighs each probe the same, as ``edit_metrics``' pooled mean does; cases are
    resampled whole, since a case's probes share its edit. Seeded: the same input gives the same
    interval. None for no cases (or no weight).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    v = torch.as_tensor(list(values), dtype=torch.float64)
    w = (torch.ones_like(v) if weights is None
         else torch.as_tensor(list(weights), dtype=torch.float64))
    if v.shape != w.shape:
        raise ValueError(f"{len(v)} values but {len(w)} weights")
    if len(v) == 0 or float(w.sum()) <= 0:
        return None
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(v), (samples, len(v)), generator=gen)
    ws = w[idx]
    total = ws.sum(1)
    means = (ws * v[idx]).sum(1) / total.clamp_min(1e-300)
    means = means[total > 0]  # a resample that drew only weightless cases has no mean
    tail = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return lo, hi

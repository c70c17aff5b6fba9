"""QSUR (quantization space utilization rate) of the activations at each linear input.

OSTQuant's analysis metric: fit a Gaussian (mean ``mu``, covariance ``S``) to a layer's input
activations; its confidence ellipsoid ``(x - mu)^T S^-1 (x - mu) <= c`` (``c`` the chi-square
quantile at ``alpha`` with ``d`` degrees of freedom) holds the data. A per-token quantizer gives
every channel of a token the same range, so the space it spans is the hypercube whose side is
the ellipsoid's widest extent over channels, ``max_i(mu_i + r_i) - min_i(mu_i - r_i)`` with
``r_i = sqrt(c S_ii)``. QSUR = volume(ellipsoid) / volume(cube): 1-ish shapes (round, centred,
equal per-channel spread) use the grid well; stretched ones waste it.

Volumes in ``d = 576`` or ``1536`` dimensions under/overflow any float, so everything is a
log-volume and the report is ``QSUR^(1/d) = exp(log QSUR / d)``, a per-dimension rate. Its maximum
(an isotropic zero-mean Gaussian) is ``V_d^(1/d) / 2`` with ``V_d`` the unit ball's volume; a
rotation keeps the determinant and can only move the per-channel spreads towards equal.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from editcomp.arch import get_adapter
from editcomp.quant.layerwise import inner_linear

ALPHA = 0.99
POINTS = ("attn_in", "o_in", "mlp_in", "down_in")  # inputs of q/k/v, o, gate/up, down


def _chi2_quantile(alpha: float, d: int) -> float:
    from scipy.stats import chi2

    return float(chi2.ppf(alpha, d))


def log_qsur_from_moments(mean: torch.Tensor, cov: torch.Tensor, alpha: float = ALPHA) -> float:
    """``log QSUR`` of a Gaussian ``N(mean, cov)`` (``-inf`` for a singular covariance)."""
    d = mean.numel()
    mean, cov = mean.double(), cov.double()
    c = _chi2_quantile(alpha, d)
    log_ball = 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1)
    sign, logdet = torch.linalg.slogdet(cov)
    if sign <= 0:
        return -math.inf
    log_ell = log_ball + 0.5 * d * math.log(c) + 0.5 * logdet.item()
    r = (c * cov.diagonal().clamp_min(0)).sqrt()
    side = ((mean + r).max() - (mean - r).min()).item()
    return log_ell - d * math.log(side)


def qsur(x: torch.Tensor, alpha: float = ALPHA) -> float:
    """``QSUR^(1/d)`` of samples ``x [..., d]`` (the leading dims are samples)."""
    x = x.reshape(-1, x.shape[-1]).double()
    mean = x.mean(0)
    xc = x - mean
    cov = xc.T @ xc / max(1, x.shape[0] - 1)
    return math.exp(log_qsur_from_moments(mean, cov, alpha) / x.shape[-1])


class _Moments:
    """Running sum and Gram matrix of the rows seen, shifted by the first batch's mean.

    The shift keeps the fp32 Gram products free of cancellation (LLM activations have channels
    with means in the hundreds); sums accumulate in float64.
    """

    def __init__(self):
        self.n, self.shift, self.s, self.g = 0, None, None, None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.shift is None:
            self.shift = x.mean(0)
            self.s = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
            self.g = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)
        xc = x - self.shift
        self.n += x.shape[0]
        self.s += xc.sum(0).double()
        self.g += (xc.T @ xc).double()

    def qsur_root(self, alpha: float) -> float:
        m = self.s / self.n
        cov = (self.g - self.n * torch.outer(m, m)) / max(1, self.n - 1)
        mean = m + self.shift.double()
        return math.exp(log_qsur_from_moments(mean, cov, alpha) / mean.numel())


def layer_qsur(model: nn.Module, windows: torch.Tensor, alpha: float = ALPHA) -> dict:
    """QSUR^(1/d) at the inputs of every layer's linears on ``windows [n, L]`` token ids.

    Hooks sit on the inner linears, so an online Hadamard (down_proj) is measured after it, as
    the quantizer sees it. Returns ``{"layers": [{"layer", "attn_in", ...}], "mean": {...}}``.
    """
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    stats = []
    hooks = []
    for p in adapter.layers():
        m = {k: _Moments() for k in POINTS}
        stats.append(m)
        for key, mod in zip(POINTS, (p.q, p.o, p.gate, p.down)):
            hooks.append(inner_linear(mod).register_forward_pre_hook(
                lambda mod_, args, acc=m[key]: acc.add(args[0])))
    try:
        with torch.no_grad():
            for ids in windows.split(1):
                model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    layers = [{"layer": i, **{k: m[k].qsur_root(alpha) for k in POINTS}}
              for i, m in enumerate(stats)]
    mean = {k: sum(r[k] for r in layers) / max(1, len(layers)) for k in POINTS}
    return {"alpha": alpha, "tokens": int(windows.numel()), "layers": layers, "mean": mean}


__all__ = ["qsur", "log_qsur_from_moments", "layer_qsur"]

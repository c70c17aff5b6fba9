"""NUPES: non-uniform weight quantization by power-exponent search (Yvinec et al., arXiv 2308.05600).

The operator (b bits, codes ``qmin = -2^(b-1) .. qmax = 2^(b-1) - 1``, range code ``R``, scale
``s``: the range is ``s * R``). A weight is read in uniform units ``u = w / s`` and mapped into the
power space ``t = sign(u) R (|u| / R)^a``; the paper's code is ``q = clamp(round(t), qmin, qmax)`` and
the value ``w_hat = s * sign(q) R (|q| / R)^(1/a)``. By default we keep those levels but give each
weight the code of its *nearest* level (``NUPESConfig.rounding``): lower weight error, same
storage. With ``0 < a < 1`` more of the ``2^b`` levels sit near zero, where bell-shaped weights are
dense. ``a = 1`` is computed without the power (uniform).

Signed scales (``NUPESConfig.signed_scale``, the default): ``R = 2^(b-1)`` and each scale takes the
sign that puts its group's (or channel's) extreme weight on code ``qmin`` -- every one of the
``2^b`` codes is then a level inside the range, 8 on the extreme's side at 4 bits, as NF4's 16
levels are (and as llama.cpp's Q4_0 does for a uniform grid). Symmetric (``signed_scale=False``):
``R = qmax`` with a positive scale; code ``qmin`` lies outside the range and is reached only by
clipping, so 4 bits give 15 levels, and ``a = 1`` *is* ``ops``' symmetric RTN bit for bit.
Measured on smollm2-135m, 4 bits, group 64: unclipped uniform grids give ppl 24.9 symmetric vs
21.6 signed (NF4 20.6; 2 test windows); with the paper's rounding the data-free search gives
23.71 signed and unclipped vs 24.16 symmetric with its best clip, and 22.68 with nearest-level
rounding (NF4 22.34; 20 windows, ``benchmarks/nupes.py``). The ``2^b`` normalized levels of a
channel form a lookup table (``power_lut``): dequantization is a gather times the scale
(``nupes_linear.NUPESLinear``).

Two modes (``NUPESConfig.data_free``):

* data-free: per output channel (or per layer) the exponent ``a`` is searched jointly with the
  clip ratio of each scale, minimizing the weight reconstruction error: a coarse grid over
  ``a`` brackets the minimum, then a golden-section search refines it (the error is locally
  convex in ``a``); the clip ratio is minimized exactly over a grid at every ``a`` tried.
  Then, codes fixed, each group scale is refit so the quantized weights have no gain
  (``NUPESConfig.unbiased_scale``, ``ops.unbiased_scales``): the error-minimizing fit shrinks
  them (``<w_hat, w> / ||w||^2`` ~ 0.995 at 4 bits) and, we think, that gain compounding
  through the layers is why a lower weight (and per-layer output) error than NF4's gave a
  higher perplexity: removing it closes the gap (w4 g64: 22.68 -> 22.18, NF4 22.34).
* data-driven: layer by layer on calibration data (``layerwise.sequential``: later layers see
  the quantized outputs of earlier ones), minimizing each linear's output error
  ``tr(dW H dW^T)`` with ``H = 2 X^T X / n`` of its calibration inputs. From the data-free
  ``(a, s)``: (1) GPTQ-style error feedback picks the codes on the fixed NUPES grid, most
  activated input columns first (act-order), then each channel's scale is refit by least
  squares under ``H``; (2) the exponent, the scales and a continuous pre-image ``V`` of the codes
  are learned with Adam: the codes are ``round(V)`` with a straight-through gradient, free to
  move anywhere on the grid (not only up/down as in AdaRound); ``a`` gets its gradient through
  the levels ``Q (|q|/Q)^(1/a)``, whose base is at least ``1/Q`` for ``q != 0`` (``q = 0`` maps
  to 0 for every ``a``), so ``d/da`` stays finite -- the stabilization near zero. The learned
  loss uses a rank-``hessian_rank`` eigen-approximation of ``H`` plus its diagonal residual
  (cheap steps). Every stage is kept only if the *exact* output error went down.
  Measured on smollm2-135m (layer 3, 3 bits per channel): error feedback + act-order is where
  the gain is (output error 0.25-0.72x GPTQ's, of which act-order alone gives 0.28-0.75x, the
  NUPES grid the rest); learning alone lowers the data-free error by ~20% (a synthetic layer
  in the tests), but after error feedback it has not lowered the exact error further in our
  measurements (it is then rejected; ``steps=0`` skips it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from editcomp.errors import ConfigError, NumericalError
from editcomp.quant.gptq import error_feedback, prepare_hessian, zero_dead_inputs
from editcomp.quant.ops import _rows, unbiased_scales
from editcomp.quant.spec import QuantSpec

_GOLD = (math.sqrt(5.0) - 1.0) / 2.0  # 0.618...
ROUNDINGS = ("nearest", "power")
UNBIASED = ("groups", "always", "never")


@dataclass
class NUPESConfig:
    """How NUPES quantizes weights.

    ``bits`` 2-8; ``group_size`` None = one scale per output channel; ``per_channel_exponent``
    False = one exponent for the whole linear. Data-free search: ``exponent_grid`` points in
    ``[min_exponent, 1]``, then ``golden_iters`` golden-section steps, each with the best of
    ``clip_grid`` (``group_clip_grid`` with groups: small groups need little clipping, and the
    search cost grows with the number of scales). Data-driven (``data_free=False``):
    GPTQ-style ``error_feedback`` (damping ``damp``, ``act_order`` column order), then
    ``steps`` Adam steps per linear (``lr`` for the code pre-image in code units,
    ``lr_exponent`` / ``lr_scale`` for ``a`` and log-scales) on a rank-``hessian_rank``
    Hessian. ``min_calib_tokens``: fewer calibration tokens than this is an error.
    ``signed_scale``: all ``2^b`` codes inside the range (see the module docstring).
    ``rounding``: how a weight picks its code on the grid (nearest level, or the paper's
    rounding in the power space).
    """

    bits: int = 4
    group_size: int | None = None
    per_channel_exponent: bool = True
    data_free: bool = False
    min_exponent: float = 0.3
    exponent_grid: int = 10
    golden_iters: int = 6
    #: per-channel clip ratios >= 0.8: a wider grid (down to 0.32) lowered the squared weight
    #: error but clipped salient large weights: smollm2-135m w3a16 ppl 2205 vs 200 with this one
    clip_grid: tuple[float, ...] = (1.0, 0.96, 0.92, 0.88, 0.84, 0.8)
    #: groups are not clipped: with signed scales the group's extreme is a level already, and
    #: smollm2-135m w4a16 g64 (20 x 2048 test windows, the paper's rounding) gave ppl 23.71
    #: unclipped vs 24.80 with (1.0 ... 0.75); symmetric scales need the clip to reach code qmin
    #: (24.16 vs 25.52)
    group_clip_grid: tuple[float, ...] = (1.0,)
    error_feedback: bool = True
    act_order: bool = True
    damp: float = 0.01
    steps: int = 20
    lr: float = 5e-4
    lr_exponent: float = 2e-3
    lr_scale: float = 1e-3
    hessian_rank: int = 64
    min_calib_tokens: int = 1024
    signed_scale: bool = True
    #: "nearest": each weight takes the closest of the 2^b levels; "power": round in the power
    #: space as the paper's formula does, whose decision points sit below the midpoints between
    #: levels when a < 1, so it rounds more magnitudes up than the nearest level would and its
    #: weight error is higher. Same levels, same codes storage. smollm2-135m data-free
    #: (benchmarks/nupes.py, 20 x 2048 test windows): w4a16 g64 ppl 22.68 nearest vs 23.70
    #: power (NF4 22.34); w3a16 per channel 135 vs 273 (an earlier run).
    rounding: str = "nearest"
    #: data-free only: after the codes are picked, refit each scale so the quantized weights
    #: have no gain (ops.unbiased_scales; the error-minimizing fit shrinks them ~0.5% at 4 bits):
    #: "groups" (group scales only), "always", "never". smollm2-135m (benchmarks/nupes.py,
    #: 20 x 2048 test windows, never -> always): w4 g64 ppl 22.68 -> 22.18 (NF4 22.34), w3 g64
    #: 44.61 -> 43.41, w2 g64 78893 -> 46061; per channel (clipped scales) w4 29.78 -> 29.35
    #: but w3 135.4 -> 164.0, hence groups only by default. The data-driven path fits its
    #: scales to the output error instead (refit_scales)
    unbiased_scale: str = "groups"
    seed: int = 0
    skip: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"NUPES bits must be an integer in 2-8, got {self.bits!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int)
                                            or self.group_size < 1):
            raise ConfigError(f"NUPES group_size must be a positive integer, got "
                              f"{self.group_size!r}")
        if not 0.0 < self.min_exponent <= 1.0:
            raise ConfigError(f"NUPES min_exponent must be in (0, 1], got {self.min_exponent}")
        for name in ("clip_grid", "group_clip_grid"):
            grid = getattr(self, name)
            if not grid or not all(0.0 < c <= 1.0 for c in grid):
                raise ConfigError(f"NUPES {name} values must be in (0, 1], got {grid}")
        if self.unbiased_scale not in UNBIASED:
            raise ConfigError(f"NUPES unbiased_scale must be one of {', '.join(UNBIASED)}, got "
                              f"{self.unbiased_scale!r}")
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"NUPES rounding must be one of {', '.join(ROUNDINGS)}, got "
                              f"{self.rounding!r}")
        if self.steps < 0 or self.exponent_grid < 2 or self.golden_iters < 0:
            raise ConfigError("NUPES steps and golden_iters must be >= 0, exponent_grid >= 2")

    @property
    def range_code(self) -> int:
        """``R``: the code magnitude at the end of a scale's range."""
        return range_code(self.bits, self.signed_scale)

    @property
    def spec(self) -> QuantSpec:
        """The weight spec (symmetric; per channel or per group)."""
        if self.group_size is None:
            return QuantSpec(self.bits, "channel")
        return QuantSpec(self.bits, "group", self.group_size)


# ---- the operator ---------------------------------------------------------------------------

def range_code(bits: int, signed_scale: bool) -> int:
    """``R = 2^(b-1)`` with signed scales (code ``qmin`` is the extreme), else ``2^(b-1) - 1``."""
    return 2 ** (bits - 1) - (0 if signed_scale else 1)


def _is_one(a: torch.Tensor) -> torch.Tensor:
    return a == 1.0


def to_power(u: torch.Tensor, a: torch.Tensor, rc: int) -> torch.Tensor:
    """``sign(u) R (|u|/R)^a`` (``u`` in uniform units); exactly ``u`` where ``a == 1``."""
    a = torch.as_tensor(a, dtype=u.dtype, device=u.device)
    t = torch.sign(u) * rc * (u.abs() / rc).pow(a)
    return torch.where(_is_one(a), u, t)


def power_levels(codes: torch.Tensor, a: torch.Tensor, rc: int,
                 exact_one: bool = True) -> torch.Tensor:
    """Normalized values of integer ``codes``: ``sign(q) R (|q|/R)^(1/a)``; ``q`` where ``a == 1``.

    The base ``|q|/R`` is clamped to ``>= 1/R`` before the power (only ``q = 0`` is below, and
    it maps to 0 anyway), so the gradient w.r.t. ``a`` is finite everywhere. ``exact_one=False``
    drops the ``a == 1`` shortcut (which has no gradient w.r.t. ``a``) for learning.
    """
    c = codes.float()
    a = torch.as_tensor(a, dtype=c.dtype, device=c.device)
    base = (c.abs() / rc).clamp_min(1.0 / rc)
    v = torch.sign(c) * rc * base.pow(1.0 / a)
    return torch.where(_is_one(a), c, v) if exact_one else v


def level_midpoints(a: torch.Tensor, rc: int, qmin: int, qmax: int) -> torch.Tensor:
    """The nearest-level decision points: halfway between consecutive levels of codes
    ``qmin .. qmax``, ``[..., 2^b - 1]`` for exponents ``a`` ``[..., 1]``."""
    L = power_levels(torch.arange(qmin, qmax + 1, dtype=torch.float32, device=a.device),
                     a.float(), rc)
    return (L[..., 1:] + L[..., :-1]) / 2


def round_codes(u: torch.Tensor, a: torch.Tensor, rc: int, qmin: int, qmax: int,
                nearest: bool = True, mids: torch.Tensor | None = None) -> torch.Tensor:
    """Codes (float) of ``u`` (weights in uniform units, rows ``[..., n]``) for exponents ``a``
    (broadcastable, last dim 1): the nearest of the levels ``qmin .. qmax``, or with
    ``nearest=False`` the paper's ``round(sign(u) R (|u|/R)^a)``. Where ``a == 1`` both are
    ``round(u)`` (ties to even, as ``ops``' RTN rounds). ``mids``: ``level_midpoints(a, ...)``
    when the caller rounds many slices with the same exponents."""
    a = torch.as_tensor(a, dtype=u.dtype, device=u.device)
    if not nearest:
        return torch.clamp(torch.round(to_power(u, a, rc)), qmin, qmax)
    if mids is None:
        mids = level_midpoints(a, rc, qmin, qmax)
    mids = mids.expand(*u.shape[:-1], mids.shape[-1]).contiguous()
    near = (qmin + torch.searchsorted(mids, u.contiguous())).to(u.dtype)
    return torch.where(_is_one(a), torch.clamp(torch.round(u), qmin, qmax), near)


def power_lut(a: torch.Tensor, bits: int, rc: int) -> torch.Tensor:
    """The lookup table ``[E, 2^b]`` of normalized levels for codes ``qmin .. qmax`` per exponent
    (``a`` of shape ``[E, 1]``; ``rc`` the range code ``R``)."""
    half = 2 ** (bits - 1)
    codes = torch.arange(-half, half, device=a.device, dtype=torch.float32)
    return power_levels(codes[None, :], a.float().reshape(-1, 1), rc)


def _expand_rows(a: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Exponent ``[E, 1]`` -> broadcastable against ``_rows`` of ``[out, in]``."""
    return a.unsqueeze(-1) if spec.grouped else a


def _scale_rows(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return scale.unsqueeze(-1) if spec.grouped else scale


def nupes_quantize(W: torch.Tensor, scale: torch.Tensor, a: torch.Tensor,
                   spec: QuantSpec, rc: int, nearest: bool = True) -> torch.Tensor:
    """Integer codes (int8) of ``W [out, in]`` for ``scale``, exponent ``a`` and range code ``rc``
    (``nearest``: see ``round_codes``)."""
    rows = _rows(W.float(), spec)
    u = rows / _scale_rows(scale.float(), spec)
    q = round_codes(u, _expand_rows(a.float(), spec), rc, spec.qmin, spec.qmax, nearest)
    return q.reshape(W.shape).to(torch.int8)


def nupes_dequantize(codes: torch.Tensor, scale: torch.Tensor, a: torch.Tensor,
                     spec: QuantSpec, rc: int) -> torch.Tensor:
    """``s * sign(q) R (|q|/R)^(1/a)``, fp32 ``[out, in]``.

    Evaluated through the ``2^b``-entry table of each exponent row (``power_lut``), exactly as
    ``NUPESLinear`` does, so the weights written during quantization and the ones a reloaded
    checkpoint computes are bit-identical (an elementwise ``pow`` may differ by an ulp between
    vectorized and scalar code paths).
    """
    return lut_dequantize(codes, scale, power_lut(a, spec.bits, rc), spec)


def lut_dequantize(codes: torch.Tensor, scale: torch.Tensor, lut: torch.Tensor,
                   spec: QuantSpec) -> torch.Tensor:
    """Dequantize by table lookup: ``lut[row, q - qmin] * scale`` (``lut`` ``[1 or out, 2^b]``)."""
    out, _ = codes.shape
    idx = codes.long() - spec.qmin
    v = torch.gather(lut.expand(out, -1), 1, idx)
    rows = _rows(v, spec)
    return (rows * _scale_rows(scale.float(), spec)).reshape(codes.shape)


# ---- data-free search -----------------------------------------------------------------------

def range_ref(W: torch.Tensor, spec: QuantSpec, signed: bool) -> torch.Tensor:
    """What a clip-1 scale spans, in the public scale layout (``[out, 1]`` / ``[out, g]``):
    the absmax, or with ``signed`` minus the extreme weight (so ``w_extreme / s = -R``)."""
    rows = _rows(W.float(), spec)
    m = rows.abs().amax(-1, keepdim=True)
    ok = m > 1e-20
    if signed:
        ext = rows.gather(-1, rows.abs().argmax(-1, keepdim=True))
        m = torch.where(ext > 0, -m, m)
    m = torch.where(ok, m, torch.ones_like(m))
    return m.squeeze(-1) if spec.grouped else m


class _SortedRows:
    """Each scale's elements sorted, with prefix sums of ``x`` and ``x^2`` (float64).

    The error of any monotone quantizer of a row is then a sum over its ``2^b`` buckets,
    ``sum x^2 - 2 L sum x + L^2 n``, read off the prefix sums at the bucket edges that
    ``searchsorted`` finds for the decision thresholds: an evaluation costs ``O(2^b log n)``
    per scale instead of ``O(n)``, so ``(a, clip)`` can be searched on fine grids.
    """

    def __init__(self, W: torch.Tensor, spec: QuantSpec, rc: int, signed: bool,
                 nearest: bool = True):
        """``signed``: rows whose extreme is positive are negated, so every scale is positive
        here (the squared error of ``-w`` on ``-s``'s grid equals that of ``w`` on ``s``'s).
        ``nearest``: decision thresholds halfway between levels, else the power-space ones."""
        self.nearest = nearest
        rows = _rows(W.float(), spec)
        self.out = W.shape[0]
        self.groups = rows.shape[1] if spec.grouped else 1
        self.ref = range_ref(W, spec, signed).reshape(-1, 1).float()  # [R, 1]
        flat = rows.reshape(-1, rows.shape[-1]) * self.ref.sign()
        self.x = flat.sort(-1).values.contiguous()
        zero = torch.zeros(flat.shape[0], 1, device=W.device)
        self.P1 = torch.cat([zero, self.x.cumsum(-1)], -1)
        self.P2 = torch.cat([zero, self.x.square().cumsum(-1)], -1)
        self.n = flat.shape[-1]
        self.rc = rc
        k = torch.arange(spec.qmin, spec.qmax + 1, dtype=torch.float32, device=W.device)
        self.codes = k  # [2^b]
        mid = k[:-1] + 0.5  # decision thresholds in the power space, mapped back by 1/a below
        self.mid_sign, self.mid_base = torch.sign(mid), mid.abs() / rc

    def errors(self, a_rows: torch.Tensor, clips: torch.Tensor) -> torch.Tensor:
        """Squared error ``[R, C]`` of every scale row for exponents ``a_rows [R, 1]`` and
        clip ratios ``clips [C]``."""
        rc, R = self.rc, self.x.shape[0]
        C = clips.numel()
        s = (self.ref.abs() * clips[None, :] / rc)[..., None]  # [R, C, 1]
        a = a_rows.reshape(R, 1, 1)
        L = power_levels(self.codes.expand(R, 1, -1), a, rc) * s  # [R, C, 2^b]
        if self.nearest:
            bnd = (L[..., 1:] + L[..., :-1]) / 2  # [R, C, 2^b - 1]
        else:
            bnd = self.mid_sign * rc * self.mid_base.pow(1.0 / a) * s
        idx = torch.searchsorted(self.x, bnd.reshape(R, -1).contiguous()).reshape(R, C, -1)
        edges = torch.cat([torch.zeros(R, C, 1, dtype=idx.dtype, device=idx.device), idx,
                           torch.full((R, C, 1), self.n, dtype=idx.dtype, device=idx.device)], -1)
        e = edges.reshape(R, -1)
        S1 = self.P1.gather(1, e).reshape(R, C, -1).diff(dim=-1)
        S2 = self.P2.gather(1, e).reshape(R, C, -1).diff(dim=-1)
        cnt = edges.diff(dim=-1).float()
        return (S2 - 2 * L * S1 + L.square() * cnt).sum(-1).clamp_min(0)  # [R, C]


def _errors_at(sr: _SortedRows, a: torch.Tensor, clips: torch.Tensor):
    """For exponents ``a [out, 1]``: each row's error with every scale at its best clip.

    Returns ``(err [out], clip per scale [R])``.
    """
    a_rows = a.repeat_interleave(sr.groups, dim=0) if sr.groups > 1 else a
    err = sr.errors(a_rows, clips)  # [R, C]
    best, k = err.min(-1)
    return best.reshape(sr.out, sr.groups).sum(-1), clips[k]


def search_exponent(W: torch.Tensor, config: NUPESConfig) -> tuple[torch.Tensor, torch.Tensor,
                                                                      torch.Tensor]:
    """Data-free ``(a [E, 1], scale, err [E])`` minimizing ``||W_hat - W||^2`` (E = out or 1).

    A grid of ``exponent_grid`` points in ``[min_exponent, 1]`` (1 included, so the result is
    never worse than uniform with the same clip grid), then golden-section steps inside the
    bracket around each channel's best grid point; every point keeps its best clip ratio.
    """
    spec = config.spec
    W = W.detach().float()
    out = W.shape[0]
    E = out if config.per_channel_exponent else 1
    sr = _SortedRows(W, spec, config.range_code, config.signed_scale,
                     config.rounding == "nearest")
    clips = torch.tensor(config.group_clip_grid if spec.grouped else config.clip_grid,
                         dtype=torch.float32, device=W.device)

    def f(a_vec):  # a_vec [E] -> (err [E], clip per scale [R])
        err, c = _errors_at(sr, a_vec.reshape(-1, 1).expand(out, 1), clips)
        return (err.sum().reshape(1) if E == 1 else err), c

    grid = torch.linspace(config.min_exponent, 1.0, config.exponent_grid, device=W.device)
    best_a = torch.ones(E, device=W.device)
    best_err, best_c = f(best_a)
    for g in grid[:-1]:
        x = torch.full((E,), float(g), device=W.device)
        best_a, best_err, best_c = _keep(x, *f(x), best_a, best_err, best_c, sr.groups)
    step = grid[1] - grid[0]
    lo = (best_a - step).clamp(min=config.min_exponent)
    hi = (best_a + step).clamp(max=1.0)
    x1, x2 = hi - _GOLD * (hi - lo), lo + _GOLD * (hi - lo)
    f1, c1 = f(x1)
    f2, c2 = f(x2)
    best_a, best_err, best_c = _keep(x1, f1, c1, best_a, best_err, best_c, sr.groups)
    best_a, best_err, best_c = _keep(x2, f2, c2, best_a, best_err, best_c, sr.groups)
    for _ in range(config.golden_iters):
        left = f1 < f2  # the minimum lies in [lo, x2]
        hi = torch.where(left, x2, hi)
        lo = torch.where(left, lo, x1)
        new = torch.where(left, hi - _GOLD * (hi - lo), lo + _GOLD * (hi - lo))
        fn, cn = f(new)
        best_a, best_err, best_c = _keep(new, fn, cn, best_a, best_err, best_c, sr.groups)
        x1, f1, x2, f2 = (torch.where(left, new, x2), torch.where(left, fn, f2),
                          torch.where(left, x1, new), torch.where(left, f1, fn))
    ref = sr.ref.reshape(out, sr.groups)  # the public scale layout, [out, 1] or [out, g]
    scale = ref * best_c.reshape(ref.shape) / config.range_code
    return best_a.reshape(E, 1), scale, best_err


def _keep(a, err, c, best_a, best_err, best_c, groups):
    """Per exponent row: keep ``(a, err, clips)`` where ``err`` improved."""
    better = err < best_err
    per_scale = better.repeat_interleave(groups) if better.numel() > 1 else better.expand(
        best_c.numel())
    return (torch.where(better, a, best_a), torch.where(better, err, best_err),
            torch.where(per_scale, c, best_c))


# ---- data-driven: error feedback + learned exponent / scales / codes ---------------------------

def _dense_scale(scale: torch.Tensor, spec: QuantSpec, cols: int) -> torch.Tensor:
    """The scale of every weight element ``[out, in]``."""
    if spec.grouped:
        return scale.repeat_interleave(spec.group_size, dim=1)
    return scale.expand(-1, cols)


def error_feedback_codes(W: torch.Tensor, H: torch.Tensor, scale: torch.Tensor, a: torch.Tensor,
                         spec: QuantSpec, rc: int, damp: float = 0.01, block_size: int = 128,
                         act_order: bool = True, name: str = "layer",
                         nearest: bool = True) -> torch.Tensor:
    """Codes on the fixed NUPES grid ``(scale, a)`` chosen column by column, each column's error
    spread over the columns not yet quantized through the inverse Hessian (as GPTQ does).

    The grid is fixed before the pass (static scales), so ``act_order`` -- the most activated
    input columns first, their error gets the most columns to be absorbed by -- needs no group
    index in the checkpoint; codes come back in the original column order.
    """
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    out, cols = W.shape
    S = _dense_scale(scale.float(), spec, cols)
    zero_dead_inputs(W, H)
    W, Hinv, perm = prepare_hessian(W, H, damp, act_order, name)
    if perm is not None:
        S = S[:, perm]
    A = a.float().expand(out, 1)
    mids = level_midpoints(A, rc, spec.qmin, spec.qmax) if nearest else None  # once, not per column
    codes = torch.zeros(out, cols, dtype=torch.int8, device=W.device)

    def quantize_column(c: int, block: torch.Tensor, i: int) -> torch.Tensor:
        s = S[:, c:c + 1]
        q = round_codes(block[:, i:i + 1] / s, A, rc, spec.qmin, spec.qmax, nearest, mids)
        codes[:, c:c + 1] = q.to(torch.int8)
        return power_levels(q, A, rc) * s

    error_feedback(W, Hinv, quantize_column, block_size)
    return codes if perm is None else codes[:, torch.argsort(perm)]


def refit_scales(W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                 a: torch.Tensor, spec: QuantSpec, rc: int) -> torch.Tensor:
    """Per-channel least-squares scales for fixed codes and exponents: with levels ``g`` of a
    row, ``s = g^T H w / g^T H g`` minimizes ``(s g - w)^T H (s g - w)`` (per channel only;
    group scales are returned unchanged)."""
    if spec.grouped:
        return scale
    g = nupes_dequantize(codes, torch.ones_like(scale), a, spec, rc).double()
    Hg = g @ H.double()
    num, den = (Hg * W.double()).sum(1, keepdim=True), (Hg * g).sum(1, keepdim=True)
    new = torch.where(den > 0, num / den.clamp_min(1e-30), scale.double())
    return torch.where(new * scale.double() > 0, new, scale.double()).float()  # keep the sign


def output_error(W_hat: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(dW H dW^T)``: the layer's mean squared output error (up to H's factor 2)."""
    d = (W_hat - W).double()
    return float(((d @ H.double()) * d).sum())


def _refine(W, H, codes, scale, a, spec: QuantSpec, config: NUPESConfig):
    """Adam on (code pre-image, exponent, log-scale) against a low-rank + diagonal ``H``."""
    W = W.detach().float()
    n = H.shape[0]
    k = min(config.hessian_rank, n)
    evals, evecs = torch.linalg.eigh(H.double())
    evals, evecs = evals[-k:].clamp_min(0), evecs[:, -k:]
    R = (evecs * evals.sqrt()).float()  # [in, k]
    diag = (torch.diagonal(H).double() - (evecs.square() * evals).sum(1)).clamp_min(0).float()
    # the pre-image starts at the codes plus the weight's own offset from them in the power
    # space (kept inside the code's rounding cell), so codes of weights near a decision
    # boundary flip after small steps
    rc = config.range_code
    t = to_power(_rows(W, spec) / _scale_rows(scale.float(), spec),
                 _expand_rows(a.float(), spec), rc).reshape(W.shape)
    V = (codes.float() + 0.99 * (t - codes.float()).clamp(-0.5, 0.5)).requires_grad_(True)
    a_p = a.float().clone().requires_grad_(True)
    log_s = torch.zeros_like(scale, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([{"params": [V], "lr": config.lr},
                            {"params": [a_p], "lr": config.lr_exponent},
                            {"params": [log_s], "lr": config.lr_scale}])
    s0 = scale.float()
    out = W.shape[0]
    norm = float((W @ R).square().sum() + (W.square() * diag).sum()) + 1e-30
    for _ in range(config.steps):
        q = torch.clamp(V + (V.round() - V).detach(), spec.qmin, spec.qmax)
        lv = power_levels(_rows(q, spec), _expand_rows(a_p.expand(out, 1), spec), rc,
                          exact_one=False)
        W_hat = (lv * _scale_rows(s0 * log_s.exp(), spec)).reshape(W.shape)
        d = W_hat - W
        loss = ((d @ R).square().sum() + (d.square() * diag).sum()) / norm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            a_p.clamp_(config.min_exponent, 1.0)
            V.clamp_(spec.qmin - 0.49, spec.qmax + 0.49)
    with torch.no_grad():
        new_codes = torch.clamp(V.round(), spec.qmin, spec.qmax).to(torch.int8)
        return new_codes, (s0 * log_s.exp()).detach(), a_p.detach().clone()


def nupes_quantize_weight(W: torch.Tensor, config: NUPESConfig, H: torch.Tensor | None = None,
                          name: str = "layer"):
    """Quantize one weight ``[out, in]``; returns ``(W_hat, codes, scale, a, info)``.

    Without ``H`` (or with ``config.data_free``) this is the data-free search + rounding; with
    it, error feedback and the learned refinement (each kept only if the exact output error
    ``tr(dW H dW^T)`` goes down).
    """
    spec = config.spec
    W = W.detach().float()
    if not torch.isfinite(W).all():
        raise NumericalError(f"the weights of layer {name} contain NaN/Inf")
    try:
        _rows(W, spec)  # the group size must divide the width
    except ConfigError as e:
        raise ConfigError(f"layer {name}: {e}") from None
    rc = config.range_code
    a, scale, _ = search_exponent(W, config)
    nearest = config.rounding == "nearest"
    codes = nupes_quantize(W, scale, a, spec, rc, nearest)
    data_free = H is None or config.data_free
    refit = config.unbiased_scale == "always" or (config.unbiased_scale == "groups"
                                                  and spec.grouped)
    if data_free and refit:
        unit = nupes_dequantize(codes, torch.ones_like(scale), a, spec, rc)
        scale = unbiased_scales(W, unit, scale, spec)
    info = {}
    if not data_free:
        if not torch.isfinite(H).all():
            raise NumericalError(f"calibration activations contain NaN/Inf for layer {name}")
        best = output_error(nupes_dequantize(codes, scale, a, spec, rc), W, H)
        info["err_data_free"] = best
        if config.error_feedback:
            c2 = error_feedback_codes(W, H, scale, a, spec, rc, damp=config.damp,
                                      act_order=config.act_order, name=name,
                                      nearest=nearest)
            s2 = refit_scales(W, H, c2, scale, a, spec, rc)
            e2 = output_error(nupes_dequantize(c2, s2, a, spec, rc), W, H)
            info["err_feedback"] = e2
            if e2 < best:
                codes, scale, best = c2, s2, e2
        if config.steps:
            c3, s3, a3 = _refine(W, H, codes, scale, a, spec, config)
            e3 = output_error(nupes_dequantize(c3, s3, a3, spec, rc), W, H)
            info["err_learned"] = e3
            if e3 < best:
                codes, scale, a, best = c3, s3, a3, e3
        info["err"] = best
    return nupes_dequantize(codes, scale, a, spec, rc), codes, scale, a, info

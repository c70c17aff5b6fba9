"""Uniform quantizer ops: small pure functions shared by weights, activations and the KV cache.

Conventions (QuaRot / GPTQ style, chosen so that the real zero is always exactly representable):

* symmetric, b bits: ``scale = clip * absmax / (2^(b-1) - 1)``, ``zero = 0``, codes in
  ``[-2^(b-1), 2^(b-1) - 1]`` (int8). ``-absmax`` maps to ``-(2^(b-1) - 1)``; the extra lowest
  code is only reached by values clipped away (``clip < 1``).
* asymmetric, b bits: the range ``[min, max]`` is first widened to include 0, then
  ``scale = clip * (max - min) / (2^b - 1)``, ``zero = round(-clip * min / scale)`` (an integer
  in ``[0, 2^b - 1]``), codes in ``[0, 2^b - 1]`` (uint8). Because zero is rounded, min and max
  are reproduced within scale/2 (exactly when they lie on the grid).
* ``x_hat = (code - zero) * scale``; qparams are always computed in fp32.
* A scale that would be ~0 (an all-zero row) is replaced by 1, so its codes are 0, x_hat = 0
  and nothing is NaN. (An absolute floor: a floor relative to the batch would make dynamic
  per-token quantization depend on the other tokens in the batch.)

Scale shapes: reduce over ``dim`` (default the last) and keep it, so ``channel`` on ``[out, in]``
gives ``[out, 1]`` and ``token`` on ``[b, t, d]`` gives ``[b, t, 1]``; ``group`` / ``head`` give
``[..., d // group_size]`` (one column per group, the compact layout a checkpoint stores);
``tensor`` gives all-ones dims. Codes always have ``x``'s shape.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import torch

from editcomp.errors import ConfigError
from editcomp.quant.spec import QuantSpec

_TINY = 1e-20  # scales below this are treated as "row is all zero"
_RANGE_GRAD = contextvars.ContextVar("editcomp_range_grad", default=False)


@contextlib.contextmanager
def range_gradients(enabled: bool = True):
    """Inside this block, dynamic qparams (computed from ``x`` by ``fake_quant``) pass gradients
    back to ``x``: the loss then sees that a smaller range gives a finer grid, the signal that
    lets learned rotations and scales (SpinQuant, OSTQuant) shrink outliers. Outside it they are
    detached, and the STE gradient of a dynamically quantized tensor is the identity."""
    token = _RANGE_GRAD.set(enabled)
    try:
        yield
    finally:
        _RANGE_GRAD.reset(token)


def _rows(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View ``x`` so that each set of elements sharing one scale lies along the last dim."""
    if spec.granularity == "tensor":
        return x.reshape(1, -1)
    if not spec.grouped:
        return x
    gs = spec.group_size
    if gs is None:
        raise ConfigError("granularity 'head' needs group_size = head_dim "
                          "(spec.replace(group_size=head_dim))")
    d = x.shape[-1]
    if d % gs:
        raise ConfigError(f"group size {gs} does not divide the last dimension {d} "
                          f"({d} % {gs} = {d % gs})")
    return x.reshape(*x.shape[:-1], d // gs, gs)


def _to_public(p: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Keepdim params of the ``_rows`` view -> the documented public shape."""
    if spec.granularity == "tensor":
        return p.reshape([1] * x.dim())
    return p.squeeze(-1) if spec.grouped else p


def _to_rows(p: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Public params -> broadcastable against the ``_rows`` view."""
    if spec.granularity == "tensor":
        return p.reshape(1, 1)
    return p.unsqueeze(-1) if spec.grouped else p


def _qparams_from_range(lo, hi, spec: QuantSpec, clip):
    if spec.symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) * clip / spec.qmax
        scale = torch.where(scale > _TINY, scale, torch.ones_like(scale))
        return scale, torch.zeros_like(scale)
    lo = torch.clamp(lo, max=0.0) * clip
    hi = torch.clamp(hi, min=0.0) * clip
    scale = (hi - lo) / spec.qmax
    scale = torch.where(scale > _TINY, scale, torch.ones_like(scale))
    return scale, torch.round(-lo / scale)


def compute_qparams(x: torch.Tensor, spec: QuantSpec, dim: int = -1, clip=None):
    """Scale and zero point of ``x`` for ``spec``, in fp32 (see module doc for shapes).

    ``dim`` is the dimension one scale spans (reduced over); groups must lie along the last dim.
    ``clip`` (a float or a tensor that broadcasts against the scales, e.g. a learnable scalar)
    replaces ``spec.clip_ratio``.
    """
    xf = x.float()
    moved = spec.granularity != "tensor" and dim not in (-1, x.dim() - 1)
    if moved:
        if spec.grouped:
            raise ValueError("group / head quantization groups the last dimension only")
        xf = xf.movedim(dim, -1)
    rows = _rows(xf, spec)
    scale, zero = _qparams_from_range(rows.amin(-1, keepdim=True), rows.amax(-1, keepdim=True),
                                      spec, spec.clip_ratio if clip is None else clip)
    scale, zero = _to_public(scale, xf, spec), _to_public(zero, xf, spec)
    if moved:
        scale, zero = scale.movedim(-1, dim), zero.movedim(-1, dim)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec):
    """Integer codes of ``x`` (int8 when symmetric, uint8 when not), same shape as ``x``."""
    rows = _rows(x.float(), spec)
    s, z = _to_rows(scale.float(), spec), _to_rows(zero.float(), spec)
    q = torch.clamp(torch.round(rows / s) + z, spec.qmin, spec.qmax)
    return q.reshape(x.shape).to(torch.int8 if spec.symmetric else torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(codes - zero) * scale``, computed in fp32, returned as ``dtype``."""
    rows = _rows(codes.float(), spec)
    s, z = _to_rows(scale.float(), spec), _to_rows(zero.float(), spec)
    return ((rows - z) * s).reshape(codes.shape).to(dtype)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward (straight-through estimator)."""
    return (x.round() - x).detach() + x


def _fake_rows(rows, s, z, spec: QuantSpec):
    q = torch.clamp(round_ste(rows / s) + z, spec.qmin, spec.qmax)
    return (q - z) * s


def fake_quant(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None,
               zero: torch.Tensor | None = None, clip=None) -> torch.Tensor:
    """Quantize-dequantize ``x`` with a straight-through gradient, returned in ``x``'s dtype.

    Without ``scale`` the qparams are computed from ``x`` (dynamic) and detached, so the
    gradient w.r.t. ``x`` is exactly 1 for every element inside the range (inside
    ``range_gradients()`` they are not detached: the range's elements also get the scale's
    gradient). With a learnable
    ``scale`` the gradient reaches it as in LSQ: ``round(x/s) - x/s`` inside the range, the
    clamped code minus zero outside; elements clipped away get zero gradient w.r.t. ``x``.
    A tensor ``clip`` (dynamic qparams only; it replaces ``spec.clip_ratio``) gets the same
    LSQ gradient through the scale it multiplies: a learnable clipping threshold.
    Values equal ``dequantize(quantize(x))`` bit for bit.
    """
    if scale is None:
        scale, zero = compute_qparams(x if _RANGE_GRAD.get() else x.detach(), spec, clip=clip)
    elif zero is None:
        zero = torch.zeros_like(scale, dtype=torch.float32)
    rows = _rows(x.float(), spec)
    s, z = _to_rows(scale.float(), spec), _to_rows(zero.float(), spec)
    return _fake_rows(rows, s, z, spec).reshape(x.shape).to(x.dtype)


def mse_clip_search(w: torch.Tensor, spec: QuantSpec, grid: int = 100, norm: float = 2.4,
                    max_shrink: float = 0.8):
    """Per-row (per-group) clip ratio minimizing ``sum |w_hat - w|^norm`` (GPTQ's "mse" search).

    Tries ranges shrunk by ``p = 1 - i/grid`` for ``i = 0 .. int(max_shrink*grid) - 1`` (as in the
    GPTQ reference, ``max_shrink`` is the largest *amount* of shrinking: p goes down to about
    ``1 - max_shrink``). ``spec.clip_ratio`` is ignored: the search replaces it.
    Returns ``(clip, scale, zero)``, all in the public scale shape.
    """
    rows = _rows(w.detach().float(), spec)
    lo, hi = rows.amin(-1, keepdim=True), rows.amax(-1, keepdim=True)
    best_err = torch.full_like(lo, math.inf)
    best_p = torch.ones_like(lo)
    for i in range(max(1, int(max_shrink * grid))):
        p = 1.0 - i / grid
        s, z = _qparams_from_range(lo, hi, spec, p)
        err = (_fake_rows(rows, s, z, spec) - rows).abs_().pow_(norm).sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_p = torch.where(better, torch.full_like(best_p, p), best_p)
    s, z = _qparams_from_range(lo, hi, spec, best_p)
    return tuple(_to_public(t, w, spec) for t in (best_p, s, z))


def unbiased_scales(w: torch.Tensor, levels: torch.Tensor, scale: torch.Tensor,
                    spec: QuantSpec) -> torch.Tensor:
    """Refit each scale of a symmetric (lookup-table) quantizer so that its weights' quantized
    values have no gain: ``<w_hat, w> = ||w||^2`` over the scale's weights, codes kept.

    ``levels``: the dequantized weights at scale 1 (``w_hat = levels * scale``), ``[out, in]``;
    ``scale`` in the public layout. Rounding to the nearest level and picking the scale that
    minimizes the weight error both shrink (``<w_hat, w> / ||w||^2`` ~ 0.995 at 4 bits): every
    layer's output then carries that gain and the following layers compound it, which costs
    more perplexity than the refit's slightly larger weight error (measured in NUPES). A scale
    whose weights are all zero, or whose fit would flip its sign, keeps its value.
    """
    keep = not spec.grouped
    rows, lv = _rows(w.detach().float(), spec), _rows(levels.float(), spec)
    num = (rows * rows).sum(-1, keepdim=keep)
    den = (lv * rows).sum(-1, keepdim=keep)
    new = num / torch.where(den.abs() > 1e-30, den, torch.ones_like(den))
    ok = (den.abs() > 1e-30) & (num > 0) & (new * scale > 0)
    return torch.where(ok, new, scale.float())


# ---- bit packing -------------------------------------------------------------------------

def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes ``pack_int`` uses for ``numel`` codes: exactly ``ceil(numel * bits / 8)``."""
    return (numel * bits + 7) // 8


def pack_int(codes: torch.Tensor, bits: int, signed: bool | None = None) -> torch.Tensor:
    """Pack integer codes densely into a flat uint8 tensor (row-major order of ``codes``).

    Signed codes (default for every dtype but uint8) are stored offset by ``2^(b-1)``. The
    packed bit stream is little-endian: code i occupies bits ``[i*b, (i+1)*b)``, bit j of the
    stream is bit ``j % 8`` of byte ``j // 8``. So 4-bit puts code 2k in the low nibble of byte
    k and 2k+1 in the high one, 2-bit puts four codes per byte, 8-bit is the offset codes as
    is, and 3-bit spans byte boundaries (8 codes in 3 bytes; no nibble padding).
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_int supports 1-8 bits, got {bits}")
    if signed is None:
        signed = codes.dtype != torch.uint8
    offset = 2 ** (bits - 1) if signed else 0
    u = codes.reshape(-1).to(torch.int16) + offset
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= 2 ** bits):
        kind = "signed" if signed else "unsigned"
        raise ValueError(f"codes out of the {kind} {bits}-bit range "
                         f"(min {int(u.min()) - offset}, max {int(u.max()) - offset})")
    u = u.to(torch.uint8)
    if bits == 8:
        return u
    if 8 % bits == 0:
        per = 8 // bits
        u = torch.nn.functional.pad(u, (0, (-u.numel()) % per)).view(-1, per)
        shifts = torch.arange(per, device=u.device, dtype=torch.uint8) * bits
        return (u << shifts).sum(-1).to(torch.uint8)
    stream = (u[:, None] >> torch.arange(bits, device=u.device, dtype=torch.uint8)) & 1
    stream = torch.nn.functional.pad(stream.reshape(-1), (0, (-stream.numel()) % 8)).view(-1, 8)
    return (stream << torch.arange(8, device=u.device, dtype=torch.uint8)).sum(-1).to(torch.uint8)


def unpack_int(packed: torch.Tensor, bits: int, shape, signed: bool = True) -> torch.Tensor:
    """Inverse of ``pack_int``: int8 codes when ``signed``, else uint8, of the given ``shape``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"unpack_int supports 1-8 bits, got {bits}")
    n = math.prod(shape)
    if packed.numel() < packed_nbytes(n, bits):
        raise ValueError(f"{packed.numel()} bytes cannot hold {n} codes of {bits} bits")
    p = packed.reshape(-1).to(torch.uint8)
    if bits == 8:
        u = p[:n]
    elif 8 % bits == 0:
        shifts = torch.arange(8 // bits, device=p.device, dtype=torch.uint8) * bits
        u = ((p[:, None] >> shifts) & (2 ** bits - 1)).reshape(-1)[:n]
    else:
        stream = ((p[:, None] >> torch.arange(8, device=p.device, dtype=torch.uint8)) & 1)
        stream = stream.reshape(-1)[: n * bits].view(n, bits)
        u = (stream << torch.arange(bits, device=p.device, dtype=torch.uint8)).sum(-1)
    offset = 2 ** (bits - 1) if signed else 0
    out = u.to(torch.int16) - offset
    return out.to(torch.int8 if signed else torch.uint8).reshape(shape)

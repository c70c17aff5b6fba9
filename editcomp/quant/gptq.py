"""GPTQ for one linear layer (Frantar et al., 2022), plus the calibration Hessian and RTN.

GPTQ quantizes the weight columns one at a time and spreads each column's rounding error over
the columns not yet quantized, weighted by the inverse Hessian ``H = 2 X^T X / n`` of the layer's
inputs, so the layer's *output* error ``||(W - W_hat) X^T||`` is small, not just the weight error.
Choices (as in the reference code unless said): dead inputs (``H_ii = 0``) get ``H_ii = 1`` and
weight 0; damping ``damp * mean(diag H)``; the upper Cholesky factor of ``H^-1``; lazy updates
in blocks of ``block_size`` columns. With groups, each group's qparams are computed when GPTQ
reaches its first column, from the error-updated weights (the block size is rounded to a
multiple of the group size so a group never straddles two blocks; the reference code instead
reads partly stale weights when ``group_size < block_size``). With ``act_order`` and groups the
qparams are static (computed from the original weights per contiguous group), so the stored
scales keep the plain ``[out, in // group_size]`` layout and need no group index.
"""

from __future__ import annotations

import math

import torch

from editcomp.errors import DataError, NumericalError
from editcomp.quant.ops import (_rows, compute_qparams, dequantize, mse_clip_search, quantize)
from editcomp.quant.spec import QuantSpec


class HessianAccumulator:
    """Running ``H = 2/N sum_i x_i x_i^T`` over all calibration rows seen so far, in fp32.

    Each ``add`` rescales the old sum by ``N_old / N_new``, so batches of any size weigh by
    their number of rows (tokens), and the values stay O(|x|^2) instead of growing with N.
    """

    def __init__(self, n_in: int, name: str = "layer", device=None,
                 dtype: torch.dtype = torch.float32):
        self.name = name
        self.count = 0
        self._H = torch.zeros(n_in, n_in, device=device, dtype=dtype)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach()
        if x.shape[-1] != self._H.shape[0]:
            raise ValueError(f"layer {self.name}: input width {x.shape[-1]} != {self._H.shape[0]}")
        x = x.reshape(-1, x.shape[-1]).to(self._H)
        if not torch.isfinite(x).all():
            raise NumericalError(f"calibration activations contain NaN/Inf for layer {self.name}")
        m = x.shape[0]
        if m == 0:
            return
        self._H.mul_(self.count / (self.count + m))
        self.count += m
        x = x * math.sqrt(2.0 / self.count)
        self._H.addmm_(x.t(), x)

    @property
    def H(self) -> torch.Tensor:
        if self.count == 0:
            raise DataError(f"no calibration activations reached layer {self.name}")
        return self._H


def _qparams(w: torch.Tensor, spec: QuantSpec, mse_clip: bool):
    if mse_clip:
        _, scale, zero = mse_clip_search(w, spec)
        return scale, zero
    return compute_qparams(w, spec)


def rtn_quantize_weight(W: torch.Tensor, spec: QuantSpec, mse_clip: bool = False):
    """Round-to-nearest baseline with GPTQ's return convention: ``(W_hat, codes, scale, zero)``."""
    W = W.detach().float()
    scale, zero = _qparams(W, spec, mse_clip)
    codes = quantize(W, scale, zero, spec)
    return dequantize(codes, scale, zero, spec), codes, scale, zero


def _upper_cholesky_of_inverse(H: torch.Tensor, name: str) -> torch.Tensor:
    """Upper ``U`` with ``U^T U = H^-1``; retried in fp64 if fp32 is not positive definite."""
    for dt in (torch.float32, torch.float64):
        L, info = torch.linalg.cholesky_ex(H.to(dt))
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0:
                return U.to(torch.float32)
    raise NumericalError(f"the Hessian of layer {name} is not positive definite after damping; "
                         f"use more calibration data or a larger damp")


def zero_dead_inputs(W: torch.Tensor, H: torch.Tensor) -> None:
    """Inputs that never fired carry no information: zero their weights and give them a unit
    Hessian diagonal so the factorization stays defined (in place)."""
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0


def prepare_hessian(W: torch.Tensor, H: torch.Tensor, damp: float, act_order: bool, name: str):
    """The shared set-up of every error-feedback pass (after ``zero_dead_inputs``): order the
    columns by activation (``act_order``: the most activated first, so their error has the most
    columns to be absorbed by), dampen, and factor. Returns ``(W, Hinv, perm)`` with ``W`` and
    ``Hinv`` in the working order; ``perm`` is None without act-order. ``H`` is modified."""
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp * torch.mean(torch.diagonal(H)))
    return W, _upper_cholesky_of_inverse(H, name), perm


def error_feedback(W: torch.Tensor, Hinv: torch.Tensor, quantize_column, block_size: int = 128):
    """GPTQ's column loop: quantize column by column, spreading each column's error over the
    columns not yet quantized through the upper Cholesky factor of ``H^-1``, blockwise.

    ``quantize_column(c, block, i)`` quantizes column ``c`` (= ``block[:, i]`` of the current,
    error-updated block) and returns its dequantized value; the grid is the caller's (uniform
    for GPTQ, power-exponent for NUPES). ``W`` is updated in place.
    """
    cols = W.shape[1]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            wq = quantize_column(i1 + i, W1, i)
            err = (W1[:, i:i + 1] - wq) / Hinv1[i, i]
            W1[:, i:] -= err * Hinv1[i:i + 1, i:]
            Err1[:, i:i + 1] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]


def gptq_quantize_weight(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, damp: float = 0.01,
                         block_size: int = 128, act_order: bool = False, mse_clip: bool = True,
                         name: str = "layer"):
    """Quantize ``W [out, in]`` with GPTQ against ``H [in, in]``.

    Returns ``(W_hat, codes, scale, zero)``: the dequantized fp32 weight, integer codes of
    ``W``'s shape (columns in the original order), and qparams in ``ops``' public layout
    (``[out, 1]`` per channel, ``[out, in // group_size]`` per group).
    ``mse_clip`` picks each row's (group's) clip ratio by GPTQ's MSE search instead of
    ``spec.clip_ratio``.
    """
    W = W.detach().float().clone()
    H = H.detach().to(device=W.device, dtype=torch.float32).clone()
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"layer {name}: Hessian {tuple(H.shape)} does not match weight {tuple(W.shape)}")
    if not torch.isfinite(H).all():
        raise NumericalError(f"calibration activations contain NaN/Inf for layer {name} "
                             f"(its Hessian is not finite)")
    if not torch.isfinite(W).all():
        raise NumericalError(f"the weights of layer {name} contain NaN/Inf")

    zero_dead_inputs(W, H)
    gs = spec.group_size if spec.grouped else None
    col_spec = spec.replace(granularity="channel", group_size=None) if gs else spec
    if gs:
        _rows(W, spec)  # raises ConfigError when group_size does not divide in
        static = act_order
        if static:
            scale, zero = _qparams(W, spec, mse_clip)
        else:
            scale = torch.zeros(rows, cols // gs, device=W.device)
            zero = torch.zeros_like(scale)
        block_size = max(1, block_size // gs) * gs
    else:
        static = False
        scale, zero = _qparams(W, spec, mse_clip)

    W, Hinv, perm = prepare_hessian(W, H, damp, act_order, name)
    perm_list = perm.tolist() if perm is not None else None
    W_hat = torch.zeros_like(W)
    codes = torch.zeros(rows, cols, device=W.device,
                        dtype=torch.int8 if spec.symmetric else torch.uint8)
    qp = {"s": scale, "z": zero}

    def quantize_column(c: int, block: torch.Tensor, i: int) -> torch.Tensor:
        if gs and static:
            g = perm_list[c] // gs
            qp["s"], qp["z"] = scale[:, g:g + 1], zero[:, g:g + 1]
        elif gs and c % gs == 0:  # a new group: its qparams from the error-updated columns
            qp["s"], qp["z"] = _qparams(block[:, i:i + gs], col_spec, mse_clip)
            scale[:, c // gs], zero[:, c // gs] = qp["s"][:, 0], qp["z"][:, 0]
        q = quantize(block[:, i:i + 1], qp["s"], qp["z"], col_spec)
        wq = dequantize(q, qp["s"], qp["z"], col_spec)
        codes[:, c:c + 1], W_hat[:, c:c + 1] = q, wq
        return wq

    error_feedback(W, Hinv, quantize_column, block_size)

    if perm is not None:
        inv = torch.argsort(perm)
        W_hat, codes = W_hat[:, inv], codes[:, inv]
    return W_hat, codes, scale, zero

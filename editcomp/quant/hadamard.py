"""Hadamard and random orthogonal matrices, and a fast Hadamard transform over the last dim.

Rotating by a Hadamard matrix spreads an outlier over all channels at O(n log n) cost. Model
widths are often not powers of two (SmolLM2: 576 = 36 * 16, 1536 = 12 * 128), so a size is
factored as ``n = m * 2^k`` with a Sylvester block for ``2^k`` and a Paley block for ``m``:

* Paley I: ``q`` prime, ``q = 3 (mod 4)`` gives order ``q + 1`` (12, 20, 24, 32, 44, 48, 60, ...)
* Paley II: ``q`` prime, ``q = 1 (mod 4)`` gives order ``2(q + 1)`` (12, 28, 36, 60, 76, ...)

and ``H_n = kron(H_m, H_{2^k}) / sqrt(n)``. Prime powers (needing GF(q) arithmetic) and other
constructions are not implemented; such sizes raise ``ConfigError``.
"""

from __future__ import annotations

import functools
import math

import scipy.linalg
import torch

from editcomp.errors import ConfigError


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _paley_kind(m: int) -> int:
    """1 or 2 when a Paley I / II construction of order ``m`` exists, else 0."""
    if m >= 4 and _is_prime(m - 1) and (m - 1) % 4 == 3:
        return 1
    if m >= 4 and m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return 2
    return 0


def hadamard_factors(n: int) -> tuple[int, int]:
    """``(m, p)`` with ``n = m * p``, ``p`` the largest possible power of two, ``m`` 1 or Paley."""
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"Hadamard size must be a positive integer, got {n!r}")
    k = (n & -n).bit_length() - 1  # largest power of two dividing n
    for a in range(k, -1, -1):
        m = n >> a
        if m == 1 or _paley_kind(m):
            return m, 1 << a
    raise ConfigError(
        f"no Hadamard construction for size {n}: supported sizes are m * 2^k with m = 1, "
        f"q + 1 (q prime, q = 3 mod 4) or 2(q + 1) (q prime, q = 1 mod 4), e.g. 12, 20, 28, 36, "
        f"60 (so 576 = 36 * 16, 1536 = 12 * 128); any Hadamard size is 1, 2 or a multiple of 4")


def _paley(m: int) -> torch.Tensor:
    """Unnormalized +-1 Paley matrix of order ``m`` (float64)."""
    kind = _paley_kind(m)
    q = m - 1 if kind == 1 else m // 2 - 1
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)],
                       dtype=torch.float64)
    idx = torch.arange(q)
    jac = chi[(idx[None, :] - idx[:, None]) % q]  # Jacobsthal Q[i, j] = chi(j - i)
    ones = torch.ones(q, dtype=torch.float64)
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[1:, 1:] = jac
    c[0, 1:] = ones
    if kind == 1:  # q = 3 mod 4: Q skew, H = I + [[0, 1], [-1, Q]]
        c[1:, 0] = -ones
        return c + torch.eye(q + 1, dtype=torch.float64)
    c[1:, 0] = ones  # q = 1 mod 4: Q symmetric, C = [[0, 1], [1, Q]] (conference matrix)
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


@functools.lru_cache(maxsize=16)
def _sylvester(p: int) -> torch.Tensor:
    return torch.from_numpy(scipy.linalg.hadamard(p, dtype="float64"))


@functools.lru_cache(maxsize=32)
def _block(m: int) -> torch.Tensor:
    return torch.ones(1, 1, dtype=torch.float64) if m == 1 else _paley(m)


@functools.lru_cache(maxsize=16)
def _hadamard64(n: int) -> torch.Tensor:
    m, p = hadamard_factors(n)
    h = _sylvester(p) if m == 1 else torch.kron(_block(m), _sylvester(p))
    return h * (1.0 / math.sqrt(n))


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Normalized ``[n, n]`` Hadamard matrix (``H @ H.T = I``, entries +-1/sqrt(n)); a fresh copy."""
    return _hadamard64(n).to(dtype=dtype, copy=True)


def random_signs(n: int, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``n`` random +-1 values (CPU)."""
    return (torch.randint(0, 2, (n,), generator=generator) * 2 - 1).to(dtype)


def random_hadamard(n: int, generator: torch.Generator | None = None,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``H @ diag(s)`` with random signs ``s`` (QuaRot's randomized Hadamard); orthogonal.

    Equals ``apply_hadamard(eye, n, signs=random_signs(n, g))`` for a generator in the same state.
    """
    return hadamard_matrix(n, dtype) * random_signs(n, generator, dtype)[None, :]


def random_orthogonal(n: int, generator: torch.Generator | None = None,
                      dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Haar-random orthogonal matrix: QR of a Gaussian, with R's diagonal signs moved into Q."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    d = torch.sign(torch.diagonal(r))
    return (q * torch.where(d == 0, torch.ones_like(d), d)[None, :]).to(dtype)


_RADIX_LOG2 = 6  # stages apply 64 x 64 (or smaller) Sylvester blocks


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform over the last dim (a power of two): ``x @ H_p``.

    Radix-64 form of the butterfly: ``H_p = H_f1 (x) H_f2 (x) ...`` with each ``f <= 64``, one
    small matmul per stage (2 stages for 2048), which on CPU and GPU is several times faster
    than the radix-2 butterfly's log2(p) memory passes and than a dense matmul.
    """
    lead, p = x.shape[:-1], x.shape[-1]
    k = p.bit_length() - 1
    stages = max(1, -(-k // _RADIX_LOG2))
    x = x.reshape(-1, p)
    post = 1
    for i in range(stages):
        f = 1 << (k // stages + (1 if i < k % stages else 0))
        h = _sylvester(f).to(device=x.device, dtype=x.dtype)
        if post == 1:
            x = (x.view(-1, p // f, f) @ h).reshape(-1, p)
        else:  # H_f is symmetric, so H_f @ y transforms the middle axis
            x = torch.matmul(h, x.view(-1, p // (f * post), f, post)).reshape(-1, p)
        post *= f
    return x.reshape(*lead, p)


def apply_hadamard(x: torch.Tensor, n_or_matrix: int | torch.Tensor,
                   signs: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ H`` over the last dim (times ``diag(signs)`` if given), in ``x``'s dtype.

    With an int size this runs a fast Walsh-Hadamard transform over the ``2^k`` factor and a
    small matmul with the Paley block over the ``m`` factor, ``O(n (64 * stages + m))`` per row
    instead of ``O(n^2)``. With a matrix it is a plain matmul. Computes in fp32 (fp64 for fp64).
    """
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    if isinstance(n_or_matrix, torch.Tensor):
        y = x.to(cdt) @ n_or_matrix.to(device=x.device, dtype=cdt)
    else:
        n = int(n_or_matrix)
        if x.shape[-1] != n:
            raise ConfigError(f"Hadamard size {n} does not match the last dimension {x.shape[-1]}")
        m, p = hadamard_factors(n)
        y = _fwht(x.to(cdt).reshape(-1, m, p))
        if m > 1:  # x as [m, p] rows: x @ kron(A, B) = A^T (x B)
            a = _block(m).to(device=x.device, dtype=cdt)
            y = torch.matmul(a.t(), y)
        y = (y * (1.0 / math.sqrt(n))).reshape(x.shape)
    if signs is not None:
        y = y * signs.to(device=x.device, dtype=cdt)
    return y.to(x.dtype)

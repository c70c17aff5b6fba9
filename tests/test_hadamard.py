"""Hadamard / orthogonal matrices and the fast Hadamard transform (editcomp.quant.hadamard)."""

import math
import time

import pytest
import torch

from editcomp.errors import ConfigError
from editcomp.quant.hadamard import (apply_hadamard, hadamard_factors, hadamard_matrix,
                                     random_hadamard, random_orthogonal, random_signs)

REQUIRED = [64, 128, 256, 576, 640, 1536, 2048, 960, 1152, 4096]


@pytest.mark.parametrize("n", REQUIRED + [1, 2, 4, 12, 20, 28, 36, 60, 24])
def test_hadamard_is_orthogonal_with_pm_entries(n):
    H = hadamard_matrix(n)
    assert H.shape == (n, n) and H.dtype == torch.float64
    if n <= 1536:
        assert (H @ H.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-10
    else:  # the full n^3 Gram takes seconds; H H^T V = V for random probes V is as telling
        V = torch.randn(n, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
        assert (H @ (H.T @ V) - V).abs().max() < 1e-10
        assert (H.T @ (H @ V) - V).abs().max() < 1e-10
    assert H.abs_().sub_(1 / math.sqrt(n)).abs_().max() < 1e-12 / math.sqrt(n)


def test_factorization_of_model_widths():
    assert hadamard_factors(576) == (36, 16)
    assert hadamard_factors(1536) == (12, 128)
    assert hadamard_factors(640) == (20, 32)
    assert hadamard_factors(2048) == (1, 2048)


@pytest.mark.parametrize("n", [3, 5, 6, 10, 14, 18, 100, 0])
def test_invalid_sizes_raise_config_error(n):
    with pytest.raises(ConfigError) as e:
        hadamard_matrix(n)
    assert str(n) in str(e.value)


def test_cached_matrix_is_not_shared():
    H = hadamard_matrix(576)
    H.zero_()
    assert hadamard_matrix(576).abs().min() > 0
    assert hadamard_matrix(576, torch.float32).dtype == torch.float32


@pytest.mark.parametrize("n", [576, 1536, 2048, 640, 960, 12, 64])
def test_apply_hadamard_matches_dense(n):
    x = torch.randn(2, 3, n, generator=torch.Generator().manual_seed(n))
    ref = x.double() @ hadamard_matrix(n)
    y = apply_hadamard(x, n)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert (y.double() - ref).abs().max() < 1e-5
    y64 = apply_hadamard(x.double(), n)
    assert (y64 - ref).abs().max() < 1e-12
    # dense path and the inverse: H^T undoes H
    assert torch.allclose(apply_hadamard(x, hadamard_matrix(n)).double(), ref, atol=1e-5)
    assert torch.allclose(apply_hadamard(y64, hadamard_matrix(n).T), x.double(), atol=1e-10)


def test_apply_hadamard_bf16_and_size_mismatch():
    x = torch.randn(4, 576).to(torch.bfloat16)
    y = apply_hadamard(x, 576)
    assert y.dtype == torch.bfloat16
    ref = x.double() @ hadamard_matrix(576)
    assert (y.double() - ref).abs().max() < 0.05
    with pytest.raises(ConfigError, match="576"):
        apply_hadamard(torch.randn(2, 512), 576)


def test_fast_hadamard_beats_dense_matmul_at_2048():
    x = torch.randn(512, 2048)
    H = hadamard_matrix(2048, torch.float32)

    def best(f):
        f()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return min(times)

    assert best(lambda: apply_hadamard(x, 2048)) < best(lambda: x @ H)


def test_random_hadamard_is_signed_hadamard():
    g = torch.Generator().manual_seed(0)
    R = random_hadamard(576, g)
    assert (R @ R.T - torch.eye(576, dtype=torch.float64)).abs().max() < 1e-10
    s = R[0] / hadamard_matrix(576)[0]  # column signs
    assert set(s.round().tolist()) == {-1.0, 1.0}
    assert torch.allclose(R, hadamard_matrix(576) * s)
    g.manual_seed(0)
    assert torch.equal(random_hadamard(576, g), R)
    g.manual_seed(0)
    signs = random_signs(576, g)
    x = torch.randn(3, 576, dtype=torch.float64)
    assert torch.allclose(apply_hadamard(x, 576, signs=signs), x @ R, atol=1e-12)


def test_random_orthogonal():
    g = torch.Generator().manual_seed(0)
    Q = random_orthogonal(64, g)
    assert (Q @ Q.T - torch.eye(64, dtype=torch.float64)).abs().max() < 1e-12
    assert not torch.equal(Q, random_orthogonal(64, g))
    g.manual_seed(0)
    assert torch.equal(random_orthogonal(64, g), Q)
    assert random_orthogonal(8, g, dtype=torch.float32).dtype == torch.float32

"""QSUR: exact value for an isotropic Gaussian, ordering of round vs stretched data, rotations
raise it, and the per-layer report on a tiny model."""

import math

import pytest
import torch

from editcomp.quant.hadamard import hadamard_matrix
from editcomp.quant.qsur import layer_qsur, log_qsur_from_moments, qsur
from editcomp.tiny import tiny_model


def ball_root(d: int) -> float:
    """``V_d^(1/d) / 2``: QSUR^(1/d) of an isotropic zero-mean Gaussian (the maximum)."""
    return math.exp((0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1)) / d) / 2


@pytest.mark.parametrize("d", [4, 64, 1536])
def test_isotropic_gaussian_reaches_the_closed_form(d):
    got = math.exp(log_qsur_from_moments(torch.zeros(d), torch.eye(d) * 3.0) / d)
    assert got == pytest.approx(ball_root(d), rel=1e-9)  # finite even where volumes overflow


def test_round_data_beats_stretched_data_and_rotation_recovers():
    g = torch.Generator().manual_seed(0)
    d, n = 64, 20000
    iso = torch.randn(n, d, generator=g)
    stretched = iso * torch.logspace(0, 1.5, d)  # per-channel spreads from 1 to ~32
    outlier = iso.clone()
    outlier[:, 3] *= 50  # one massive channel, as in LLM activations
    q_iso, q_str, q_out = qsur(iso), qsur(stretched), qsur(outlier)
    assert q_iso == pytest.approx(ball_root(d), rel=0.03)
    assert q_str < 0.5 * q_iso and q_out < 0.5 * q_iso
    H = hadamard_matrix(d, torch.float32)
    assert qsur(outlier @ H) > 2 * q_out  # the rotation spreads the outlier over all channels
    assert qsur(stretched @ H) > 1.5 * q_str
    assert qsur(iso @ H) == pytest.approx(q_iso, rel=0.02)  # nothing to gain when already round


def test_off_centre_data_uses_less_of_the_grid():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20000, 32, generator=g)
    shifted = x.clone()
    shifted[:, 0] += 6.0
    assert qsur(shifted) < 0.8 * qsur(x)


def test_singular_covariance_is_zero_not_nan():
    x = torch.randn(1000, 8)
    x[:, 5] = 0.0
    assert qsur(x) == 0.0


def test_layer_report_on_a_tiny_model():
    model = tiny_model("llama")
    rep = layer_qsur(model, torch.randint(3, 500, (2, 96)))
    assert len(rep["layers"]) == 2 and rep["tokens"] == 192
    for row in rep["layers"]:
        for k in ("attn_in", "o_in", "mlp_in", "down_in"):
            d = {"attn_in": 64, "o_in": 64, "mlp_in": 64, "down_in": 128}[k]
            assert 0 < row[k] <= ball_root(d) * 1.001

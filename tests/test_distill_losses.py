"""Distillation losses against their direct formulas (float64 probabilities), masking, chunking,
bf16 inputs and numerically hostile logits."""

from __future__ import annotations

import math

import pytest
import torch

from editcomp.distill.losses import (LOSSES, distill_loss, get_loss, teacher_confidence,
                                     token_losses)
from editcomp.errors import ConfigError
from editcomp.quant.klloss import kl_top


def _logits(seed=0, shape=(2, 5, 37), scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _kl(a, b):
    return (a * (a / b).log()).sum(-1)


def _direct(name, s, t, **kw):
    """The textbook formula on float64 probabilities."""
    q, p = torch.softmax(s.double(), -1), torch.softmax(t.double(), -1)
    if name == "fkl":
        return _kl(p, q)
    if name == "rkl":
        return _kl(q, p)
    if name == "jsd":
        b = kw.get("beta", 0.5)
        m = b * p + (1 - b) * q
        return b * _kl(p, m) + (1 - b) * _kl(q, m)
    if name == "skl":
        a = kw.get("alpha", 0.1)
        return _kl(p, a * p + (1 - a) * q)
    if name == "srkl":
        a = kw.get("alpha", 0.1)
        return _kl(q, a * q + (1 - a) * p)
    if name == "kltop":
        idx = p.topk(kw["k"], -1).indices
        pk, qk = p.gather(-1, idx), q.gather(-1, idx)
        return (pk * (pk / qk).log()).sum(-1)
    if name == "cakld":
        g = kw["gamma"]
        return g * _kl(q, p) + (1 - g) * _kl(p, q)
    raise AssertionError(name)


CASES = [("fkl", {}), ("rkl", {}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.2}),
         ("skl", {"alpha": 0.1}), ("skl", {"alpha": 0.5}), ("srkl", {"alpha": 0.1}),
         ("srkl", {"alpha": 0.3}), ("kltop", {"k": 5}), ("cakld", {"gamma": 0.3})]


@pytest.mark.parametrize("name,kw", CASES)
def test_matches_direct_formula(name, kw):
    s, t = _logits(0), _logits(1)
    got = token_losses(name, s, t, **kw)
    want = _direct(name, s, t, **kw)
    assert got.shape == s.shape[:-1] and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    assert (want > 1e-3).all()  # a real, non-trivial divergence was compared


def test_every_registered_loss_is_zero_for_identical_and_positive_otherwise():
    s, t = _logits(0), _logits(1)
    for name in LOSSES:
        assert token_losses(name, t, t).abs().max() < 1e-5, name
        assert (token_losses(name, s, t) > 0).all(), name


def test_special_cases_reduce_to_the_plain_kls():
    s, t = _logits(2), _logits(3)
    torch.testing.assert_close(token_losses("skl", s, t, alpha=0.0), token_losses("fkl", s, t))
    torch.testing.assert_close(token_losses("srkl", s, t, alpha=0.0), token_losses("rkl", s, t))
    torch.testing.assert_close(token_losses("cakld", s, t, gamma=1.0), token_losses("rkl", s, t))
    torch.testing.assert_close(token_losses("cakld", s, t, gamma=0.0), token_losses("fkl", s, t))
    # symmetric JSD is symmetric and bounded by log 2
    j = token_losses("jsd", s, t, beta=0.5)
    torch.testing.assert_close(j, token_losses("jsd", t, s, beta=0.5))
    assert (j <= math.log(2) + 1e-6).all()


def test_cakld_default_gamma_is_the_teachers_mean_top1_confidence():
    s, t = _logits(4), _logits(5)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    conf = torch.softmax(t.double(), -1).amax(-1)[mask].mean().item()
    total, n = teacher_confidence(t, mask)
    assert n == int(mask.sum()) and total / n == pytest.approx(conf, rel=1e-6)
    got = token_losses("cakld", s, t, mask)
    want = _direct("cakld", s, t, gamma=conf) * mask
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_kltop_agrees_with_the_ostquant_kl_top():
    s, t = _logits(6, (3, 7, 50)), _logits(7, (3, 7, 50))
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(0)) > 0.4
    mine = distill_loss("kltop", s, t, mask, k=10)
    theirs = kl_top(s, t, k=10, mask=mask)
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", list(LOSSES))
def test_mask_chunking_and_gradient(name):
    s, t = _logits(8, (2, 9, 40)), _logits(9, (2, 9, 40))
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 2:6] = True
    mask[1, 7] = True
    kw = {"kltop": {"k": 6}, "cakld": {"gamma": 0.4}}.get(name, {})
    full = token_losses(name, s, t, **kw)
    per = token_losses(name, s, t, mask, **kw)
    assert (per[~mask] == 0).all()
    torch.testing.assert_close(per[mask], full[mask], rtol=1e-5, atol=1e-7)
    mean = distill_loss(name, s, t, mask, **kw)
    torch.testing.assert_close(mean, full[mask].mean(), rtol=1e-5, atol=1e-7)

    # chunked + recomputed backward gives the gradient of the plain computation
    a = s.clone().requires_grad_(True)
    distill_loss(name, a, t, mask, chunk=2, **kw).backward()
    b = s.clone().requires_grad_(True)
    (get_loss(name)(b, t, **kw) * mask).sum().div(mask.sum()).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)
    assert a.grad[~mask].abs().max() == 0  # masked positions get no gradient
    assert a.grad[mask].abs().max() > 0


@pytest.mark.parametrize("name", list(LOSSES))
def test_bf16_logits_give_the_fp32_result(name):
    s, t = _logits(10).bfloat16(), _logits(11).bfloat16()
    kw = {"k": 5} if name == "kltop" else {}
    got = token_losses(name, s, t, **kw)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, token_losses(name, s.float(), t.float(), **kw))


@pytest.mark.parametrize("name", list(LOSSES))
def test_extreme_logits_stay_finite(name):
    s, t = _logits(12, scale=1e4), _logits(13, scale=1e4)
    t[..., :3] = -math.inf  # classes the teacher rules out
    kw = {"k": 5} if name == "kltop" else {}
    a = s.clone().requires_grad_(True)
    loss = distill_loss(name, a, t, **kw)
    loss.backward()
    assert torch.isfinite(token_losses(name, s, t, **kw)).all()
    assert torch.isfinite(a.grad).all()


def test_bad_names_and_parameters_are_config_errors():
    s, t = _logits(0), _logits(1)
    with pytest.raises(ConfigError, match="unknown distillation loss 'kld'.*fkl"):
        token_losses("kld", s, t)
    with pytest.raises(ConfigError, match="beta"):
        token_losses("jsd", s, t, beta=1.0)
    with pytest.raises(ConfigError, match="alpha"):
        token_losses("skl", s, t, alpha=1.0)
    with pytest.raises(ConfigError, match="gamma"):
        token_losses("cakld", s, t, gamma=1.5)
    with pytest.raises(ConfigError, match="vocabularies differ"):
        token_losses("fkl", s, _logits(1, (2, 5, 38)))

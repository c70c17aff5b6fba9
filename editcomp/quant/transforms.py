"""Function-preserving transforms fused into a model's weights (the QuaRot / OSTQuant layout).

Each transform rewrites weights so the model computes the same function in exact arithmetic,
while activations and weights live in a basis that quantizes better: rotations spread outlier
channels over all channels, scales move range between an activation and the weight reading it.
Weights change in place, computed in float64 and cast back to their dtype.

Conventions, for a linear with weight ``W [out, in]`` computing ``y = x W^T + b``:

* input side, ``W_new = W @ M``: the layer now reads ``x M^{-T}`` (``x R`` for orthogonal ``R``,
  ``x / s`` for ``M = diag(s)``);
* output side, ``W_new = R^T @ W`` and ``b_new = R^T b``: the layer now writes ``y R``.

The residual stream is rotated as a row vector, ``h -> h R``: embedding ``E R``, readers
``W R``, writers ``R^T W``. Order that keeps every step exact: ``fold_norms`` ->
``rotate_residual`` -> ``rotate_ov`` -> scales -> ``add_down_hadamard`` (``quarot`` does the
fixed-rotation subset). All transforms reach modules only through the arch adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from editcomp.arch import ArchAdapter, LayerParts, get_adapter
from editcomp.errors import ConfigError
from editcomp.quant.hadamard import apply_hadamard, hadamard_factors, hadamard_matrix, random_hadamard

F64 = torch.float64


class HadamardInput(nn.Module):
    """``linear(x @ H)`` with ``H`` the normalized ``hadamard_size`` Hadamard matrix.

    QuaRot's online R4 on down_proj's input: the FFN activation has outlier channels that no
    fused rotation can reach (it is made by an elementwise product), so it is rotated at run
    time and ``linear`` holds ``W @ H`` to keep the output unchanged. A quantized runtime
    absorbs this module and quantizes ``x @ H`` instead of ``x``.
    """

    def __init__(self, linear: nn.Module, hadamard_size: int | None = None):
        super().__init__()
        self.linear = linear
        self.hadamard_size = int(hadamard_size or linear.in_features)

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(apply_hadamard(x, self.hadamard_size))

    def extra_repr(self) -> str:
        return f"hadamard_size={self.hadamard_size}"


# -- helpers ------------------------------------------------------------------------------

def _fuse(param: torch.Tensor | None, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """``param <- fn(param)`` computed in float64, in place (the Parameter object is kept)."""
    if param is not None:
        with torch.no_grad():
            param.copy_(fn(param.detach().to(F64)).to(param.dtype))


def _inner(module: nn.Module) -> nn.Module:
    """The linear holding the weights; a ``HadamardInput`` only changes the input side."""
    return module.linear if isinstance(module, HadamardInput) else module


def _vector(s, n: int, what: str, device) -> torch.Tensor:
    s = torch.as_tensor(s).detach().to(device=device, dtype=F64).reshape(-1)
    if s.numel() != n:
        raise ConfigError(f"{what}: scale vector has {s.numel()} entries, expected {n}")
    if not (torch.isfinite(s).all() and (s != 0).all()):
        raise ConfigError(f"{what}: scales must be finite and nonzero")
    return s


def _check_orthogonal(r: torch.Tensor, what: str, tol: float = 1e-3) -> None:
    eye = torch.eye(r.shape[-1], dtype=F64, device=r.device)
    err = (r @ r.transpose(-1, -2) - eye).abs().max().item()
    if err > tol:
        raise ConfigError(f"{what} is not orthogonal (max |R R^T - I| = {err:.2e})")


# -- untie and fold -----------------------------------------------------------------------

def untie_lm_head(model: nn.Module) -> nn.Module:
    """Give lm_head its own copy of a tied embedding, so the two can be transformed apart
    (lm_head absorbs the final norm's gain; the embedding does not).

    Also marks the config untied so a saved checkpoint keeps both matrices.
    """
    a = get_adapter(model)
    if a.tied_embeddings:
        a.lm_head.weight = nn.Parameter(a.embed.weight.detach().clone(),
                                        requires_grad=a.embed.weight.requires_grad)
    model.config.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):  # transformers' cached tying map, read on load/save
        model.all_tied_weights_keys = {}
    return model


def _fold(a: ArchAdapter, norm: nn.Module, readers: Sequence[nn.Module]) -> None:
    g = a.norm_gain(norm).to(F64)
    for lin in readers:
        _fuse(_inner(lin).weight, lambda w: w * g.to(w.device))
    a.set_norm_gain(norm, torch.ones_like(g))


def fold_norms(model: nn.Module) -> nn.Module:
    """Move every pre-norm gain into the linears that read it and set the gains to 1.

    A unit-gain RMSNorm commutes with a residual rotation (``||h R|| = ||h||``). Gemma3's
    post-norms (on branch outputs) have no linear reading them and are left as they are.
    """
    a = get_adapter(model)
    untie_lm_head(model)
    for p in a.layers():
        _fold(a, p.attn_in_norm, (p.q, p.k, p.v))
        _fold(a, p.mlp_in_norm, (p.gate, p.up))
    _fold(a, a.final_norm, (a.lm_head,))
    return model


# -- rotations ----------------------------------------------------------------------------

def _check_unit_gains(a: ArchAdapter) -> None:
    norms = [a.final_norm] + [n for p in a.layers() for n in (p.attn_in_norm, p.mlp_in_norm)]
    for norm in norms:
        g = a.norm_gain(norm)
        if not torch.allclose(g, torch.ones_like(g), rtol=0, atol=1e-5):
            raise ConfigError("rotate_residual needs unit norm gains (a gain does not commute "
                              "with a rotation): call fold_norms first, and apply scales after "
                              f"rotating; found gains in [{g.min().item():.3g}, {g.max().item():.3g}]")


def check_rotation(model: nn.Module, method: str, bits) -> None:
    """Refuse a rotation method (``method``: quarot / ostquant) at 4-bit (or lower) activations
    on a family whose residual stream cannot be rotated (``residual_rotation_blocker``).

    QuaRot and OSTQuant make 4-bit activations usable by rotating the residual stream, which
    spreads its outlier channels over all channels; without that rotation the per-token grid is
    set by the outliers. Measured on gemma3-270m (benchmarks/results/
    distill_edit_survival_gemma3_run1.txt, 16 training steps): ostquant w4a4kv4 without the
    residual rotation gave ppl 2.9e9 against 50 in fp, RTN w4a4kv4 1.3e4. Weight-only and
    8-bit-activation settings run without it (gemma3 w4a16 per channel, 2 x 2048 windows:
    QuaRot 73.2, OSTQuant 74.8, GPTQ 81.0, fp 49.9; quant_gemma3_w4a16.json).
    """
    a = get_adapter(model)
    if a.residual_rotation_blocker and bits.act is not None and bits.act.bits <= 4:
        raise ConfigError(
            f"{method} {bits.name} is not supported on {a.family}: 4-bit activations need the "
            f"residual-stream rotation, and {a.residual_rotation_blocker}. Use --method "
            f"{method} with w4a16 or w4a8kv8 (no residual rotation), or rtn / gptq for an "
            f"unrotated w4a4 baseline")


def rotate_residual(model: nn.Module, R: torch.Tensor) -> nn.Module:
    """Rotate the residual stream by orthogonal ``R [d, d]`` (``h -> h R``).

    Embedding ``E R``; q/k/v/gate/up/lm_head ``W R``; o/down ``R^T W`` (and ``R^T b``).
    Needs folded norms. Refused for families whose adapter states a blocker (Gemma3).
    """
    a = get_adapter(model)
    if a.residual_rotation_blocker:
        raise ConfigError(f"cannot rotate the residual stream of a {a.family} model: "
                          f"{a.residual_rotation_blocker}")
    d = a.hidden_size
    R = torch.as_tensor(R).detach().to(device=a.embed.weight.device, dtype=F64)
    if R.shape != (d, d):
        raise ConfigError(f"residual rotation must be [{d}, {d}], got {list(R.shape)}")
    _check_orthogonal(R, "residual rotation")
    _check_unit_gains(a)
    tied = a.tied_embeddings  # tied and unit final gain: E R is also the right lm_head

    def reads(w):
        return w @ R.to(w.device)

    def writes(w):  # weights and biases: R^T W, R^T b
        return R.to(w.device).T @ w

    _fuse(a.embed.weight, reads)
    if not tied:
        _fuse(a.lm_head.weight, reads)
    for p in a.layers():
        for lin in (p.q, p.k, p.v, p.gate, p.up):
            _fuse(lin.weight, reads)
        for lin in (p.o, _inner(p.down)):
            _fuse(lin.weight, writes)
            _fuse(lin.bias, writes)
    return model


def rotate_ov(model: nn.Module, R_ov: Sequence[torch.Tensor]) -> nn.Module:
    """Rotate each KV head's values by its own orthogonal ``[head_dim, head_dim]`` matrix.

    ``R_ov[i]`` is ``[num_kv_heads, head_dim, head_dim]`` for layer ``i``. v_proj's rows of head
    j become ``R_j^T W_j`` (values ``v R_j``), and o_proj's input columns of every query head
    reading kv head j become ``W R_j``. Attention mixes values over positions, not channels,
    so this is exact; q/k (and their per-head norms) are untouched.
    """
    a = get_adapter(model)
    layers = a.layers()
    kv, hd, nh = a.num_kv_heads, a.head_dim, a.num_heads
    if len(R_ov) != len(layers):
        raise ConfigError(f"rotate_ov needs one rotation stack per layer ({len(layers)}), "
                          f"got {len(R_ov)}")
    for p, r in zip(layers, R_ov):
        r = torch.as_tensor(r).detach().to(device=p.v.weight.device, dtype=F64)
        if r.shape != (kv, hd, hd):
            raise ConfigError(f"layer {p.index}: OV rotation must be [{kv}, {hd}, {hd}], "
                              f"got {list(r.shape)}")
        _check_orthogonal(r, f"layer {p.index} OV rotation")
        rq = r.repeat_interleave(nh // kv, dim=0)  # query head h reads kv head h // group
        _fuse(p.v.weight, lambda w: (r.transpose(1, 2) @ w.view(kv, hd, -1)).reshape(kv * hd, -1))
        _fuse(p.v.bias, lambda b: (b.view(kv, 1, hd) @ r).reshape(-1))  # (R^T b)^T = b^T R
        _fuse(p.o.weight, lambda w: torch.einsum("ohi,hij->ohj", w.view(w.shape[0], nh, hd),
                                                 rq).reshape(w.shape[0], -1))
    return model


# -- scales (OSTQuant learns them; these fuse the learned vectors) -------------------------

def _scale_norm(a: ArchAdapter, norm: nn.Module, readers: Sequence[nn.Module], s, what) -> None:
    s = _vector(s, readers[0].in_features, what, readers[0].weight.device)
    a.set_norm_gain(norm, a.norm_gain(norm).to(F64) / s.to(norm.weight.device))
    for lin in readers:
        _fuse(lin.weight, lambda w: w * s)


def scale_qkv(adapter: ArchAdapter, layer: LayerParts, s) -> None:
    """Attention input norm gain ``/ s``, q/k/v input columns ``* s`` (folded or not)."""
    _scale_norm(adapter, layer.attn_in_norm, (layer.q, layer.k, layer.v), s,
                f"layer {layer.index} scale_qkv")


def scale_upgate(adapter: ArchAdapter, layer: LayerParts, s) -> None:
    """MLP input norm gain ``/ s``, gate/up input columns ``* s``."""
    _scale_norm(adapter, layer.mlp_in_norm, (layer.gate, layer.up), s,
                f"layer {layer.index} scale_upgate")


def scale_ov(adapter: ArchAdapter, layer: LayerParts, s) -> None:
    """v_proj rows (and bias) ``/ s``, o_proj input columns ``* s``.

    ``s`` has ``num_kv_heads * head_dim`` entries; under GQA each kv head's part multiplies
    the columns of every query head that reads it.
    """
    kv, hd = adapter.num_kv_heads, adapter.head_dim
    s = _vector(s, kv * hd, f"layer {layer.index} scale_ov", layer.v.weight.device)
    sq = s.view(kv, hd).repeat_interleave(adapter.num_heads // kv, dim=0).reshape(-1)
    _fuse(layer.v.weight, lambda w: w / s[:, None])
    _fuse(layer.v.bias, lambda b: b / s)
    _fuse(layer.o.weight, lambda w: w * sq.to(w.device))


def scale_updown(adapter: ArchAdapter, layer: LayerParts, s) -> None:
    """up_proj rows (and bias) ``/ s``, down_proj input columns ``* s``.

    Exact because ``act(gate x) * (up x / s) * s`` is unchanged. Works after
    ``add_down_hadamard`` too: the scale is then applied before the fused Hadamard.
    """
    s = _vector(s, adapter.intermediate_size, f"layer {layer.index} scale_updown",
                layer.up.weight.device)
    _fuse(layer.up.weight, lambda w: w / s[:, None])
    _fuse(layer.up.bias, lambda b: b / s)
    if isinstance(layer.down, HadamardInput):  # holds W H: make it (W diag(s)) H
        h = hadamard_matrix(layer.down.hadamard_size).to(s.device)
        _fuse(layer.down.linear.weight, lambda w: ((w @ h.T) * s) @ h)
    else:
        _fuse(layer.down.weight, lambda w: w * s)


# -- online Hadamard and the QuaRot layout --------------------------------------------------

def add_down_hadamard(model: nn.Module) -> nn.Module:
    """Wrap every down_proj in ``HadamardInput`` with ``W <- W @ H``.

    ``x W^T = (x H)(W H)^T`` since ``H H^T = I``. Layers already wrapped are left alone.
    """
    a = get_adapter(model)
    n = a.intermediate_size
    h = hadamard_matrix(n)  # raises ConfigError for an unsupported size before any change
    for p in a.layers():
        if isinstance(p.down, HadamardInput):
            continue
        _fuse(p.down.weight, lambda w: w @ h.to(w.device))
        p.replace("down", HadamardInput(p.down, n))
    return model


def quarot(model: nn.Module, seed: int = 0, residual: bool = True) -> nn.Module:
    """QuaRot's layout with fixed random Hadamard rotations (no scales), in place.

    Untie, fold norms, ``R_res`` = random Hadamard over the hidden size (skipped with
    ``residual=False``, the only option for Gemma3), one random Hadamard ``R_ov`` per KV head,
    and the online Hadamard on down_proj inputs. The Q/K Hadamard after RoPE lives in the
    attention function, not here. All matrices are built first, so an unsupported size
    fails before the model changes.

    Norms are folded only for the residual rotation, which needs unit gains. Without it the
    gains stay in the norms: Gemma3's gains span 0.3 to 70 across channels, and folded into
    q/k/v/gate/up they leave a few columns setting every row's 4-bit grid (gemma3-270m, RTN
    w4a16 per channel, 2 x 2048 windows: ppl 273 unfolded, 6.8e6 folded).
    """
    a = get_adapter(model)
    if residual and a.residual_rotation_blocker:
        raise ConfigError(f"cannot rotate the residual stream of a {a.family} model: "
                          f"{a.residual_rotation_blocker}; quarot(model, residual=False) "
                          "applies the other rotations")
    g = torch.Generator().manual_seed(seed)
    r_res = random_hadamard(a.hidden_size, g) if residual else None
    r_ov = [torch.stack([random_hadamard(a.head_dim, g) for _ in range(a.num_kv_heads)])
            for _ in range(a.num_layers)]
    hadamard_factors(a.intermediate_size)
    if r_res is not None:
        fold_norms(model)
        rotate_residual(model, r_res)
    rotate_ov(model, r_ov)
    add_down_hadamard(model)
    return model


__all__ = ["HadamardInput", "untie_lm_head", "fold_norms", "rotate_residual", "rotate_ov",
           "scale_qkv", "scale_upgate", "scale_ov", "scale_updown", "add_down_hadamard", "quarot"]

"""What the distillation trains: quantized linears on their own grid (straight-through), LoRA
adapters, norm gains or quantization scales -- installed into a student and taken out again.

``_Trainables`` wraps the student's modules for the chosen sets and, at ``finish``, writes the
result back in the student's own format (integer codes for quantized layers, merged LoRA).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from editcomp.arch import get_adapter
from editcomp.errors import ConfigError
from editcomp.quant.hadamard import apply_hadamard
from editcomp.quant.ops import fake_quant, quantize
from editcomp.quant.runtime import QuantLinear, quant_linears, replace_module


class STELinear(nn.Module):
    """A ``QuantLinear`` being trained on its own grid.

    The weight it computes with is ``fake_quant(latent [+ LoRA], scales, zeros)`` with the
    layer's fixed qparams: forward values are always on the grid, the gradient passes straight
    through the rounding. ``commit()`` writes the rounded codes back into the ``QuantLinear``.
    """

    def __init__(self, q: QuantLinear, latent: bool, lora_rank: int = 0,
                 lora_alpha: float = 16.0, generator: torch.Generator | None = None):
        super().__init__()
        self.q = q
        w = q.dequantize_weight().detach().float()
        self.latent = nn.Parameter(w.clone()) if latent else None
        if self.latent is None:
            self.register_buffer("base", w, persistent=False)
        self.lora_A, self.lora_B, self.lora_scale = _lora_params(
            q.in_features, q.out_features, lora_rank, lora_alpha, w.device, generator)

    def float_weight(self) -> torch.Tensor:
        w = self.latent if self.latent is not None else self.base
        if self.lora_A is not None:
            w = w + (self.lora_B @ self.lora_A) * self.lora_scale
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q
        if q.hadamard_size is not None:
            x = apply_hadamard(x, q.hadamard_size)
        if q.act_spec is not None:
            x = fake_quant(x, q.act_spec)
        w = fake_quant(self.float_weight(), q.w_spec, q.scales, q.zeros)
        bias = None if q.bias is None else q.bias.to(x.dtype)
        return F.linear(x, w.to(x.dtype), bias)

    @torch.no_grad()
    def commit(self) -> QuantLinear:
        q = self.q
        zero = q.zeros if q.zeros is not None else torch.zeros_like(q.scales)
        codes = quantize(self.float_weight().detach(), q.scales, zero, q.w_spec)
        zeros = None if q.zeros is None else q.zeros.detach().clone()
        q.set_codes(codes, q.scales.detach().clone(), zeros)
        return q


class LoRALinear(nn.Module):
    """``linear(x) + scale * x A^T B^T`` around a float linear; ``merge()`` folds it in."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.linear = linear
        self.lora_A, self.lora_B, self.lora_scale = _lora_params(
            linear.in_features, linear.out_features, rank, alpha, linear.weight.device, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return self.linear(x) + lora * self.lora_scale

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        delta = (self.lora_B @ self.lora_A) * self.lora_scale
        self.linear.weight.add_(delta.to(self.linear.weight.dtype))
        return self.linear


def _lora_params(in_f, out_f, rank, alpha, device, generator):
    if not rank:
        return None, None, 1.0
    A = torch.empty(rank, in_f)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    return (nn.Parameter(A.to(device)), nn.Parameter(torch.zeros(out_f, rank, device=device)),
            alpha / rank)


class LogScales:
    """Trains a ``QuantLinear``'s scales in log space: ``scales = s0 * exp(u)``, ``u`` from 0.

    Adam moves each trained number by about ``lr`` per step whatever its size, so on the raw
    scales one learning rate is a different relative step in every layer and model (gemma3-270m
    w4 g64 scales are 0.002-0.03, SmolLM2 w3 ones several times larger). On ``u`` it is the same
    fraction everywhere, and a scale never changes sign (NUPES scales are signed). A forward
    pre-hook puts ``s0 * exp(u)`` in the layer's ``scales`` buffer, so the layer's own
    dequantization (any grid kind) carries the gradient.
    """

    def __init__(self, q: QuantLinear):
        self.q = q
        self.s0 = q.scales.detach().clone()
        self.u = nn.Parameter(torch.zeros_like(self.s0))
        self.hook = q.register_forward_pre_hook(self._install)

    def _install(self, module, args):
        module._buffers["scales"] = self.s0 * self.u.exp()

    @torch.no_grad()
    def finish(self, commit: bool) -> None:
        """Remove the hook; leave the trained scales (``commit``) or the original ones (the
        owner, ``_Trainables.finish``, then drops every layer's cached weight)."""
        self.hook.remove()
        self.q._buffers["scales"] = (self.s0 * self.u.exp()) if commit else self.s0


def _norm_modules(model) -> list[nn.Module]:
    adapter = get_adapter(model)
    mods = [adapter.final_norm]
    for parts in adapter.layers():
        mods += [m for m in (parts.attn_in_norm, parts.mlp_in_norm, parts.attn_out_norm,
                             parts.mlp_out_norm, parts.q_norm, parts.k_norm) if m is not None]
    return mods


class _Trainables:
    """Installs the trainable set into the student and undoes it (``finish``) at the end."""

    def __init__(self, model, config):
        self.model, self.config = model, config
        sets = config.train_sets()
        adapter = get_adapter(model)
        frozen = {id(p) for m in (adapter.embed, adapter.lm_head) for p in m.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        self.swapped: list[tuple[nn.Module, nn.Module]] = []  # (wrapper, original)
        gen = torch.Generator().manual_seed(config.seed)
        qls = quant_linears(model)
        for q in qls.values():  # a weight cached under inference_mode cannot enter autograd
            q._w_cache = None
        if "scales" in sets and not qls:
            raise ConfigError("--train scales needs a quantized student (it has no quantized "
                              "linears); use all, norms or lora")
        rank = config.lora_rank if "lora" in sets else 0
        if "all" in sets or rank:
            odd = sorted({type(q).kind for q in qls.values() if type(q).kind != "uniform"})
            if odd:
                raise ConfigError(f"--train {config.train} re-quantizes on the uniform grid; the "
                                  f"student has {', '.join(odd)} layers (use --train scales or "
                                  "norms)")
            for q in qls.values():
                wrapper = STELinear(q, latent="all" in sets, lora_rank=rank,
                                    lora_alpha=config.lora_alpha, generator=gen)
                replace_module(model, q, wrapper)
                self.swapped.append((wrapper, q))
            if rank:
                for parts in adapter.layers():
                    for lin in parts.linears().values():
                        if isinstance(lin, STELinear):
                            continue
                        if not isinstance(lin, nn.Linear):
                            raise ConfigError(f"--train lora supports plain or quantized linears, "
                                              f"not {type(lin).__name__}")
                        wrapper = LoRALinear(lin, rank, config.lora_alpha, generator=gen)
                        replace_module(model, lin, wrapper)
                        self.swapped.append((wrapper, lin))
        if "all" in sets:
            for p in model.parameters():
                if id(p) not in frozen:
                    p.requires_grad_(True)
            for q in qls.values():  # the codes' qparams stay fixed
                for b in q.buffers():
                    b.requires_grad_(False)
        if "norms" in sets:
            for m in _norm_modules(model):
                for p in m.parameters():
                    p.requires_grad_(True)
        for wrapper, _ in self.swapped:
            for p in (wrapper.lora_A, wrapper.lora_B):
                if p is not None:
                    p.requires_grad_(True)
        self.log_scales = ({name: LogScales(q) for name, q in qls.items()}
                           if "scales" in sets else {})
        self.tensors: dict[str, torch.Tensor] = {}
        for name, p in model.named_parameters():
            if p.requires_grad and id(p) not in frozen:
                self.tensors[name] = p
        for name, ls in self.log_scales.items():
            self.tensors[f"{name}.log_scales"] = ls.u
        for name, p in model.named_parameters():
            if id(p) in frozen:
                p.requires_grad_(False)
        if not self.tensors:
            raise ConfigError(f"--train {config.train}: the student has nothing of that kind to "
                              "train")

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def finish(self, commit: bool) -> None:
        """Put the original modules back (with the trained weights when ``commit``) and turn
        gradients off again."""
        for wrapper, orig in reversed(self.swapped):
            if commit:
                if isinstance(wrapper, STELinear):
                    wrapper.commit()
                else:
                    wrapper.merge()
            replace_module(self.model, wrapper, orig)
        self.swapped = []
        for ls in self.log_scales.values():
            ls.finish(commit)
        self.log_scales = {}
        for t in self.tensors.values():
            t.requires_grad_(False)
        for q in quant_linears(self.model).values():
            q._w_cache = None


def _owned_by_wrapper(model, name: str, trainables: _Trainables) -> bool:
    """Whether a trainable tensor lives in a training wrapper (discarded, nothing to restore)."""
    t = trainables.tensors[name]
    return (any(t is p for w, _ in trainables.swapped for p in w.parameters(recurse=False))
            or any(t is ls.u for ls in trainables.log_scales.values()))

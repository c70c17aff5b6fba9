"""Runtime modules of a quantized model: ``QuantLinear`` (packed weights, dynamic activation
quant, optional online Hadamard) and ``ActQuant`` (activation fake-quant around a float linear).

``QuantLinear`` stores what a checkpoint stores -- packed integer codes, fp32 scales (and zero
points) -- so saving is its state dict and loading is bit-exact. It computes with fake-quantized
activations and the dequantized weight (simulated quantization: the point is accuracy, not speed).
The dequantized weight is cached per device/dtype; the scales stay fp32 whatever ``.to(dtype)``
the model gets, because the cached weight is computed in fp32 and only then cast.

``quantize_model`` swaps the 7 linears of every decoder layer (found through the arch adapter)
for ``QuantLinear``s; lm_head stays in full precision by default, as in the papers.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from editcomp.errors import ConfigError
from editcomp.quant.hadamard import apply_hadamard
from editcomp.quant.ops import dequantize, fake_quant, pack_int, packed_nbytes, unpack_int
from editcomp.quant.spec import BitsSpec, QuantSpec

#: ``kind`` (as written in a checkpoint) -> QuantLinear subclass, so loaders rebuild the right one.
LINEAR_KINDS: dict[str, type["QuantLinear"]] = {}


def register_kind(cls):
    """Class decorator: make a ``QuantLinear`` subclass loadable by its ``kind``."""
    LINEAR_KINDS[cls.kind] = cls
    return cls


def spec_to_dict(spec: QuantSpec | None) -> dict | None:
    return None if spec is None else dataclasses.asdict(spec)


def spec_from_dict(d: dict | None) -> QuantSpec | None:
    return None if d is None else QuantSpec(**d)


def _scale_shape(out_features: int, in_features: int, spec: QuantSpec) -> tuple[int, int]:
    if spec.granularity == "channel":
        return (out_features, 1)
    if spec.granularity == "group":
        if in_features % spec.group_size:
            raise ConfigError(f"weight group size {spec.group_size} does not divide the input "
                              f"width {in_features}")
        return (out_features, in_features // spec.group_size)
    if spec.granularity == "tensor":
        return (1, 1)
    raise ConfigError(f"weights are quantized per channel, group or tensor, not "
                      f"{spec.granularity!r}")


def _hadamard_wrapped(module) -> tuple[nn.Module, int | None]:
    """``(inner linear, hadamard size)`` of a ``HadamardInput``-like wrapper, else
    ``(module, None)``.

    Duck-typed (``.linear`` + ``.hadamard_size``) so this file does not depend on transforms.py.
    """
    inner, n = getattr(module, "linear", None), getattr(module, "hadamard_size", None)
    if isinstance(inner, nn.Module) and hasattr(module, "hadamard_size"):  # also ActQuant
        if getattr(module, "signs", None) is not None:
            raise ConfigError("an online Hadamard with random signs cannot be absorbed into a "
                              "QuantLinear (fuse the signs into the weights first)")
        return inner, None if n is None else int(n)
    return module, None


class QuantLinear(nn.Module):
    """A linear layer with quantized weights and (optionally) dynamically quantized inputs.

    forward: ``x -> x @ H`` (if ``hadamard_size``; the weight already holds ``H^T``) -> per-token
    fake-quant of the activations (if ``act_spec``) -> ``x @ W_hat^T + b``.
    Buffers (the checkpoint entries): ``qweight`` (uint8, ``pack_int`` of the ``[out, in]`` codes,
    row-major), ``scales`` (fp32, ``[out, 1]`` per channel or ``[out, in / group]``), ``zeros``
    (fp32 integer zero points, asymmetric only) and ``bias``.
    Subclasses with another code-to-value map (NUPES) override ``dequantize_weight`` and set
    ``kind``; ``register_kind`` makes them loadable.
    """

    kind = "uniform"

    def __init__(self, in_features: int, out_features: int, w_spec: QuantSpec,
                 act_spec: QuantSpec | None = None, bias: bool = False,
                 hadamard_size: int | None = None, device=None, dtype=torch.float32):
        super().__init__()
        if hadamard_size is not None and hadamard_size != in_features:
            raise ConfigError(f"online Hadamard size {hadamard_size} != input width {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.w_spec, self.act_spec, self.hadamard_size = w_spec, act_spec, hadamard_size
        shape = _scale_shape(out_features, in_features, w_spec)
        self.register_buffer("qweight", torch.zeros(
            packed_nbytes(out_features * in_features, w_spec.bits), dtype=torch.uint8,
            device=device))
        self.register_buffer("scales", torch.ones(shape, dtype=torch.float32, device=device))
        self.register_buffer("zeros", None if w_spec.symmetric else
                             torch.zeros(shape, dtype=torch.float32, device=device))
        self.bias = (nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
                     if bias else None)
        self._w_cache: tuple | None = None

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_float(cls, linear: nn.Module, w_spec: QuantSpec, act_spec: QuantSpec | None = None,
                   hadamard_size: int | None = None, W_hat_codes: tuple | None = None,
                   mse_clip: bool = False) -> "QuantLinear":
        """Quantize a float ``nn.Linear`` (or a ``HadamardInput`` around one).

        ``W_hat_codes``: ``(codes, scale, zero)`` or GPTQ's ``(W_hat, codes, scale, zero)`` to use
        as they are; without it the weight is rounded to nearest (with ``mse_clip`` search).
        """
        from editcomp.quant.gptq import rtn_quantize_weight

        linear, wrapped_n = _hadamard_wrapped(linear)
        if wrapped_n is not None:
            if hadamard_size not in (None, wrapped_n):
                raise ConfigError(f"hadamard_size {hadamard_size} != the wrapper's {wrapped_n}")
            hadamard_size = wrapped_n
        W = linear.weight.detach()
        out_f, in_f = W.shape
        q = cls(in_f, out_f, w_spec, act_spec, bias=linear.bias is not None,
                hadamard_size=hadamard_size, device=W.device, dtype=W.dtype)
        if W_hat_codes is None:
            _, codes, scale, zero = rtn_quantize_weight(W, w_spec, mse_clip=mse_clip)
        else:
            codes, scale, zero = tuple(W_hat_codes)[-3:]
        q.set_codes(codes, scale, zero)
        if linear.bias is not None:
            with torch.no_grad():
                q.bias.copy_(linear.bias.detach())
        return q

    def set_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None):
        """Store integer codes ``[out, in]`` and their qparams (checked against the spec)."""
        if tuple(codes.shape) != (self.out_features, self.in_features):
            raise ConfigError(f"codes of shape {tuple(codes.shape)} for a weight of shape "
                              f"{(self.out_features, self.in_features)}")
        if tuple(scale.shape) != tuple(self.scales.shape):
            raise ConfigError(f"scale of shape {tuple(scale.shape)}, expected "
                              f"{tuple(self.scales.shape)} for {self.w_spec}")
        if (self.w_spec.symmetric and codes.dtype == torch.uint8) or (
                not self.w_spec.symmetric and codes.is_floating_point()):
            raise ConfigError(f"codes of dtype {codes.dtype} do not match the spec "
                              f"(int8 symmetric / uint8 asymmetric)")
        packed = pack_int(codes.detach(), self.w_spec.bits, signed=self.w_spec.symmetric)
        with torch.no_grad():
            self.qweight.copy_(packed)
            self.scales.copy_(scale.detach().float())
            if self.zeros is not None:
                if zero is None:
                    raise ConfigError("an asymmetric weight spec needs zero points")
                self.zeros.copy_(zero.detach().float())
        self._w_cache = None

    # -- weights ---------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """The integer codes ``[out, in]`` (int8 symmetric / uint8 asymmetric)."""
        return unpack_int(self.qweight, self.w_spec.bits, (self.out_features, self.in_features),
                          signed=self.w_spec.symmetric)

    def dequantize_weight(self) -> torch.Tensor:
        """The weight the layer computes with, ``[out, in]`` fp32. Override for other grids."""
        zero = self.zeros if self.zeros is not None else torch.zeros_like(self.scales)
        return dequantize(self.codes(), self.scales, zero, self.w_spec)

    def weight_for(self, dtype: torch.dtype, device) -> torch.Tensor:
        """``dequantize_weight()`` cast to the compute dtype, cached until a buffer changes."""
        bufs = [b for b in (self.qweight, self.scales, self.zeros) if b is not None]
        if any(b.requires_grad for b in bufs):  # learned qparams: no cache, keep the graph
            return self.dequantize_weight().to(device=device, dtype=dtype)
        key = (dtype, torch.device(device), *[(id(b), b._version) for b in bufs])
        if self._w_cache is None or self._w_cache[0] != key:
            with torch.no_grad():
                w = self.dequantize_weight().to(device=device, dtype=dtype)
            self._w_cache = (key, w)
        return self._w_cache[1]

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the model's (bias') dtype, for code reading ``.weight``."""
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        return self.weight_for(dtype, self.qweight.device)

    # -- compute ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hadamard_size is not None:
            x = apply_hadamard(x, self.hadamard_size)
        if self.act_spec is not None:
            x = fake_quant(x, self.act_spec)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight_for(x.dtype, x.device), bias)

    def _apply(self, fn, recurse=True):
        """Keep the qparams fp32 across ``.to(dtype)`` / ``.half()`` (only their device moves)."""
        keep = {k: self._buffers[k] for k in ("scales", "zeros") if self._buffers[k] is not None}
        out = super()._apply(fn, recurse)
        for k, old in keep.items():
            new = self._buffers[k]
            if new.dtype != old.dtype:
                self._buffers[k] = old.to(new.device)
        self._w_cache = None
        return out

    # -- description (checkpoint config) ------------------------------------------------------
    def quant_config(self) -> dict:
        """What a loader needs to rebuild this module empty (JSON-able)."""
        return {"kind": self.kind, "shape": [self.out_features, self.in_features],
                "bias": self.bias is not None, "hadamard_size": self.hadamard_size,
                "weight": spec_to_dict(self.w_spec), "act": spec_to_dict(self.act_spec)}

    @classmethod
    def from_quant_config(cls, cfg: dict, dtype=torch.float32, device=None) -> "QuantLinear":
        """An empty module (zero codes) from ``quant_config()``, ready for ``load_state_dict``."""
        out_f, in_f = cfg["shape"]
        return cls(in_f, out_f, spec_from_dict(cfg["weight"]), spec_from_dict(cfg.get("act")),
                   bias=bool(cfg.get("bias")), hadamard_size=cfg.get("hadamard_size"),
                   device=device, dtype=dtype)

    def extra_repr(self) -> str:
        act = "none" if self.act_spec is None else f"a{self.act_spec.bits}"
        g = (f", group={self.w_spec.group_size}" if self.w_spec.granularity == "group" else "")
        return (f"in={self.in_features}, out={self.out_features}, w{self.w_spec.bits}{g}, "
                f"act={act}, bias={self.bias is not None}, hadamard={self.hadamard_size}")


register_kind(QuantLinear)


class ActQuant(nn.Module):
    """Fake-quantize a float linear's inputs (per token, dynamic): W16A4 during rotation training.

    Wrapping a ``HadamardInput`` keeps the order of the real model: Hadamard, then quantize.
    ``.linear`` is the float linear (its weight stays trainable).
    """

    def __init__(self, linear: nn.Module, act_spec: QuantSpec, hadamard_size: int | None = None):
        super().__init__()
        inner, n = _hadamard_wrapped(linear)
        self.linear, self.act_spec = inner, act_spec
        self.hadamard_size = n if n is not None else hadamard_size

    def clip(self):
        """The clip ratio replacing ``act_spec.clip_ratio`` (None: the spec's; a learnable
        tensor in OSTQuant's training)."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hadamard_size is not None:
            x = apply_hadamard(x, self.hadamard_size)
        return self.linear(fake_quant(x, self.act_spec, clip=self.clip()))


# ---- whole models --------------------------------------------------------------------------

def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is a child in ``model`` (found by identity, not by name)."""
    slots = [(parent, name) for parent in model.modules()
             for name, child in parent.named_children() if child is old]
    if not slots:
        raise ValueError(f"module {type(old).__name__} is not part of the model")
    for parent, name in slots:  # collected first: ``new`` may contain ``old`` (a wrapper)
        setattr(parent, name, new)


def _set_role(parts, role: str, model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    if hasattr(parts, "replace"):  # the adapter's generic way, when available
        parts.replace(role, new)
    else:
        replace_module(model, old, new)


def _role_modules(model):
    """``[(parts or None, role, module)]``: the 7 linears of every layer, then lm_head."""
    from editcomp.arch import get_adapter

    adapter = get_adapter(model)
    out = [(parts, role, m) for parts in adapter.layers() for role, m in parts.linears().items()]
    return out + [(None, "lm_head", adapter.lm_head)]


def _unwrap(module) -> tuple[nn.Module, int | None]:
    if isinstance(module, QuantLinear):
        raise ConfigError("the model is already quantized (found a QuantLinear)")
    return _hadamard_wrapped(module)  # HadamardInput or ActQuant -> (float linear, size)


def quantize_model(model: nn.Module, bits: BitsSpec, weights: dict | None = None,
                   skip=("lm_head",), qk_hadamard: bool | None = None,
                   mse_clip: bool = False, kind: str = "uniform",
                   act_clips: dict[str, float] | None = None) -> nn.Module:
    """Replace every decoder linear by a ``QuantLinear`` (in place) and return the model.

    ``weights``: module name -> ``(codes, scale, zero)`` (e.g. from GPTQ; ``(W_hat, ...)`` also
    accepted); linears without an entry are rounded to nearest. ``skip`` lists roles (``q`` ...
    ``down``, ``lm_head``) or module names to keep in float. ``HadamardInput`` / ``ActQuant``
    wrappers are absorbed. When ``bits.kv`` is set the KV cache is quantized too; ``qk_hadamard``
    None keeps the model's current Q/K Hadamard setting (off if none). ``kind`` picks the
    registered ``QuantLinear`` subclass (``nupes``, ``nf4`` ...) that ``weights`` are for.
    ``act_clips``: module name -> its own activation clipping ratio (``set_act_clips``).
    """
    if kind not in LINEAR_KINDS:
        raise ConfigError(f"unknown quantized linear kind {kind!r}; known: "
                          f"{', '.join(sorted(LINEAR_KINDS))}")
    from editcomp.quant.kvcache import enable_kv_quant, kv_settings

    names = {id(m): n for n, m in model.named_modules()}
    weights = dict(weights or {})
    skip = set(skip or ())
    used = set()
    for parts, role, module in _role_modules(model):
        name = names.get(id(module), role)
        if role in skip or name in skip:
            continue
        linear, n = _unwrap(module)
        key = next((k for k in (name, names.get(id(linear))) if k in weights), None)
        if key is not None:
            used.add(key)
        q = LINEAR_KINDS[kind].from_float(linear, bits.weight, bits.act, hadamard_size=n,
                                   W_hat_codes=weights.get(key), mse_clip=mse_clip)
        if parts is None:
            replace_module(model, module, q)
        else:
            _set_role(parts, role, model, module, q)
    unused = sorted(set(weights) - used)
    if unused:
        raise ConfigError(f"quantized weights given for modules that were not quantized: "
                          f"{', '.join(unused[:5])}")
    if bits.kv is not None:
        current = kv_settings(model)
        had = bool(current.qk_hadamard) if (qk_hadamard is None and current) else bool(qk_hadamard)
        enable_kv_quant(model, bits.kv, qk_hadamard=had)
    elif qk_hadamard:
        enable_kv_quant(model, None, qk_hadamard=True)
    return set_act_clips(model, act_clips or {})


def add_act_quant(model: nn.Module, act_spec: QuantSpec, skip=("lm_head",)) -> nn.Module:
    """Wrap every decoder linear in ``ActQuant`` (weights stay float), in place; returns it."""
    names = {id(m): n for n, m in model.named_modules()}
    for parts, role, module in _role_modules(model):
        if role in skip or names.get(id(module)) in skip or isinstance(module, ActQuant):
            continue
        new = ActQuant(module, act_spec)
        if parts is None:
            replace_module(model, module, new)
        else:
            _set_role(parts, role, model, module, new)
    return model


def set_act_clips(model: nn.Module, clips: dict[str, float]) -> nn.Module:
    """Give each named ``QuantLinear`` its own activation clipping ratio (OSTQuant's learned
    clips), in place. A name that is not a quantized linear with quantized inputs is an error."""
    qls = quant_linears(model)
    for name, clip in clips.items():
        q = qls.get(name)
        if q is None or q.act_spec is None:
            raise ConfigError(f"activation clip given for {name!r}, which is not a quantized "
                              f"linear with quantized activations")
        q.act_spec = q.act_spec.replace(clip_ratio=float(clip))
    return model


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    """Name -> every ``QuantLinear`` in the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}

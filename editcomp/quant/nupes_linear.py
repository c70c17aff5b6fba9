"""``NUPESLinear``: the runtime module of a NUPES-quantized linear (packed codes, scales and
exponents; the weight is a lookup in the per-channel table of the 2^b power levels).

Registered as kind ``nupes`` so quantized checkpoints rebuild it; ``editcomp.quant`` imports
this module for that.
"""

from __future__ import annotations

import torch

from editcomp.errors import ConfigError
from editcomp.quant.nupes import (NUPESConfig, lut_dequantize, nupes_quantize_weight,
                                  power_lut, range_code)
from editcomp.quant.runtime import QuantLinear, _hadamard_wrapped, register_kind
from editcomp.quant.spec import QuantSpec



@register_kind
class NUPESLinear(QuantLinear):
    """A ``QuantLinear`` on the NUPES grid: packed signed codes, fp32 ``scales`` (signed with
    signed-scale NUPES), fp32 ``exponents`` (``[out, 1]`` per channel, ``[1, 1]`` per layer) and
    the range code ``R`` (``nupes.range_code``). The weight is a gather from the per-channel
    table of the ``2^b`` levels (``power_lut``) times the scale."""

    kind = "nupes"

    def __init__(self, in_features: int, out_features: int, w_spec: QuantSpec,
                 act_spec: QuantSpec | None = None, bias: bool = False,
                 hadamard_size: int | None = None, device=None, dtype=torch.float32,
                 per_channel_exponent: bool = True, rc: int | None = None):
        if not w_spec.symmetric:
            raise ConfigError("NUPES weights are symmetric (the power map is odd); got an "
                              "asymmetric weight spec")
        super().__init__(in_features, out_features, w_spec, act_spec, bias=bias,
                         hadamard_size=hadamard_size, device=device, dtype=dtype)
        self.per_channel_exponent = per_channel_exponent
        self.rc = range_code(w_spec.bits, signed_scale=True) if rc is None else int(rc)
        self.register_buffer("exponents", torch.ones(out_features if per_channel_exponent else 1,
                                                     1, dtype=torch.float32, device=device))

    @classmethod
    def from_float(cls, linear, w_spec: QuantSpec, act_spec: QuantSpec | None = None,
                   hadamard_size: int | None = None, W_hat_codes: tuple | None = None,
                   mse_clip: bool = False) -> "NUPESLinear":
        """Build from a float linear and ``(codes, scale, exponent, range_code)`` (as
        ``nupes_weights`` returns them); without them the data-free search runs on the weight."""
        linear, wrapped_n = _hadamard_wrapped(linear)
        if wrapped_n is not None:
            hadamard_size = wrapped_n
        W = linear.weight.detach()
        if W_hat_codes is None:
            cfg = NUPESConfig(bits=w_spec.bits, data_free=True,
                              group_size=w_spec.group_size if w_spec.grouped else None)
            _, codes, scale, a, _ = nupes_quantize_weight(W, cfg)
            rc = cfg.range_code
        else:
            codes, scale, a, rc = W_hat_codes
        out_f, in_f = W.shape
        q = cls(in_f, out_f, w_spec, act_spec, bias=linear.bias is not None,
                hadamard_size=hadamard_size, device=W.device, dtype=W.dtype,
                per_channel_exponent=a.numel() > 1 or out_f == 1, rc=rc)
        q.set_codes(codes, scale, None)
        q.set_exponents(a)
        if linear.bias is not None:
            with torch.no_grad():
                q.bias.copy_(linear.bias.detach())
        return q

    def set_exponents(self, a: torch.Tensor) -> None:
        if a.numel() != self.exponents.numel():
            raise ConfigError(f"{a.numel()} exponents for a layer storing "
                              f"{self.exponents.numel()}")
        if not bool(((a > 0) & torch.isfinite(a)).all()):
            raise ConfigError("NUPES exponents must be positive and finite")
        with torch.no_grad():
            self.exponents.copy_(a.detach().float().reshape(self.exponents.shape))
        self._w_cache = None

    def lut(self) -> torch.Tensor:
        """The normalized levels ``[E, 2^b]`` of codes ``qmin .. qmax``."""
        return power_lut(self.exponents, self.w_spec.bits, self.rc)

    def dequantize_weight(self) -> torch.Tensor:
        return lut_dequantize(self.codes(), self.scales, self.lut(), self.w_spec)

    def weight_for(self, dtype, device):
        key = (id(self.exponents), self.exponents._version)
        if getattr(self, "_exp_key", None) != key:
            self._w_cache, self._exp_key = None, key
        return super().weight_for(dtype, device)

    def _apply(self, fn, recurse=True):
        old = self._buffers["exponents"]
        out = super()._apply(fn, recurse)
        new = self._buffers["exponents"]
        if new.dtype != old.dtype:
            self._buffers["exponents"] = old.to(new.device)
        return out

    def quant_config(self) -> dict:
        return {**super().quant_config(), "per_channel_exponent": self.per_channel_exponent,
                "range_code": self.rc}

    @classmethod
    def from_quant_config(cls, cfg: dict, dtype=torch.float32, device=None) -> "NUPESLinear":
        from editcomp.quant.runtime import spec_from_dict

        out_f, in_f = cfg["shape"]
        return cls(in_f, out_f, spec_from_dict(cfg["weight"]), spec_from_dict(cfg.get("act")),
                   bias=bool(cfg.get("bias")), hadamard_size=cfg.get("hadamard_size"),
                   device=device, dtype=dtype,
                   per_channel_exponent=bool(cfg.get("per_channel_exponent", True)),
                   # checkpoints written before signed scales: symmetric, R = 2^(b-1) - 1
                   rc=cfg.get("range_code", range_code(cfg["weight"]["bits"], False)))

    def extra_repr(self) -> str:
        e = "channel" if self.per_channel_exponent else "layer"
        return super().extra_repr() + f", nupes exponent per {e}, range code {self.rc}"

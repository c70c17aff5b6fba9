"""NF4 / FP4 (bitsandbytes) as a fixed non-uniform 4-bit baseline, stored in our checkpoint format.

bitsandbytes (>= 0.47 runs on CPU too) quantizes blocks of ``blocksize`` consecutive weights with
one fp32 absmax each, to the nearest of 16 fixed levels (NF4: normal quantiles; FP4: a tiny
float format). For a weight ``[out, in]`` with ``blocksize`` dividing ``in`` a block is a group of
a row, so the result is a ``QuantLinear`` kind whose table is bitsandbytes' 16 levels: codes
(bitsandbytes' 4-bit code values, packed by pack_int) + absmax as the group scales. Codes and
absmax come from ``bitsandbytes.functional.quantize_4bit`` itself, and ``dequantize_weight``
reproduces ``dequantize_4bit`` bit for bit (tested), on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from editcomp.errors import ConfigError
from editcomp.quant.runtime import QuantLinear, _hadamard_wrapped, register_kind
from editcomp.quant.spec import QuantSpec

QUANT_TYPES = ("nf4", "fp4")
BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class NF4Config:
    """``quant_type`` nf4 | fp4; ``blocksize`` = the weight group size (bitsandbytes' sizes)."""

    quant_type: str = "nf4"
    blocksize: int = 64

    def __post_init__(self):
        if self.quant_type not in QUANT_TYPES:
            raise ConfigError(f"unknown 4-bit type {self.quant_type!r}; valid: nf4, fp4")
        if self.blocksize not in BLOCK_SIZES:
            raise ConfigError(f"{self.quant_type} block size (group size) must be one of "
                              f"{', '.join(map(str, BLOCK_SIZES))}, got {self.blocksize}")

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(4, "group", self.blocksize)


def _bnb():
    try:
        import bitsandbytes.functional as F
    except ImportError as e:  # an optional dependency in some installs
        raise ConfigError(f"--method nf4/fp4 needs bitsandbytes >= 0.47 ({e})") from None
    return F


def code_table(quant_type: str, device=None) -> torch.Tensor:
    """bitsandbytes' 16 levels (fp32) for ``quant_type``, indexed by the 4-bit code."""
    return _bnb().get_4bit_type(quant_type, device="cpu").float().to(device)


def quantize_4bit_weight(W: torch.Tensor, config: NF4Config):
    """``(W_hat, codes, absmax)`` of ``W [out, in]`` by bitsandbytes: codes int8 (bnb code - 8,
    so ``pack_int`` writes bnb's nibble values), absmax ``[out, in / blocksize]`` fp32."""
    F = _bnb()
    out, cols = W.shape
    if cols % config.blocksize:
        raise ConfigError(f"{config.quant_type} block size {config.blocksize} does not divide "
                          f"the layer width {cols}")
    packed, state = F.quantize_4bit(W.detach().float().contiguous(), blocksize=config.blocksize,
                                    compress_statistics=False, quant_type=config.quant_type)
    W_hat = F.dequantize_4bit(packed, state).float().reshape(W.shape)
    p = packed.reshape(-1)
    codes = torch.stack([p >> 4, p & 15], 1).reshape(out, cols).to(torch.int16) - 8
    absmax = state.absmax.float().reshape(out, cols // config.blocksize)
    return W_hat, codes.to(torch.int8), absmax


class _FourBitLinear(QuantLinear):
    """4-bit codes + per-block absmax; the value is ``table[code] * absmax``."""

    quant_type = "nf4"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.w_spec.bits != 4 or self.w_spec.granularity != "group" or not self.w_spec.symmetric:
            raise ConfigError(f"{self.quant_type} weights are 4-bit blocks (group granularity)")

    @classmethod
    def from_float(cls, linear, w_spec: QuantSpec, act_spec: QuantSpec | None = None,
                   hadamard_size: int | None = None, W_hat_codes: tuple | None = None,
                   mse_clip: bool = False):
        linear, wrapped_n = _hadamard_wrapped(linear)
        if wrapped_n is not None:
            hadamard_size = wrapped_n
        W = linear.weight.detach()
        if W_hat_codes is None:
            _, codes, absmax = quantize_4bit_weight(W, NF4Config(cls.quant_type, w_spec.group_size))
        else:
            codes, absmax = tuple(W_hat_codes)[-2:]
        q = cls(W.shape[1], W.shape[0], w_spec, act_spec, bias=linear.bias is not None,
                hadamard_size=hadamard_size, device=W.device, dtype=W.dtype)
        q.set_codes(codes, absmax, None)
        if linear.bias is not None:
            with torch.no_grad():
                q.bias.copy_(linear.bias.detach())
        return q

    def dequantize_weight(self) -> torch.Tensor:
        table = code_table(self.quant_type, self.scales.device)
        v = table[self.codes().long() + 8]
        gs = self.w_spec.group_size
        return (v.reshape(self.out_features, -1, gs) * self.scales[..., None]).reshape(v.shape)


@register_kind
class NF4Linear(_FourBitLinear):
    kind = quant_type = "nf4"


@register_kind
class FP4Linear(_FourBitLinear):
    kind = quant_type = "fp4"


def nf4_weights(model, config: NF4Config, progress: bool = True) -> dict:
    """bitsandbytes 4-bit for every decoder linear; writes ``W_hat`` into the model and returns
    ``{module name: (codes, absmax)}`` for ``quantize_model(..., kind=config.quant_type)``."""
    from editcomp.arch import get_adapter
    from editcomp.quant.layerwise import inner_linear, module_names

    names = module_names(model)
    out = {}
    for parts in tqdm(get_adapter(model).layers(), desc=config.quant_type, unit="layer",
                      disable=not progress):
        for slot in parts.linears().values():
            lin = inner_linear(slot)
            W_hat, codes, absmax = quantize_4bit_weight(lin.weight, config)
            with torch.no_grad():
                lin.weight.copy_(W_hat.to(lin.weight.dtype))
            out[names[id(slot)]] = (codes, absmax)
    return out

"""What to quantize and how: one ``QuantSpec`` per tensor kind, one ``BitsSpec`` per setting.

A setting is named the way papers name it (``w4a16``, ``w8a8``, ``w4a4kv4``) so a recipe, a CLI
flag and a checkpoint's lineage all read the same. The defaults are OSTQuant/QuaRot's
(see METHODS.md): weights per output channel (or per group) and symmetric; activations dynamic,
per token and asymmetric; the KV cache asymmetric per head (``group_size`` = head_dim, filled in
by the model code with ``spec.replace(group_size=head_dim)``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from editcomp.errors import ConfigError

GRANULARITIES = ("channel", "group", "token", "tensor", "head")
WEIGHT_BITS = range(2, 9)
ACT_BITS = range(4, 9)  # 16 = not quantized
OFF = 16

_VALID_FORMS = ("expected wNaM[kvK][gG][-asym] with N in 2-8, M in 4-8 or 16, K in 4-8, "
                "e.g. w4a16, w8a8, w4a8kv8, w4a4kv4, w4a16g128")
_BITS_RE = re.compile(r"^w(\d+)a(\d+)(?:kv(\d+))?(?:g(\d+))?(-asym)?$")


@dataclass(frozen=True)
class QuantSpec:
    """How one kind of tensor is quantized.

    ``granularity`` says which elements share a scale: ``channel`` (one per row of a weight
    ``[out, in]``), ``token`` (one per token of an activation ``[..., d]``), ``group`` /
    ``head`` (one per ``group_size`` consecutive elements of the last dim), ``tensor`` (one).
    ``clip_ratio`` shrinks the observed range before computing the scale (1.0 = no clipping).
    """

    bits: int
    granularity: str = "channel"
    group_size: int | None = None
    symmetric: bool = True
    clip_ratio: float = 1.0

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"quantization bits must be an integer in 2-8, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"unknown granularity {self.granularity!r}; "
                              f"valid: {', '.join(GRANULARITIES)}")
        if self.granularity == "group" and self.group_size is None:
            raise ConfigError("granularity 'group' needs a group_size")
        if self.granularity in ("channel", "token", "tensor") and self.group_size is not None:
            raise ConfigError(f"granularity {self.granularity!r} takes no group_size "
                              f"(got {self.group_size}); use granularity 'group'")
        if self.group_size is not None and (not isinstance(self.group_size, int)
                                            or self.group_size < 1):
            raise ConfigError(f"group_size must be a positive integer, got {self.group_size!r}")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ConfigError(f"clip_ratio must be in (0, 1], got {self.clip_ratio!r}")

    @property
    def qmin(self) -> int:
        """Smallest integer code: -2^(b-1) when symmetric, else 0."""
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """Largest integer code: 2^(b-1)-1 when symmetric, else 2^b-1."""
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1

    @property
    def grouped(self) -> bool:
        """True when scales are shared by groups of the last dim (group / head)."""
        return self.granularity in ("group", "head")

    def replace(self, **changes) -> "QuantSpec":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class BitsSpec:
    """A whole setting: weights always quantized; activations / KV cache ``None`` when 16 bit."""

    weight: QuantSpec
    act: QuantSpec | None
    kv: QuantSpec | None
    name: str

    def __str__(self) -> str:
        return self.name


def _canonical(w: int, a: int, kv: int | None, group_size: int | None, w_symmetric: bool) -> str:
    s = f"w{w}a{a}"
    if kv is not None:
        s += f"kv{kv}"
    if group_size is not None:
        s += f"g{group_size}"
    if not w_symmetric:
        s += "-asym"
    return s


def parse_bits(text: str, group_size: int | None = None, w_symmetric: bool = True) -> BitsSpec:
    """Parse ``w4a4kv4``-style strings into a ``BitsSpec``.

    The weight group size and asymmetry may be given as arguments or in the string
    (``w4a16g128``, ``w4a16-asym``), so ``str(spec)`` parses back to the same spec.
    """
    m = _BITS_RE.match(str(text).strip().lower())
    if m is None:
        raise ConfigError(f"unknown bits {text!r}; {_VALID_FORMS}")
    w, a = int(m.group(1)), int(m.group(2))
    kv = int(m.group(3)) if m.group(3) is not None else None
    if w not in WEIGHT_BITS or (a != OFF and a not in ACT_BITS) or (kv is not None
                                                                   and kv not in ACT_BITS):
        raise ConfigError(f"unsupported bits {text!r}; {_VALID_FORMS}")
    if m.group(4) is not None:
        g = int(m.group(4))
        if group_size is not None and group_size != g:
            raise ConfigError(f"bits {text!r} says group size {g} but group_size={group_size}")
        group_size = g
    if m.group(5):
        w_symmetric = False
    if group_size is not None:
        weight = QuantSpec(w, "group", group_size, symmetric=w_symmetric)
    else:
        weight = QuantSpec(w, "channel", symmetric=w_symmetric)
    act = None if a == OFF else QuantSpec(a, "token", symmetric=False)
    kvs = None if kv is None else QuantSpec(kv, "head", symmetric=False)
    return BitsSpec(weight, act, kvs, _canonical(w, a, kv, group_size, w_symmetric))

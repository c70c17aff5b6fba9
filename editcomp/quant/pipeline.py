"""``quantize(model, config, calib)``: one call from a float model to a quantized one.

The config dataclass is what the CLI and recipes build; its defaults are the published
settings scaled to finish on a 2-core CPU (fewer calibration windows), as the CLI help says.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from editcomp.arch import get_adapter
from editcomp.errors import ConfigError
from editcomp.quant.runtime import quantize_model
from editcomp.quant.spec import parse_bits
from editcomp.quant.transforms import quarot
from editcomp.quant.weights import gptq_weights, rtn_weights

METHODS = ("rtn", "gptq", "quarot")
NEEDS_CALIBRATION = ("gptq", "quarot")


@dataclass
class QuantizeConfig:
    """How to quantize. ``method``:

    - ``rtn``: round-to-nearest weights, no transforms (the floor every method must beat);
    - ``gptq``: GPTQ weights (damp 0.01, MSE clip search), no transforms;
    - ``quarot``: fixed random Hadamard rotations (residual, per-head V/O, online down_proj,
      Q/K after RoPE when the KV cache is quantized), then GPTQ weights.
    """

    bits: str = "w4a4kv4"
    method: str = "quarot"
    group_size: int | None = None
    nsamples: int = 32
    seq_len: int = 2048
    seed: int = 0
    damp: float = 0.01
    mse_clip: bool = True
    act_clip: float = 1.0
    kv_clip: float = 1.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        for name in ("act_clip", "kv_clip"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in (0, 1], got {getattr(self, name)}")

    def bits_spec(self):
        spec = parse_bits(self.bits, group_size=self.group_size)
        act = spec.act.replace(clip_ratio=self.act_clip) if spec.act else None
        kv = spec.kv.replace(clip_ratio=self.kv_clip) if spec.kv else None
        return type(spec)(weight=spec.weight, act=act, kv=kv, name=spec.name)

    @property
    def needs_calibration(self) -> bool:
        return self.method in NEEDS_CALIBRATION


def quantize(model, config: QuantizeConfig, calib: torch.Tensor | None = None,
             progress: bool = True) -> dict:
    """Quantize ``model`` in place as ``config`` says; return a report of what was done.

    ``calib`` ([n, seq_len] token ids) is required by the calibrated methods.
    """
    bits = config.bits_spec()
    if config.needs_calibration and calib is None:
        raise ConfigError(f"method {config.method!r} needs calibration windows")
    device = next(model.parameters()).device
    report = {"config": asdict(config), "bits": str(bits)}
    t0 = time.time()
    if config.method == "quarot":
        blocker = get_adapter(model).residual_rotation_blocker
        quarot(model, seed=config.seed, residual=blocker is None)
        report["residual_rotation"] = blocker is None
        if blocker:
            report["note"] = f"no residual rotation: {blocker}"
    if config.method == "rtn":
        codes = rtn_weights(model, bits.weight, mse_clip=config.mse_clip)
    else:
        codes = gptq_weights(model, bits.weight, calib.to(device), damp=config.damp,
                             mse_clip=config.mse_clip, progress=progress)
    quantize_model(model, bits, weights=codes, qk_hadamard=config.method == "quarot")
    report["seconds"] = time.time() - t0
    return report

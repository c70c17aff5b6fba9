"""``quantize(model, config, calib)``: one call from a float model to a quantized one.

The config dataclass is what the CLI and recipes build; its defaults are the published
settings scaled to finish on a 2-core CPU (fewer calibration windows), as the CLI help says.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import torch

from editcomp.arch import get_adapter
from editcomp.errors import ConfigError
from editcomp.quant.nf4 import NF4Config, nf4_weights
from editcomp.quant.nupes import NUPESConfig
from editcomp.quant.nupes_model import check_calibration, exponent_histogram, nupes_weights
from editcomp.quant.ostquant import OSTQuantConfig, ostquant_transform
from editcomp.quant.qsur import layer_qsur
from editcomp.quant.runtime import quantize_model
from editcomp.quant.spec import parse_bits
from editcomp.quant.transforms import check_rotation, quarot
from editcomp.quant.weights import gptq_weights, rtn_weights

METHODS = ("rtn", "gptq", "quarot", "ostquant", "nupes", "nf4", "fp4")
#: the weight stage run after a method's transforms (``QuantizeConfig.weights`` overrides it)
WEIGHTS = ("gptq", "rtn", "nupes")
DEFAULT_WEIGHTS = {"rtn": "rtn", "gptq": "gptq", "quarot": "gptq", "ostquant": "gptq",
                   "nupes": "nupes"}
FOUR_BIT = ("nf4", "fp4")  # bitsandbytes blocks: their own weight stage, no transforms
NF4_DEFAULT_BLOCK = 64
NEEDS_CALIBRATION = ("gptq", "quarot", "ostquant")
TRANSFORMS = ("quarot", "ostquant")
QSUR_TOKENS = 4096  # calibration tokens QSUR is measured on
#: activation / KV clip ratios when not given: 4-bit per-token grids gain from a little clipping
#: (measured in benchmarks/quant.py); the others keep the full range. QuaRot gets the same clips
#: as OSTQuant, so the baseline differs only by what OSTQuant learns (smollm2-135m w4a4kv4:
#: QuaRot ppl 33.31 unclipped in quant_table.json, 31.16 with both clips in
#: quant_quarot_w4a4kv4_clips.json; OSTQuant 30.14)
DEFAULT_CLIPS = {"ostquant": (0.9, 0.95), "quarot": (0.9, 0.95)}
#: ... and only grids this coarse: an 8-bit grid loses more to the clipped outliers than it
#: gains in resolution (smollm2-135m OSTQuant w4a8kv8: ppl 21.06 with 0.9 / 0.95, QuaRot's
#: unclipped 20.23; without the clips 20.59: benchmarks/results/quant_table.json and
#: quant_ostquant_w4a8kv8_noclip.json)
CLIP_MAX_BITS = 4


@dataclass
class QuantizeConfig:
    """How to quantize. ``method``:

    - ``rtn``: round-to-nearest weights, no transforms (the floor every method must beat);
    - ``gptq``: GPTQ weights (damp 0.01, MSE clip search), no transforms;
    - ``quarot``: fixed random Hadamard rotations (residual, per-head V/O, online down_proj,
      Q/K after RoPE when the KV cache is quantized), then GPTQ weights;
    - ``ostquant``: the same layout with learned rotations and smoothing scales trained with
      KL-Top against the float model (``ostquant`` settings), then GPTQ weights.

    - ``nupes``: NUPES power-exponent weights (``nupes`` settings; data-driven needs calibration);
    - ``nf4`` / ``fp4``: bitsandbytes 4-bit blocks of ``group_size`` (default 64), weight-only.

    ``weights``: the weight quantizer run after the method's transforms, ``gptq`` | ``rtn`` |
    ``nupes`` (None: the method's own, ``DEFAULT_WEIGHTS``), e.g. ``ostquant`` + ``nupes``.
    ``act_clip`` / ``kv_clip`` None: the method's default (``DEFAULT_CLIPS``, else 1.0).
    ``qsur``: report QSUR per layer before and after the transforms (quarot / ostquant).
    """

    bits: str = "w4a4kv4"
    method: str = "quarot"
    group_size: int | None = None
    nsamples: int = 16
    seq_len: int = 2048
    seed: int = 0
    damp: float = 0.01
    mse_clip: bool = True
    act_clip: float | None = None
    kv_clip: float | None = None
    ostquant: OSTQuantConfig = field(default_factory=OSTQuantConfig)
    qsur: bool = True
    weights: str | None = None
    nupes: NUPESConfig = field(default_factory=NUPESConfig)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        if isinstance(self.ostquant, dict):
            self.ostquant = OSTQuantConfig(**self.ostquant)
        if isinstance(self.nupes, dict):
            self.nupes = NUPESConfig(**self.nupes)
        if self.weights is not None and self.weights not in WEIGHTS:
            raise ConfigError(f"unknown weights {self.weights!r}; valid: {', '.join(WEIGHTS)}")
        if self.method in FOUR_BIT and self.weights is not None:
            raise ConfigError(f"method {self.method} quantizes the weights itself; "
                              f"--weights does not apply")
        for name in ("act_clip", "kv_clip"):
            if getattr(self, name) is not None and not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in (0, 1], got {getattr(self, name)}")

    @property
    def weight_stage(self) -> str:
        """The weight quantizer that runs: ``weights`` or the method's default."""
        return self.method if self.method in FOUR_BIT else (
            self.weights or DEFAULT_WEIGHTS[self.method])

    def bits_spec(self):
        group = self.group_size
        if self.method in FOUR_BIT:
            group = NF4_DEFAULT_BLOCK if group is None else group
            spec = parse_bits(self.bits, group_size=group)
            if spec.weight.bits != 4 or spec.act is not None or spec.kv is not None:
                raise ConfigError(f"method {self.method} is 4-bit weight-only: use --bits w4a16, "
                                  f"not {self.bits}")
            NF4Config(self.method, spec.weight.group_size)  # checks the block size
        spec = parse_bits(self.bits, group_size=group)
        if self.weight_stage == "nupes" and not spec.weight.symmetric:
            raise ConfigError("NUPES weights are symmetric; drop -asym from --bits")
        act_clip, kv_clip = self.clips()
        act = spec.act.replace(clip_ratio=act_clip) if spec.act else None
        kv = spec.kv.replace(clip_ratio=kv_clip) if spec.kv else None
        return type(spec)(weight=spec.weight, act=act, kv=kv, name=spec.name)

    def validate(self) -> None:
        """Checks that need the bits string parsed (recipes call this before loading a model)."""
        self.bits_spec()

    def clips(self) -> tuple[float, float]:
        """``(act_clip, kv_clip)`` with the method's defaults filled in (for grids of at most
        ``CLIP_MAX_BITS`` bits; finer grids keep the full range unless a clip is given)."""
        spec = parse_bits(self.bits)
        act, kv = DEFAULT_CLIPS.get(self.method, (1.0, 1.0))
        act = act if spec.act is not None and spec.act.bits <= CLIP_MAX_BITS else 1.0
        kv = kv if spec.kv is not None and spec.kv.bits <= CLIP_MAX_BITS else 1.0
        return (act if self.act_clip is None else self.act_clip,
                kv if self.kv_clip is None else self.kv_clip)

    @property
    def needs_calibration(self) -> bool:
        stage = self.weight_stage
        transform = self.method in NEEDS_CALIBRATION and self.method not in WEIGHTS
        return (transform or stage == "gptq"
                or (stage == "nupes" and not self.nupes.data_free))


def transform(model, config: QuantizeConfig, calib: torch.Tensor | None = None,
              progress: bool = True) -> dict:
    """The fp32-exact transform stage of ``config.method`` alone (OSTQuant's learned rotations
    and scales, QuaRot's Hadamards; nothing for the other methods), fused into ``model``'s
    weights; returns its report (QSUR before/after when ``config.qsur``). ``quantize`` runs it
    before the weight stage; alone, it lets one transform serve several weight quantizers."""
    bits = config.bits_spec()
    report: dict = {}
    if config.method not in TRANSFORMS:
        return report
    # QSUR needs more tokens than the widest input (a covariance of rank < d has no volume)
    qsur_windows = calib[: -(-QSUR_TOKENS // calib.shape[1])] if calib is not None else None
    if config.qsur:
        report["qsur_before"] = layer_qsur(model, qsur_windows)
    if config.method == "ostquant":
        report.update(ostquant_transform(model, bits, config.ostquant, calib, progress=progress))
    if config.method == "quarot":
        blocker = get_adapter(model).residual_rotation_blocker
        quarot(model, seed=config.seed, residual=blocker is None)
        report["residual_rotation"] = blocker is None
        if blocker:
            report["note"] = f"no residual rotation: {blocker}"
    if config.qsur:
        report["qsur_after"] = layer_qsur(model, qsur_windows)
    return report


def quantize(model, config: QuantizeConfig, calib: torch.Tensor | None = None,
             progress: bool = True) -> dict:
    """Quantize ``model`` in place as ``config`` says; return a report of what was done.

    ``calib`` ([n, seq_len] token ids) is required by the calibrated methods.
    """
    bits = config.bits_spec()
    if config.method in TRANSFORMS:
        check_rotation(model, config.method, bits)
    if config.needs_calibration and calib is None:
        raise ConfigError(f"method {config.method!r} needs calibration windows")
    if config.weight_stage == "nupes":
        check_calibration(calib, config.nupes)  # before any transform runs
    device = next(model.parameters()).device
    report = {"config": asdict(config), "bits": str(bits)}
    t0 = time.time()
    report.update(transform(model, config, calib, progress=progress))
    stage, kind = config.weight_stage, "uniform"
    if stage in FOUR_BIT:
        codes = nf4_weights(model, NF4Config(stage, bits.weight.group_size), progress=progress)
        kind = stage
    elif stage == "nupes":
        w = bits.weight
        ncfg = replace(config.nupes, bits=w.bits, group_size=w.group_size if w.grouped else None)
        codes, nrep = nupes_weights(model, ncfg, None if ncfg.data_free else calib,
                                    progress=progress)
        report["nupes"] = {"exponent_histogram": exponent_histogram(nrep["exponents"]),
                           "exponents": nrep["exponents"], "errors": nrep["errors"]}
        kind = "nupes"
    elif stage == "rtn":
        codes = rtn_weights(model, bits.weight, mse_clip=config.mse_clip)
    else:
        codes = gptq_weights(model, bits.weight, calib.to(device), damp=config.damp,
                             mse_clip=config.mse_clip, progress=progress)
    qk_hadamard = config.method == "quarot" or (config.method == "ostquant" and bits.kv is not None)
    quantize_model(model, bits, weights=codes, qk_hadamard=qk_hadamard, kind=kind,
                   act_clips=report.get("act_clips"))  # OSTQuant's learned clips, if any
    report["seconds"] = time.time() - t0
    return report

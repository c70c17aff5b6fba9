"""Where and in which precision to run: CUDA in bf16 when there is a GPU, else CPU in fp32."""

from __future__ import annotations

import torch


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

"""Per-family adapters: the only code that knows module names.

``get_adapter(model)`` picks the adapter from ``config.model_type``; ``check_supported(config)``
lets loaders refuse an unsupported checkpoint before reading its weights.
"""

from __future__ import annotations

from editcomp.arch.base import ArchAdapter, LayerParts
from editcomp.arch.gemma3 import Gemma3Adapter
from editcomp.arch.llama import LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter
from editcomp.errors import CheckpointError

ADAPTERS: tuple[type[ArchAdapter], ...] = (
    LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter, Gemma3Adapter,
)
_BY_MODEL_TYPE = {mt: cls for cls in ADAPTERS for mt in cls.model_types}

SUPPORTED = "llama (Llama, SmolLM2), mistral, qwen2, qwen3, gemma3 (gemma3_text)"


def adapter_class(model_type: str | None, where: str = "model") -> type[ArchAdapter]:
    cls = _BY_MODEL_TYPE.get(model_type or "")
    if cls is None:
        raise CheckpointError(
            f"{where}: unsupported model family {model_type!r}; supported: {SUPPORTED}")
    return cls


def check_supported(config, where: str = "model") -> type[ArchAdapter]:
    return adapter_class(getattr(config, "model_type", None), where)


def get_adapter(model) -> ArchAdapter:
    return check_supported(model.config)(model)


__all__ = ["ArchAdapter", "LayerParts", "get_adapter", "check_supported", "adapter_class",
           "ADAPTERS", "SUPPORTED"]

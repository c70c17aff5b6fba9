"""Llama-style families: Llama, SmolLM2 (a Llama), Mistral, Qwen2 (q/k/v biases) and Qwen3
(per-head q/k norms before RoPE). Their modules share names and the pre-norm residual layout,
so one adapter serves them all."""

from editcomp.arch.base import ArchAdapter


class LlamaAdapter(ArchAdapter):
    family = "llama"
    model_types = ("llama",)


class MistralAdapter(ArchAdapter):
    family = "mistral"
    model_types = ("mistral",)


class Qwen2Adapter(ArchAdapter):
    family = "qwen2"
    model_types = ("qwen2",)


class Qwen3Adapter(ArchAdapter):
    family = "qwen3"
    model_types = ("qwen3",)

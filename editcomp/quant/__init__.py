"""Quantization: specs and quantizer ops shared by every method, transforms, GPTQ, runtime."""

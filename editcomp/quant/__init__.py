"""Quantization: specs and quantizer ops shared by every method, transforms, GPTQ, runtime."""

# Importing the package registers the quantized-checkpoint loader with editcomp.checkpoint
# (checkpoint.QUANTIZED_LOADERS["editcomp"]); checkpoint.py itself stays free of quant code.
from editcomp.quant import checkpoint_io  # noqa: F401,E402  (registers the loader)
from editcomp.quant import nf4, nupes_linear  # noqa: F401,E402  (register the nf4/fp4/nupes kinds)

"""Distillation: recover a quantized and/or edited student from its full-precision teacher."""

from editcomp.distill.losses import LOSSES, distill_loss, token_losses
from editcomp.distill.trainer import DistillConfig, DistillData, build_data, distill

__all__ = ["LOSSES", "distill_loss", "token_losses", "DistillConfig", "DistillData", "build_data",
           "distill"]

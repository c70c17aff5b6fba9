"""Evaluation: perplexity, edit success per language, KL to a teacher (run after every operation)."""

from editcomp.eval.bootstrap import bootstrap_ci
from editcomp.eval.edit_metrics import (edit_metrics, encode_prompt_target, join_prompt_target,
                                        locality_reference, target_token_ids)
from editcomp.eval.kl import kl_to_teacher
from editcomp.eval.perplexity import perplexity

__all__ = ["perplexity", "kl_to_teacher", "edit_metrics", "locality_reference", "join_prompt_target",
           "target_token_ids", "encode_prompt_target", "bootstrap_ci"]

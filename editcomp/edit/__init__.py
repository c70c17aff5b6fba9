"""Knowledge editing: locate language-agnostic factual neurons and update them (LAFN), and the
fine-tuning baseline (FT-L). Both edit a model in place and return a report for the lineage."""

from editcomp.edit.ftl import FTLConfig, ftl_edit
from editcomp.edit.lafn import LAFNConfig, lafn_edit
from editcomp.edit.locate import LocateConfig, locate
from editcomp.edit.unrelated import UnrelatedPrompts, given_questions, unrelated_prompts

__all__ = ["LAFNConfig", "lafn_edit", "unrelated_prompts", "UnrelatedPrompts", "given_questions", "FTLConfig", "ftl_edit", "LocateConfig", "locate"]

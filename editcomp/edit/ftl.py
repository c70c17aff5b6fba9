"""FT-L: the fine-tuning baseline of knowledge editing (ROME paper, EasyEdit's ``FT`` method).

Fine-tune one FFN layer's down_proj on the edit's training pairs (the same pairs LAFN uses) with the
target NLL. The defaults are EasyEdit's FT settings for llama-style models (``hparams/FT/llama-7b.yaml``:
layer 21 of 32, taken here as a depth fraction, lr 5e-4, 25 steps, no norm constraint, stop once
the loss is below 1e-2). ``norm_constraint`` gives ROME's constrained variant: every weight stays
within it of its original value (an L-inf ball, clamped after each step); ROME's GPT-J setting is
5e-5, its GPT-2 one 5e-4.

``objective`` is EasyEdit's ``objective_optimization``. ``prompt_last`` (FT-L, as ROME's baseline
and EasyEdit's survey run it) scores every target token at the prompt's last position, without
feeding the target in; ``target_new`` (what EasyEdit calls FT-M) is the teacher-forced NLL of each
target token at the position before it, a stronger edit of multi-token answers. ``steps`` counts
optimizer steps (one per batch of ``batch_size`` pairs); EasyEdit's ``num_steps`` counts passes
over all pairs, the same for a single edit's few pairs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from editcomp.arch import get_adapter
from editcomp.data import Fact
from editcomp.edit.prompts import PARAPHRASE_SOURCE, training_items
from editcomp.edit.runner import ModelRunner, build_batches, frozen
from editcomp.edit.update import optimize
from editcomp.errors import ConfigError

EASYEDIT_DEPTH = 21 / 32
OBJECTIVES = ("prompt_last", "target_new")


@dataclass
class FTLConfig:
    layer: int | None = None         # default: round(21/32 * layers)
    lr: float = 5e-4
    steps: int = 25
    norm_constraint: float | None = None  # max |W - W0| per element (None: unconstrained)
    paraphrases: int = 2
    batch_size: int = 32
    stop_nll: float | None = 1e-2   # EasyEdit stops once an epoch's loss is below 1e-2 (with
    #                                 prompt_last a multi-token target never gets there)
    objective: str = "prompt_last"  # or "target_new" (FT-M); see the module docstring

    def resolve_layer(self, n_layers: int) -> int:
        layer = self.layer if self.layer is not None else min(n_layers - 1, round(EASYEDIT_DEPTH * n_layers))
        if not 0 <= layer < n_layers:
            raise ConfigError(f"FT-L layer must be in [0, {n_layers - 1}], got {layer}")
        return layer

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("steps and batch_size must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.stop_nll is not None and self.stop_nll <= 0:
            raise ConfigError(f"stop_nll must be > 0 or None, got {self.stop_nll}")
        if self.norm_constraint is not None and self.norm_constraint <= 0:
            raise ConfigError(f"norm_constraint must be > 0 or None, got {self.norm_constraint}")


def ftl_edit(model, tokenizer, facts: list[Fact], config: FTLConfig | None = None, langs=None,
             progress: bool = True) -> dict:
    """Fine-tune one layer's down_proj on all ``facts`` together (in place) -> report."""
    config = config or FTLConfig()
    config.validate()
    t0 = time.time()
    adapter = get_adapter(model)
    layer = config.resolve_layer(adapter.num_layers)
    items = training_items(facts, tokenizer, langs, config.paraphrases)
    runner = ModelRunner(model, tokenizer)
    batches = build_batches(runner, [(list(it.prompt_ids), list(it.target_ids)) for it in items], [],
                            config.batch_size, prompt_last=config.objective == "prompt_last")
    w = adapter.layer(layer).down.weight
    w0 = w.detach().clone()
    eps = config.norm_constraint

    def clamp():
        if eps is not None:
            w.copy_(torch.maximum(torch.minimum(w, w0 + eps), w0 - eps))

    with frozen(model):
        w.requires_grad_(True)
        try:
            train = optimize(runner, batches, [w], layer, config.steps, config.lr, after_step=clamp,
                             stop_nll=config.stop_nll, progress=progress, desc="ft-l")
        finally:
            w.grad = None
    return {"method": "ft-l", "config": asdict(config), "layer": layer, "facts": len(facts),
            "training_pairs": len(items),
            "paraphrase_source": PARAPHRASE_SOURCE if config.paraphrases else "given paraphrases only",
            "losses": train, "delta_norm": float((w.detach() - w0).norm()),
            "seconds": time.time() - t0}

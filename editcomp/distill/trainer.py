"""``distill(student, teacher, config, data)``: pull a compressed or edited student back towards
its full-precision teacher, on the student's own quantization grid, without losing edits.

What is trained (``DistillConfig.train``; lm_head and embeddings always stay frozen):

- ``all``: every other weight. A ``QuantLinear`` gets a float latent weight initialised from its
  dequantized weight and fake-quantized with the layer's *fixed* scales at every step
  (straight-through estimator, BitDistiller / LLM-QAT); at the end the latent is rounded back
  to integer codes, so the result is a checkpoint of the student's own format.
- ``scales``: only the quantization scales of the ``QuantLinear``s (codes fixed), trained in
  log space so ``lr`` is a relative step (``trainables.LogScales``);
- ``norms``: only the norm gains;
- ``lora``: low-rank adapters on the decoder linears, merged at the end; on a quantized layer
  the adapter is trained through the same fixed-grid fake-quantizer it is re-quantized with,
  so what was trained is exactly what is saved.
  ``scales``, ``norms`` and ``lora`` combine (``scales,norms``).

Data: token windows (``--text`` and/or sequences the teacher samples, data-free as in LLM-QAT)
and facts (edit prompts + paraphrases followed by the target; the loss there is taken on the
target tokens only and weighted by ``facts_weight``), so that the teacher's edits survive.

Checkpoints of the *trainer* (``save_every``) hold the step, the trainable tensors, the optimizer
moments and a run identity (hashes of the config, the teacher, the student and the data); a
``resume`` from another run's checkpoint is refused, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from editcomp.arch import get_adapter
from editcomp.checkpoint import atomic_directory
from editcomp.data import document_prefix
from editcomp.decoding import next_logits
from editcomp.distill.losses import LOSSES, distill_loss, loss_params, teacher_confidence
from editcomp.distill.trainables import _owned_by_wrapper, _Trainables
from editcomp.errors import CheckpointError, ConfigError, DataError, NumericalError

TRAIN_SETS = ("all", "scales", "norms", "lora")
#: learning rates that move each trainable set noticeably within a few hundred steps
DEFAULT_LR = {"all": 1e-5, "scales": 2e-3, "norms": 1e-3, "lora": 2e-4}
#: config fields that do not change what a run computes (left out of its identity)
_NOT_IDENTITY = ("save_every", "checkpoint_dir", "resume")
STATE_JSON, STATE_TENSORS = "trainer_state.json", "trainer_state.safetensors"


@dataclass
class DistillConfig:
    """How to distill. Defaults follow the papers, scaled to a CPU (short windows, few steps)."""

    loss: str = "fkl"
    train: str = "all"
    steps: int = 100
    lr: float | None = None          # None: DEFAULT_LR of the (first) trainable set
    batch_size: int = 1
    seq_len: int = 512
    grad_accum: int = 1
    warmup: int = 0                  # linear warm-up steps, then cosine decay to 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    facts_weight: float = 1.0
    facts_batch: int = 8
    alpha: float = 0.1               # skl / srkl
    beta: float = 0.5                # jsd
    k: int = 1000                    # kltop
    gamma: float | None = None       # cakld; None: the teacher's mean top-1 confidence on the data
    lora_rank: int = 8
    lora_alpha: float = 16.0
    seed: int = 0
    save_every: int = 0              # trainer checkpoint every N steps (0: never)
    checkpoint_dir: str | None = None
    resume: str | None = None

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}; valid: {', '.join(LOSSES)}")
        self.train_sets()
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "facts_batch", "lora_rank"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup", "save_every"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.facts_weight < 0:
            raise ConfigError(f"facts_weight must be >= 0, got {self.facts_weight}")
        if self.save_every and not self.checkpoint_dir:
            raise ConfigError("save_every needs checkpoint_dir (where the trainer state goes)")
        if not 0.0 <= self.alpha < 1.0:
            raise ConfigError(f"alpha must be in [0, 1), got {self.alpha}")
        if not 0.0 < self.beta < 1.0:
            raise ConfigError(f"beta must be in (0, 1), got {self.beta}")
        if self.gamma is not None and not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"gamma must be in [0, 1], got {self.gamma}")
        if self.k < 1:
            raise ConfigError(f"k must be at least 1, got {self.k}")

    def train_sets(self) -> tuple[str, ...]:
        sets = tuple(s.strip() for s in str(self.train).split(",") if s.strip())
        bad = [s for s in sets if s not in TRAIN_SETS]
        if not sets or bad:
            raise ConfigError(f"unknown trainable set {', '.join(bad) or repr(self.train)}; valid: "
                              f"{', '.join(TRAIN_SETS)} (scales, norms and lora combine: "
                              "scales,norms)")
        if "all" in sets and len(sets) > 1:
            raise ConfigError("train 'all' already includes every weight; do not combine it")
        return sets

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.train_sets()[0]]

    def identity(self) -> dict:
        """The fields that determine the result (what a resumed run must share)."""
        return {k: v for k, v in asdict(self).items() if k not in _NOT_IDENTITY}


@dataclass
class DistillData:
    """Training data: ``windows`` ``[n, L]`` token ids (text and/or teacher samples) and
    ``facts``: ``(prompt ids, target ids)`` pairs whose target tokens carry the facts loss."""

    windows: torch.Tensor | None = None
    facts: list[tuple[list[int], list[int]]] = field(default_factory=list)
    pad_id: int = 0
    sources: dict = field(default_factory=dict)

    def digest(self) -> str:
        h = hashlib.sha256()
        if self.windows is not None:
            h.update(_tensor_bytes(self.windows.long()))
        h.update(json.dumps(self.facts).encode())
        return h.hexdigest()


# ---------------------------------------------------------------------------------- data

def generate_sequences(model, tokenizer, n: int, length: int, seed: int = 0,
                       batch_size: int = 4, progress: bool = True) -> torch.Tensor:
    """``n`` sequences of ``length`` tokens sampled from ``model`` (LLM-QAT's data-free data).

    Each starts with the tokenizer's document prefix (``<bos>`` where it adds one) and a
    uniformly random first token, then samples from the full distribution at temperature 1;
    end-of-sequence is suppressed so every sequence is a full window. A seeded generator makes
    it reproducible.
    """
    if n < 1:
        raise ConfigError(f"generate needs at least 1 sequence, got {n}")
    device = next(model.parameters()).device
    vocab = get_adapter(model).vocab_size
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.tensor(document_prefix(tokenizer), dtype=torch.long)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    blocked = torch.zeros(vocab, dtype=torch.bool)
    blocked[[i for i in special if i < vocab]] = True
    allowed = (~blocked).nonzero().flatten()
    out = []
    was = model.training
    model.eval()
    bar = tqdm(total=n, desc="generate", unit="seq", disable=not progress, leave=False)
    try:
        with torch.inference_mode():
            for b in range(0, n, batch_size):
                m = min(batch_size, n - b)
                first = allowed[torch.randint(0, allowed.numel(), (m, 1), generator=gen)]
                ids = torch.cat([prefix.expand(m, -1), first], 1)
                ids = ids.to(device)
                logits, past = next_logits(model, ids)
                while ids.shape[1] < length:
                    logits = logits.float().masked_fill(blocked.to(logits.device), -math.inf)
                    probs = torch.softmax(logits, -1).cpu()
                    nxt = torch.multinomial(probs, 1, generator=gen).to(device)
                    ids = torch.cat([ids, nxt], 1)
                    if ids.shape[1] == length:
                        break
                    logits, past = next_logits(model, nxt, past)
                out.append(ids[:, :length].cpu())
                bar.update(m)
    finally:
        bar.close()
        model.train(was)
    return torch.cat(out)


def fact_sequences(tokenizer, facts) -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, target ids)`` of every language's prompt and paraphrases of ``facts``.

    Generality / locality / portability probes are evaluation-only and never used.
    """
    from editcomp.eval.edit_metrics import encode_prompt_target

    out = []
    for fact in facts:
        for lang, rec in fact.langs.items():
            for prompt in (rec.prompt, *rec.paraphrases):
                p, t = encode_prompt_target(tokenizer, prompt, rec.target, lang)
                out.append((list(p), list(t)))
    return out


def build_data(tokenizer, teacher, config: DistillConfig, text: str | None = None,
               generate: int = 0, facts: str | None = None, progress: bool = True) -> DistillData:
    """Read, sample and tokenize the training data a run uses (text windows of ``seq_len``,
    ``generate`` teacher samples of ``seq_len``, the facts file's prompt/target pairs)."""
    from editcomp.data import facts_sha256, load_facts, token_windows

    if not (text or generate or facts):
        raise ConfigError("no training data: give --text FILE, --generate N and/or --facts FILE")
    parts, sources = [], {}
    if text:
        w = token_windows(tokenizer, os.fspath(text), config.seq_len, each_as_document=True)
        parts.append(w)
        sources["text"] = {"path": str(text), "windows": int(w.shape[0])}
    if generate:
        parts.append(generate_sequences(teacher, tokenizer, int(generate), config.seq_len,
                                        seed=config.seed, progress=progress))
        sources["generated"] = {"sequences": int(generate), "seed": config.seed}
    pairs = []
    if facts:
        pairs = fact_sequences(tokenizer, load_facts(facts))
        sources["facts"] = {"path": str(facts), "sequences": len(pairs),
                            "sha256": facts_sha256(facts)}
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None) or 0
    return DistillData(windows=torch.cat(parts) if parts else None, facts=pairs, pad_id=int(pad),
                       sources=sources)


class _Order:
    """Deterministic epoch-wise shuffled order over ``n`` items: item of any global index, so a
    resumed run continues exactly where the checkpoint left off."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def take(self, start: int, count: int) -> list[int]:
        out = []
        for i in range(start, start + count):
            epoch, j = divmod(i, self.n)
            if epoch not in self._perms:
                self._perms = {epoch: torch.randperm(
                    self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))}
            out.append(int(self._perms[epoch][j]))
        return out


def _facts_batch(pairs, idx, pad_id):
    seqs = [pairs[i][0] + pairs[i][1] for i in idx]
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), L), dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.bool)
    for r, i in enumerate(idx):
        p, t = pairs[i]
        ids[r, :len(p) + len(t)] = torch.tensor(p + t)
        attn[r, :len(p) + len(t)] = 1
        mask[r, len(p) - 1:len(p) + len(t) - 1] = True  # logits that predict the target tokens
    return ids, attn, mask


# --------------------------------------------------------------------------- run identity

def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def model_digest(model) -> str:
    """sha256 over a model's tensors (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _config_digest(config: DistillConfig) -> str:
    return hashlib.sha256(json.dumps(config.identity(), sort_keys=True).encode()).hexdigest()


def _save_state(directory: str, ident: dict, step: int, micro: int, trainables: _Trainables,
                opt: torch.optim.Optimizer, losses: list[float], extra: dict) -> None:
    """Write the trainer state atomically (tmp dir, then rename over the old one)."""
    with atomic_directory(directory) as tmp:
        tensors = {f"param/{k}": v.detach().cpu().contiguous()
                   for k, v in trainables.tensors.items()}
        state = opt.state_dict()["state"]
        for i, st in state.items():
            for k, v in st.items():
                tensors[f"opt/{i}/{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
        save_file(tensors, str(tmp / STATE_TENSORS))
        meta = {"format": 1, "step": step, "data_position": micro, "identity": ident,
                "losses": losses, **extra}
        (tmp / STATE_JSON).write_text(json.dumps(meta, indent=2) + "\n")


def _load_state(directory: str, ident: dict) -> tuple[dict, dict]:
    path = Path(directory)
    meta_file, tensor_file = path / STATE_JSON, path / STATE_TENSORS
    if not meta_file.exists() or not tensor_file.exists():
        raise CheckpointError(f"{path}: not a distill trainer checkpoint (no {STATE_JSON} / "
                              f"{STATE_TENSORS})")
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{meta_file}: not valid JSON ({e})") from None
    theirs = meta.get("identity", {})
    diffs = []
    for key in ("teacher", "student", "data"):
        if theirs.get(key) != ident[key]:
            diffs.append(f"the {key} differs")
    if theirs.get("config_sha256") != ident["config_sha256"]:
        a, b = theirs.get("config", {}), ident["config"]
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        diffs.append("the config differs (" + ", ".join(
            f"{k}: {a.get(k)!r} there, {b.get(k)!r} here" for k in keys) + ")")
    if diffs:
        raise CheckpointError(f"{path}: checkpoint of another run, refusing to resume from it: "
                              + "; ".join(diffs))
    from editcomp.checkpoint import check_safetensors
    check_safetensors(tensor_file)
    return meta, load_file(str(tensor_file))


# ---------------------------------------------------------------------------------- train

def _lr_at(step: int, config: DistillConfig) -> float:
    base = config.learning_rate
    if config.warmup and step < config.warmup:
        return base * (step + 1) / config.warmup
    span = max(config.steps - config.warmup, 1)
    return base * 0.5 * (1.0 + math.cos(math.pi * (step - config.warmup) / span))


def check_same_vocab(student, teacher) -> None:
    """Refuse teacher/student pairs with different vocabularies (this version needs one)."""
    vs, vt = get_adapter(student).vocab_size, get_adapter(teacher).vocab_size
    ls, lt = get_adapter(student).lm_head, get_adapter(teacher).lm_head
    out_s = getattr(ls, "out_features", vs)
    out_t = getattr(lt, "out_features", vt)
    if vs != vt or out_s != out_t:
        raise ConfigError(f"teacher and student vocabularies differ (teacher {vt} tokens / {out_t} "
                          f"logits, student {vs} / {out_s}); distillation needs one tokenizer")


def distill(student, teacher, config: DistillConfig, data: DistillData, progress: bool = True,
            callback=None) -> dict:
    """Train ``student`` (in place) towards ``teacher`` on ``data``; return a report.

    The student keeps its format: quantized layers end as ``QuantLinear``s with new integer codes
    on the same grid (or new scales), adapters are merged. A NaN/Inf loss or gradient raises
    ``NumericalError`` naming the step, with the student's weights untouched. ``callback(step,
    loss)`` is called after every optimizer step (an exception there stops the run cleanly).
    """
    check_same_vocab(student, teacher)
    if data.windows is None and not data.facts:
        raise DataError("no training data (no windows and no facts)")
    if data.windows is not None and data.windows.shape[1] < 2:
        raise DataError(f"training windows of {data.windows.shape[1]} tokens; need at least 2")
    s_dev = next(student.parameters()).device
    t_dev = next(teacher.parameters()).device
    t0 = time.time()
    ident = {"config_sha256": _config_digest(config), "config": config.identity(),
             "teacher": model_digest(teacher), "student": model_digest(student),
             "data": data.digest()}
    lp = loss_params(config.loss, {"alpha": config.alpha, "beta": config.beta, "k": config.k,
                                   "gamma": config.gamma})
    teacher.eval()
    if config.loss == "cakld" and config.gamma is None:
        lp["gamma"] = _teacher_gamma(teacher, data, config, t_dev)
    trainables = _Trainables(student, config)
    # what training changes in place (norm gains, scales, float weights): restored on failure
    backup = {k: t.detach().clone() for k, t in trainables.tensors.items()
              if not _owned_by_wrapper(student, k, trainables)}
    student.eval()  # no dropout: the run is deterministic, gradients still flow
    opt = torch.optim.AdamW(list(trainables.tensors.values()), lr=config.learning_rate,
                            weight_decay=config.weight_decay)
    losses: list[float] = []
    start = 0
    ok = False
    try:
        if config.resume:
            meta, tensors = _load_state(config.resume, ident)
            start, losses = int(meta["step"]), list(meta.get("losses", []))
            with torch.no_grad():
                for k, t in trainables.tensors.items():
                    if f"param/{k}" not in tensors:
                        raise CheckpointError(f"{config.resume}: trainer checkpoint lacks {k}")
                    t.copy_(tensors[f"param/{k}"])
            sd = opt.state_dict()
            sd["state"] = {}
            for key, v in tensors.items():
                if key.startswith("opt/"):
                    _, i, name = key.split("/", 2)
                    sd["state"].setdefault(int(i), {})[name] = v.to(s_dev) if v.dim() else v
            opt.load_state_dict(sd)
        orders = (_Order(data.windows.shape[0], config.seed) if data.windows is not None else None,
                  _Order(len(data.facts), config.seed + 1) if data.facts else None)
        bar = tqdm(range(start, config.steps), desc=f"distill ({config.loss})", unit="step",
                   initial=start, total=config.steps, disable=not progress)
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, config)
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in range(config.grad_accum):
                i = step * config.grad_accum + micro
                loss = _micro_loss(student, teacher, config, data, orders, i, lp, s_dev, t_dev)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise NumericalError(f"distill step {step + 1}: the {config.loss} loss is "
                                         f"{value}; nothing was written")
                (loss / config.grad_accum).backward()
                step_loss += value / config.grad_accum
            params = list(trainables.tensors.values())
            norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm
                                                  if config.max_grad_norm > 0 else float("inf"))
            if not math.isfinite(float(norm)):
                raise NumericalError(f"distill step {step + 1}: the gradient norm is "
                                     f"{float(norm)}; nothing was written")
            opt.step()
            losses.append(step_loss)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            done = step + 1
            if config.save_every and done % config.save_every == 0 and done < config.steps:
                _save_state(config.checkpoint_dir, ident, done, done * config.grad_accum,
                            trainables, opt, losses, {"gamma": lp.get("gamma")})
            if callback is not None:
                callback(done, step_loss)
        bar.close()
        for k, t in trainables.tensors.items():
            if not torch.isfinite(t).all():
                raise NumericalError(f"distill: trained tensor {k} holds NaN/Inf; nothing was "
                                     "written")
        trainables.finish(commit=True)
        ok = True
    finally:
        if not ok:  # leave the student as it came in
            with torch.no_grad():
                for k, v in backup.items():
                    trainables.tensors[k].copy_(v)
            trainables.finish(commit=False)
    return {
        "loss": config.loss, "train": config.train, "steps": config.steps,
        "lr": config.learning_rate, "trainable_params": trainables.numel,
        "loss_params": lp, "resumed_from": start or None,
        "loss_curve": summarize_curve(losses), "seconds": round(time.time() - t0, 1),
        "data": data.sources,
    }


def _teacher_gamma(teacher, data: DistillData, config: DistillConfig, t_dev,
                   max_sequences: int = 8) -> float:
    """CAKLD's gamma: the teacher's mean top-1 probability on (the first sequences of) the
    training data, fixed for the run as in BitDistiller."""
    total, n = 0.0, 0
    with torch.inference_mode():
        if data.windows is not None:
            for ids in data.windows[:max_sequences].split(config.batch_size):
                logits = teacher(input_ids=ids.to(t_dev), use_cache=False).logits
                c, m = teacher_confidence(logits)
                total, n = total + c, n + m
        if data.facts:
            ids, attn, mask = _facts_batch(data.facts, list(range(min(len(data.facts),
                                                                    max_sequences))), data.pad_id)
            logits = teacher(input_ids=ids.to(t_dev), attention_mask=attn.to(t_dev),
                             use_cache=False).logits
            c, m = teacher_confidence(logits, mask.to(t_dev))
            total, n = total + c, n + m
    return total / n if n else 0.5


def _micro_loss(student, teacher, config, data, orders, i, lp, s_dev, t_dev) -> torch.Tensor:
    total = None
    text_order, facts_order = orders
    if text_order is not None:
        idx = text_order.take(i * config.batch_size, config.batch_size)
        ids = data.windows[idx]
        with torch.no_grad():
            t_logits = teacher(input_ids=ids.to(t_dev), use_cache=False).logits.to(s_dev)
        s_logits = student(input_ids=ids.to(s_dev), use_cache=False).logits
        total = distill_loss(config.loss, s_logits, t_logits, **lp)
    if facts_order is not None and config.facts_weight > 0:
        n = min(config.facts_batch, len(data.facts))
        ids, attn, mask = _facts_batch(data.facts, facts_order.take(i * n, n), data.pad_id)
        with torch.no_grad():
            t_logits = teacher(input_ids=ids.to(t_dev), attention_mask=attn.to(t_dev),
                               use_cache=False).logits.to(s_dev)
        s_logits = student(input_ids=ids.to(s_dev), attention_mask=attn.to(s_dev),
                           use_cache=False).logits
        f = config.facts_weight * distill_loss(config.loss, s_logits, t_logits, mask.to(s_dev),
                                               **lp)
        total = f if total is None else total + f
    if total is None:
        raise DataError("facts_weight is 0 and there are no text windows: nothing to train on")
    return total


def summarize_curve(losses: list[float], points: int = 10) -> dict:
    """First/last/min loss and the mean loss over ``points`` equal stretches of the run."""
    if not losses:
        return {"first": None, "last": None, "min": None, "means": []}
    n = len(losses)
    bounds = [round(j * n / points) for j in range(points + 1)]
    means = [sum(losses[a:b]) / (b - a) for a, b in zip(bounds, bounds[1:]) if b > a]
    return {"first": losses[0], "last": losses[-1], "min": min(losses), "means": means,
            "steps": n}

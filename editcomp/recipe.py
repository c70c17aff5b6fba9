"""Recipes: a YAML pipeline (edit -> quantize -> distill, with eval after every step) run as one
resumable job.

A recipe names a starting model, a work directory, what to measure after every step, and the
steps. Each step's keys map 1:1 onto its config dataclass (``LAFNConfig``, ``QuantizeConfig``,
``DistillConfig``); a few keys per step name its inputs instead (``facts``, ``calib``, ``teacher``,
``text``), listed in ``StepKind.inputs``. Every step writes its own checkpoint under the work
directory; a step whose output already exists with the same step hash in its lineage (same kind,
config, inputs and input weights) is skipped, so an interrupted run resumes where it stopped.
The run ends with ``report.md`` and ``report.json`` in the work directory.

```yaml
name: demo
model: smollm2-135m
workdir: out/demo
eval: {text: ../shared/data/wikitext-2/test.txt, seq_len: 1024, max_windows: 4,
       facts: examples/facts.jsonl}
steps:
  - edit: {facts: examples/facts.jsonl, method: lafn}
  - quantize: {bits: w4a4kv4, method: ostquant}
  - distill: {teacher: edit, loss: kltop, steps: 60}
```
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from editcomp.errors import ConfigError, EditcompError

TOP_KEYS = ("name", "model", "workdir", "eval", "steps", "device", "dtype")
EVAL_KEYS = ("text", "seq_len", "max_windows", "facts", "langs", "limit")


@dataclass(frozen=True)
class StepKind:
    """How to build and run one kind of step.

    ``config`` and ``job`` are ``"module:attribute"`` references, imported only when a recipe
    uses the step (so a recipe with no edit step never imports the editor). ``job`` is called
    as ``job(input_ref, config, out=..., lineage_extra=..., device=..., dtype=..., **inputs)``
    and returns a result dict with the output path and metrics -- the same function the CLI uses.
    """

    config: str
    job: str
    inputs: tuple[str, ...] = ()
    #: inputs that name a model: a path, a registered name, or an earlier step's name
    model_inputs: tuple[str, ...] = ()
    #: inputs that are files, resolved relative to the recipe file
    file_inputs: tuple[str, ...] = ()
    #: job arguments a recipe fixes (the recipe's own ``eval`` block measures every stage)
    job_defaults: tuple[tuple[str, Any], ...] = ()

    def config_class(self) -> type:
        return _import(self.config)

    def job_function(self) -> Callable:
        return _import(self.job)


STEP_KINDS: dict[str, StepKind] = {
    "edit": StepKind("editcomp.jobs:EditConfig", "editcomp.jobs:edit_job",
                     inputs=("facts", "langs", "limit", "offset", "preserve_text",
                             "questions_file"),
                     file_inputs=("facts", "preserve_text", "questions_file")),
    "quantize": StepKind("editcomp.quant.pipeline:QuantizeConfig", "editcomp.jobs:quantize_job",
                         inputs=("calib",), file_inputs=("calib",),
                         job_defaults=(("eval_windows", 0),)),
    "distill": StepKind("editcomp.distill:DistillConfig", "editcomp.jobs:distill_job",
                        inputs=("teacher", "text", "facts"), model_inputs=("teacher",),
                        file_inputs=("text", "facts"), job_defaults=(("eval_windows", 0),)),
}


def _import(ref: str):
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass
class Step:
    kind: str
    name: str
    config: Any  # an instance of the kind's config dataclass
    inputs: dict = field(default_factory=dict)


@dataclass
class Recipe:
    name: str
    model: str
    workdir: Path
    eval: dict
    steps: list[Step]
    path: Path | None = None
    device: str | None = None
    dtype: str | None = None


# ------------------------------------------------------------------------------------- parsing


def _unknown(where: str, keys, valid) -> None:
    bad = [k for k in keys if k not in valid]
    if bad:
        raise ConfigError(f"{where}: unknown key {bad[0]!r}; valid keys: {', '.join(valid)}")


def build_config(cls: type, values: dict, where: str):
    """``cls(**values)``, building nested config dataclasses from nested mappings, with every
    unknown key reported as ``where.key`` together with the valid keys."""
    import typing

    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} keys, got {values!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    _unknown(where, values, names)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        sub = hints.get(key)
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            value = build_config(sub, value, f"{where}.{key}")
        kwargs[key] = value
    try:
        config = cls(**kwargs)
        validate = getattr(config, "validate", None)  # checks that need more than one field
        if callable(validate):
            validate()
        return config
    except TypeError as e:  # e.g. a required field missing
        raise ConfigError(f"{where}: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def parse_recipe(data: Any, path: Path | None = None) -> Recipe:
    """Validate a recipe (as loaded from YAML) and build every step's config.

    Every error names where it is (``recipe.yaml: steps[1].quantize``) and the valid keys, and
    all of this happens before any model is loaded.
    """
    where = str(path) if path else "recipe"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a recipe is a mapping with keys {', '.join(TOP_KEYS)}")
    _unknown(where, data, TOP_KEYS)
    for key in ("model", "steps"):
        if key not in data:
            raise ConfigError(f"{where}: missing key {key!r}")
    base = path.parent if path else Path.cwd()

    def resolve_file(value):
        p = Path(os.path.expanduser(str(value)))
        return str(p if p.is_absolute() else (base / p))

    ev = dict(data.get("eval") or {})
    _unknown(f"{where}: eval", ev, EVAL_KEYS)
    for key in ("text", "facts"):
        if ev.get(key):
            ev[key] = resolve_file(ev[key])
    raw_steps = data["steps"]
    if not isinstance(raw_steps, list) or not raw_steps:
        raise ConfigError(f"{where}: 'steps' must be a non-empty list")
    steps, names = [], {"base"}
    for i, raw in enumerate(raw_steps):
        at = f"{where}: steps[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{at}: a step is a mapping like {{quantize: {{bits: w4a16}}}}")
        raw = dict(raw)
        name = raw.pop("name", None)
        kinds = [k for k in raw if k in STEP_KINDS]
        _unknown(at, [k for k in raw if k not in STEP_KINDS], ("name", *STEP_KINDS))
        if len(kinds) != 1:
            raise ConfigError(f"{at}: give exactly one step kind ({', '.join(STEP_KINDS)})")
        kind = kinds[0]
        spec = STEP_KINDS[kind]
        values = dict(raw[kind] or {})
        inputs = {k: values.pop(k) for k in list(values) if k in spec.inputs}
        for key in spec.file_inputs:
            if inputs.get(key):
                inputs[key] = resolve_file(inputs[key])
        for key in spec.model_inputs:
            ref = inputs.get(key)
            if ref is None or ref in names:
                continue
            if Path(resolve_file(ref)).is_dir():
                inputs[key] = resolve_file(ref)
            else:
                from editcomp.models import REGISTRY
                if ref not in REGISTRY:
                    raise ConfigError(
                        f"{at}.{kind}.{key}: {ref!r} is neither an earlier step ({', '.join(names)})"
                        f", a checkpoint directory, nor a registered model")
        cls = spec.config_class()
        try:
            config = build_config(cls, values, f"{at}.{kind}")
        except ConfigError as e:
            msg = str(e)
            if msg.startswith(f"{at}.{kind}: unknown key") and spec.inputs:
                # the step's input keys are valid there too
                msg += ", " + ", ".join(spec.inputs)
            raise ConfigError(msg) from None
        name = str(name or kind)
        if name in names:
            raise ConfigError(f"{at}: step name {name!r} is used twice; give it a 'name'")
        names.add(name)
        steps.append(Step(kind=kind, name=name, config=config, inputs=inputs))
    workdir = Path(data.get("workdir") or Path("out") / (data.get("name") or "recipe"))
    if not workdir.is_absolute():
        workdir = Path.cwd() / workdir
    return Recipe(name=str(data.get("name") or (path.stem if path else "recipe")),
                  model=str(data["model"]), workdir=workdir, eval=ev, steps=steps, path=path,
                  device=data.get("device"), dtype=data.get("dtype"))


def load_recipe(path: str | os.PathLike) -> Recipe:
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: recipe not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    return parse_recipe(data, p)


# --------------------------------------------------------------------------------------- running


def step_hash(step: Step, input_sha: str | None) -> str:
    """Identity of a step's output: kind, config, inputs and the input weights."""
    payload = {"kind": step.kind, "config": dataclasses.asdict(step.config),
               "inputs": step.inputs, "input_weights_sha256": input_sha}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _finished(out: Path, digest: str) -> bool:
    """True when ``out`` is a checkpoint whose last lineage entry carries ``digest``."""
    from editcomp.checkpoint import read_lineage

    if not (out / "config.json").exists():
        return False
    try:
        history = read_lineage(out).get("history", [])
    except EditcompError:
        return False
    return bool(history) and history[-1].get("recipe_step") == digest


def _evaluate(path: Path, ev: dict, device, dtype, reference=None) -> dict:
    """Perplexity and edit metrics of one checkpoint, as the recipe's ``eval`` block asks.

    Locality counts agreement with ``reference`` (the recipe's starting model): whether an
    unrelated answer is *unchanged*, not whether the small model knew the stored answer."""
    from editcomp import checkpoint
    from editcomp.data import load_facts
    from editcomp.eval.run import evaluate

    if not ev.get("text") and not ev.get("facts"):
        return {}
    langs = ev.get("langs")
    if isinstance(langs, str):
        langs = [s.strip() for s in langs.split(",") if s.strip()]
    facts = load_facts(ev["facts"], langs=langs, limit=ev.get("limit")) if ev.get("facts") else None
    ck = checkpoint.load(path, device=device, dtype=dtype)
    res = evaluate(ck, text=ev.get("text"), seq_len=ev.get("seq_len", 2048),
                   max_windows=ev.get("max_windows"), facts=facts, langs=langs,
                   reference=reference if facts else None, device=device, dtype=dtype)
    out = {}
    if "perplexity" in res:
        out["ppl"] = res["perplexity"]["ppl"]
    if "edit" in res:
        out["edit"] = {lang: {m: v["acc"] for m, v in r.items() if isinstance(v, dict) and v.get("n")}
                       for lang, r in res["edit"].items()}
    return out


def run_recipe(recipe: Recipe, force: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run every step (skipping finished ones unless ``force``), evaluate after each, report."""
    from editcomp import checkpoint, models

    recipe.workdir.mkdir(parents=True, exist_ok=True)
    outputs = {"base": str(models.resolve(recipe.model))}
    stages = [{"stage": "base", "path": outputs["base"], "seconds": 0.0, "skipped": True}]
    current = outputs["base"]
    for i, step in enumerate(recipe.steps):
        out = recipe.workdir / f"{i + 1:02d}-{step.name}"
        digest = step_hash(step, checkpoint.weights_sha256(Path(current)))
        row = {"stage": step.name, "kind": step.kind, "path": str(out)}
        if not force and _finished(out, digest):
            log(f"[{i + 1}/{len(recipe.steps)}] {step.name}: up to date, skipped ({out})")
            row.update(seconds=0.0, skipped=True)
        else:
            if out.exists() and not force:
                raise EditcompError(
                    f"{out} exists but was made by another recipe step (different config, inputs "
                    f"or input weights); remove it or pass --force")
            log(f"[{i + 1}/{len(recipe.steps)}] {step.name}: {step.kind} -> {out}")
            inputs = {k: (outputs.get(v, v) if k in STEP_KINDS[step.kind].model_inputs else v)
                      for k, v in step.inputs.items()}
            t0 = time.time()
            kind = STEP_KINDS[step.kind]
            result = kind.job_function()(
                current, step.config, out=out, force=force, device=recipe.device,
                dtype=recipe.dtype, lineage_extra={"recipe_step": digest, "recipe": recipe.name},
                **dict(kind.job_defaults), **inputs)
            row.update(seconds=round(time.time() - t0, 1), skipped=False,
                       metrics=result.get("metrics", {}))
        outputs[step.name] = str(out)
        current = str(out)
        stages.append(row)
    for row in stages:
        cache = Path(row["path"]) / ".." / f".{Path(row['path']).name}.eval.json"
        row["eval"] = _cached_eval(Path(row["path"]), recipe, cache.resolve(), outputs["base"])
        log(f"evaluated {row['stage']}: {_short(row['eval'])}")
    report = {"recipe": recipe.name, "model": recipe.model, "workdir": str(recipe.workdir),
              "eval": recipe.eval, "stages": stages}
    (recipe.workdir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    (recipe.workdir / "report.md").write_text(format_report(report) + "\n")
    return report


def _cached_eval(path: Path, recipe: Recipe, cache: Path, reference: str) -> dict:
    """Evaluate a stage once per (weights, eval settings); reuse the result on a resumed run."""
    from editcomp.checkpoint import weights_sha256

    key = hashlib.sha256(json.dumps([weights_sha256(path), recipe.eval, reference],
                                    sort_keys=True).encode()).hexdigest()
    if cache.exists():
        try:
            saved = json.loads(cache.read_text())
            if saved.get("key") == key:
                return saved["eval"]
        except ValueError:
            pass
    result = _evaluate(path, recipe.eval, recipe.device, recipe.dtype, reference)
    if path.parent == cache.parent:  # only cache inside the work directory
        cache.write_text(json.dumps({"key": key, "eval": result}, ensure_ascii=False))
    return result


def _short(ev: dict) -> str:
    parts = [f"ppl {ev['ppl']:.3f}"] if "ppl" in ev else []
    for lang, m in (ev.get("edit") or {}).items():
        if "reliability" in m:
            parts.append(f"{lang} rel {m['reliability']:.2f}")
    return ", ".join(parts) or "no eval"


def format_report(report: dict) -> str:
    """Markdown table: one row per stage, ppl and reliability/generality/locality per language."""
    stages = report["stages"]
    langs = sorted({lang for s in stages for lang in (s["eval"].get("edit") or {})},
                   key=lambda lang: (lang == "mean", lang))  # the mean last
    head = ["stage", "ppl"] + [f"{lang} rel / gen / loc" for lang in langs] + ["seconds"]
    lines = [f"# {report['recipe']} ({report['model']})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in stages:
        ev = s["eval"]
        cells = [s["stage"], f"{ev['ppl']:.3f}" if "ppl" in ev else "-"]
        for lang in langs:
            m = (ev.get("edit") or {}).get(lang, {})
            cells.append(" / ".join(f"{m[k]:.2f}" if k in m else "-"
                                    for k in ("reliability", "generality", "locality")))
        cells.append("skipped" if s.get("skipped") and s["stage"] != "base"
                     else f"{s.get('seconds', 0):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

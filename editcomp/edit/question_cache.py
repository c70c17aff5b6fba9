"""A checkpoint's sampled questions, kept on disk so that the next edit of it reads them.

LAFN samples a few hundred questions from the unedited model and continues each greedily
(``unrelated.sampled_questions``): a batch edit's unrelated prompts, a single edit's answer
preservation. For one fact that is over half the call (gemma3-270m on a 2-core CPU: 94 s
sampled, 42 s read back; benchmarks/edit_call.py), and it is the same work for every edit of
the same checkpoint. The questions depend only on the weights, the languages, how they are
sampled and continued, and where (one seed draws other samples on another device or dtype), so
those make the key of a JSON file under ``$EDITCOMP_HOME/questions``. A cached pool gives the
same edit as a freshly sampled one; a file that does not read back is sampled again and
replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

import editcomp
from editcomp.edit.lafn_config import LAFNConfig
from editcomp.edit.questions import QUESTION_TOKENS, few_shot_questions
from editcomp.edit.unrelated import UnrelatedPrompts, prompt_continuation, sampled_questions
from editcomp.models import home

CACHE_FORMAT = 1


def cache_dir() -> Path:
    """Where the pools live: ``$EDITCOMP_HOME/questions`` (default ``~/.cache/editcomp``)."""
    return home() / "questions"


def questions_key(weights_sha256: str, langs, config: LAFNConfig, device, dtype,
                  alone: bool = False) -> str:
    """The pool's identity: everything ``sampled_questions`` draws from, hashed (``alone``: the
    pool of facts edited alone, whose continuations are shorter)."""
    langs = list(dict.fromkeys(langs))
    fields = {"format": CACHE_FORMAT, "editcomp": editcomp.__version__, "torch": torch.__version__,
              "weights_sha256": weights_sha256, "langs": langs, "per_lang": config.questions_per_lang(),
              "continuation": prompt_continuation(config, alone),
              "question_tokens": QUESTION_TOKENS,
              "shots": {lang: few_shot_questions(lang) for lang in langs},
              "device": torch.device(device).type, "dtype": str(dtype)}
    blob = json.dumps(fields, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:32]


def cached_questions(model, tokenizer, weights_sha256: str, langs, config: LAFNConfig,
                     directory: str | os.PathLike | None = None, alone: bool = False
                     ) -> UnrelatedPrompts:
    """``sampled_questions(model, tokenizer, langs, config, alone=alone)``, read from
    ``directory`` (default ``cache_dir()``) when this checkpoint's pool is there, else sampled
    and written there (atomically; where it cannot be written, a warning). ``weights_sha256``:
    the checkpoint's (``checkpoint.weights_sha256``)."""
    param = next(model.parameters())
    key = questions_key(weights_sha256, langs, config, param.device, param.dtype, alone)
    file = Path(directory if directory is not None else cache_dir()) / f"{key}.json"
    if file.exists():
        try:
            return _read(file)
        except (OSError, ValueError, KeyError, TypeError) as e:
            warnings.warn(f"{file}: not a readable question pool ({e}); sampling it again")
    pool = sampled_questions(model, tokenizer, langs, config, alone=alone)
    try:
        _write(file, pool)
    except OSError as e:  # a read-only or full cache costs the next edit time, not this one
        warnings.warn(f"could not keep the question pool at {file} ({e}); the next edit of this "
                      "checkpoint samples it again")
    return pool


def _read(file: Path) -> UnrelatedPrompts:
    data = json.loads(file.read_text(encoding="utf-8"))
    texts, ids, ends, row_langs = data["texts"], data["ids"], data["ends"], data["row_langs"]
    if not len(texts) == len(ids) == len(ends) == len(row_langs):
        raise ValueError("its lists differ in length")
    if not all(isinstance(t, int) for row in ids for t in row) or not all(
            isinstance(e, int) and 0 <= e < len(row) for e, row in zip(ends, ids)):
        raise ValueError("its token ids or ends are not in range")
    continuation = data.get("continuation")  # (not recorded before it differed by mode)
    if continuation is not None and not isinstance(continuation, int):
        raise ValueError("its continuation is not a token count")
    return UnrelatedPrompts(tuple(texts), tuple(tuple(row) for row in ids), tuple(ends),
                            tuple(data["langs"]), row_langs=tuple(row_langs),
                            continuation=continuation)


def _write(file: Path, pool: UnrelatedPrompts) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    data = {"texts": pool.texts, "ids": pool.ids, "ends": pool.ends, "langs": pool.langs,
            "row_langs": pool.row_langs, "continuation": pool.continuation}
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.stem}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is shared like the models
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False)
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

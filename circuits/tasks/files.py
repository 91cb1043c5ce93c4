"""Task files: our JSONL/CSV rows, and (through `circuits.tasks.mib`) MIB and EAP-IG data.

A task file is JSONL (one object per line) or CSV (a header row) with the fields
`clean`, `corrupted`, `answer`, `wrong`. `answer` and `wrong` are strings (a single token each,
leading space included, e.g. " Paris") or integer token ids, or lists of them for several
answers. With the `logprob` metric an answer may be several tokens: it is scored as the
log-probability of the whole continuation (`wrong` may then be left out); other metrics refuse
it. Every bad input is refused with a message naming the line.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch

from circuits import positions as positions_mod
from circuits.tasks import mib
from circuits.tasks.task import FIELDS, Metric, Task, TaskError, from_pairs, pad_id

# optional: {label: token index} per row, naming token positions (`circuits.positions`)
POSITIONS_FIELD = "positions"


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise TaskError(f"{path}: the file is empty")
    rows: list[tuple[int, dict]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        for i, row in enumerate(reader, start=2):
            parsed = {}
            for key, value in row.items():
                if key is None:
                    raise TaskError(f"{path}, line {i}: more cells than header fields")
                value = value if value is not None else ""
                parsed[key] = json.loads(value) if value.strip().startswith("[") else value
            rows.append((i, parsed))
    elif text.lstrip().startswith("["):                     # one JSON array of row objects
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise TaskError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
        for i, obj in enumerate(items, start=1):
            if not isinstance(obj, dict):
                raise TaskError(f"{path}, item {i}: expected an object with fields {', '.join(FIELDS)}")
            rows.append((i, obj))
    else:
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskError(f"{path}, line {i}: not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise TaskError(f"{path}, line {i}: expected an object with fields {', '.join(FIELDS)}")
            rows.append((i, obj))
    if not rows:
        raise TaskError(f"{path}: the file has no examples")
    return rows


def _single_token(tokenizer, value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise TaskError(f"{where}: expected a string or a token id, got {value!r}")
    if tokenizer is None:
        raise TaskError(f"{where}: this model has no tokenizer; give answers as token ids")
    ids = tokenizer.encode(value)
    if len(ids) != 1:
        shown = [tokenizer.decode([t]) for t in ids]
        raise TaskError(f"{where}: answer {value!r} is {len(ids)} tokens {shown}, not one; "
                        f"use a single-token answer (mind the leading space), or score the whole "
                        f"continuation with --metric logprob")
    return ids[0]


def _prompt(tokenizer, value: Any, where: str, bos: int | None) -> list[int]:
    if isinstance(value, list) and all(isinstance(t, int) for t in value):
        return list(value)
    if not isinstance(value, str):
        raise TaskError(f"{where}: expected a string or a list of token ids, got {value!r}")
    if tokenizer is None:
        raise TaskError(f"{where}: this model has no tokenizer; give prompts as lists of token ids")
    try:
        ids = tokenizer.encode(value)
    except ValueError as err:           # e.g. a fixed-vocabulary (tracr) tokenizer
        raise TaskError(f"{where}: {err}") from None
    return ([bos] if bos is not None else []) + ids


def load_file(path: str | Path, tokenizer, metric: Metric | None = None,
              prepend_bos: bool = True, vocab_size: int | None = None,
              counterfactual: str | None = None) -> Task:
    """Read and validate a task file: our JSONL/CSV format, MIB circuit-track rows, or EAP-IG CSV
    (see `circuits.tasks.mib`; `counterfactual` picks a MIB counterfactual column)."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: no such task file")
    rows = _read_rows(path)
    bos = getattr(tokenizer, "bos_token_id", None) if prepend_bos and tokenizer is not None else None
    imported = mib.load(path, rows, tokenizer, counterfactual, bos)
    if imported is not None:
        _check_vocab(imported, vocab_size, path)
        return imported if metric is None else imported.with_metric(metric)
    if counterfactual is not None:
        raise TaskError(f"{path}: --counterfactual applies to MIB-format data only")
    metric = metric or Metric.LOGIT_DIFF
    required = [f for f in FIELDS if not (f == "wrong" and metric is Metric.LOGPROB)]
    clean, corrupted, answers, wrongs, lines = [], [], [], [], []
    labels, where_of = [], []
    continued = 0
    for ln, row in rows:
        where = f"{path}, line {ln}"
        unknown = sorted(set(row) - set(FIELDS) - {POSITIONS_FIELD})
        if unknown:
            raise TaskError(f"{where}: unknown field(s) {', '.join(unknown)}; "
                            f"a task row has {', '.join(FIELDS)}")
        missing = [f for f in required if f not in row or row[f] in ("", None, [])]
        if missing:
            raise TaskError(f"{where}: missing field(s) {', '.join(missing)}")
        label = _labels(row.get(POSITIONS_FIELD), where)
        c = _prompt(tokenizer, row["clean"], where, bos)
        x = _prompt(tokenizer, row["corrupted"], where, bos)
        # logprob scores the answer alone: wrong answers are not read, so not tokenized either
        wrong = [] if metric is Metric.LOGPROB else \
            [_single_token(tokenizer, a, where) for a in _as_list(row.get("wrong") or [])]
        continuation = _continuation(tokenizer, row["answer"], metric)
        if continuation:
            # log p(whole continuation) = Σ_i log p(a_i | prompt, a_<i): one row per token, both
            # prompts extended by the same answer prefix. The mean over rows is the mean
            # continuation log-probability per example, times a constant.
            steps = [(c + continuation[:i], x + continuation[:i], [t]) for i, t in enumerate(continuation)]
            continued += 1
        else:
            steps = [(c, x, [_single_token(tokenizer, a, where) for a in _as_list(row["answer"])])]
        for c_i, x_i, a_i in steps:
            for t in c_i + x_i + a_i + wrong:
                if vocab_size is not None and not 0 <= t < vocab_size:
                    raise TaskError(f"{where}: token id {t} is outside the model's vocabulary (0..{vocab_size - 1})")
            clean.append(c_i)
            labels.append(label)
            where_of.append(where)
            corrupted.append(x_i)
            answers.append(a_i)
            wrongs.append(wrong)
            lines.append(ln)
    pad = pad_id(tokenizer)
    meta = {"source": str(path)}
    if continued:
        meta.update({"multi_token_answers": continued, "examples": len(rows)})
    try:
        names, index = positions_mod.check_labels(labels, [len(c) for c in clean], where_of)
    except positions_mod.PositionError as err:
        raise TaskError(str(err)) from None
    return from_pairs(path.stem, clean, corrupted, answers, wrongs, metric, pad_id=pad, lines=lines,
                      meta=meta, source=str(path), position_names=names, position_index=index)


def _labels(value: Any, where: str) -> dict:
    """A row's position labels: {label: token index} (indices count the BOS token)."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):                              # a CSV cell
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if not isinstance(value, dict) or not value:
        raise TaskError(f"{where}: {POSITIONS_FIELD} should map labels to token indices, "
                        f"e.g. {{\"S2\": 9, \"END\": 14}}; got {value!r:.60}")
    return value


def _continuation(tokenizer, answer: Any, metric: Metric) -> list[int] | None:
    """The tokens of a multi-token answer scored as a continuation (logprob metric only)."""
    if metric is not Metric.LOGPROB or not isinstance(answer, str) or tokenizer is None:
        return None
    ids = tokenizer.encode(answer)
    return ids if len(ids) > 1 else None


def _check_vocab(task: Task, vocab_size: int | None, path: Path) -> None:
    if vocab_size is None:
        return
    for what, ids in (("prompt", task.clean), ("prompt", task.corrupted), ("answer", task.answers),
                      ("answer", task.wrongs)):
        if bool((ids >= vocab_size).any()):
            row = int(torch.nonzero((ids >= vocab_size).any(-1))[0])
            raise TaskError(f"{path}, example {row + 1}: a {what} token id is outside the model's "
                            f"vocabulary (0..{vocab_size - 1})")



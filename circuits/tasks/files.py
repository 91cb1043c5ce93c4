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
import itertools
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from circuits import positions as positions_mod
from circuits.files import row_count
from circuits.tasks import mib
from circuits.tasks.task import FIELDS, Metric, Task, TaskError, from_pairs, pad_id

# optional: {label: token index} per row, naming token positions (`circuits.positions`)
POSITIONS_FIELD = "positions"


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


# One row of our format, declared once (MIB and EAP-IG rows have their own readers).
_PROMPT = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "integer", "minimum": 0}}]}
_ANSWER = {"anyOf": [{"type": "string"}, {"type": "integer", "minimum": 0},
                     {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer", "minimum": 0}]}}]}
# positions: an object {label: token index}, or in a CSV cell its JSON text; `_labels` and
# `positions.check_labels` check it with messages naming the label
_POSITIONS: dict = {}
ROW_SCHEMA = {"type": "object", "additionalProperties": False, "required": list(FIELDS),
              "properties": {"clean": _PROMPT, "corrupted": _PROMPT, "answer": _ANSWER, "wrong": _ANSWER,
                             POSITIONS_FIELD: _POSITIONS}}
_WHAT = {"clean": "a string or a list of token ids", "corrupted": "a string or a list of token ids",
         "answer": "a string, a token id, or a list of them", "wrong": "a string, a token id, or a list of them"}


@lru_cache(maxsize=2)
def _row_validator(wrong_required: bool):
    import jsonschema
    schema = dict(ROW_SCHEMA, required=[f for f in FIELDS if wrong_required or f != "wrong"])
    return jsonschema.Draft202012Validator(schema)


def check_row(row: dict, where: str, wrong_required: bool = True) -> None:
    """Validate one row against ROW_SCHEMA: one line naming the line and the field."""
    if len(row) == len(FIELDS) and all(type(row.get(f)) is str and row[f] for f in FIELDS):
        return          # the common row: four non-empty strings (a strict subset of ROW_SCHEMA), at once
    validator = _row_validator(wrong_required)
    if validator.is_valid(row) and not any(row.get(f) in ("", []) for f in FIELDS if f in row):
        return
    unknown = sorted(set(row) - set(FIELDS) - {POSITIONS_FIELD})
    if unknown:
        raise TaskError(f"{where}: unknown field(s) {', '.join(unknown)}; a task row has {', '.join(FIELDS)}")
    required = [f for f in FIELDS if wrong_required or f != "wrong"]
    missing = [f for f in required if f not in row or row[f] in ("", None, [])]
    if missing:
        raise TaskError(f"{where}: missing field(s) {', '.join(missing)}")
    for error in validator.iter_errors(row):
        field = error.absolute_path[0] if error.absolute_path else None
        if field in _WHAT:
            raise TaskError(f"{where}: field {field} should be {_WHAT[field]}, got {row[field]!r:.60}")
        raise TaskError(f"{where}: {error.message:.120}")


def _decoded(path: Path, raw: bytes, line: int) -> str:
    try:
        return raw.decode("utf-8-sig" if line == 1 else "utf-8")
    except UnicodeDecodeError as err:
        raise TaskError(f"{path}, line {line}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                        f"{err.start + 1}); save the file as UTF-8") from None


def iter_rows(path: Path, limit: int | None = None) -> Iterator[tuple[int, dict]]:
    """(line, row) of a task file, read one line at a time (a JSON array is read whole)."""
    n = 0
    with path.open("rb") as f:
        head = f.read(1 << 16)
        f.seek(0)
        if head.lstrip().startswith(b"["):                        # one JSON array of row objects
            raw = f.read()
            try:
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError as err:
                line = raw[: err.start].count(b"\n") + 1
                raise TaskError(f"{path}, line {line}: not UTF-8 text "
                                f"(byte 0x{raw[err.start]:02x}); save the file as UTF-8") from None
            try:
                items = json.loads(text)
            except json.JSONDecodeError as err:
                raise TaskError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
            for i, obj in enumerate(items[:limit] if limit else items, start=1):
                if not isinstance(obj, dict):
                    raise TaskError(f"{path}, item {i}: expected an object with fields {', '.join(FIELDS)}")
                yield i, obj
            return
        if path.suffix.lower() == ".csv":
            numbered = ((i, _decoded(path, raw, i)) for i, raw in enumerate(f, start=1))
            where = {"line": 1}

            def lines():
                for i, text in numbered:
                    where["line"] = i
                    yield text
            reader = csv.DictReader(lines())
            for row in reader:
                i = where["line"]
                parsed = {}
                for key, value in row.items():
                    if key is None:
                        raise TaskError(f"{path}, line {i}: more cells than header fields")
                    value = value if value is not None else ""
                    try:
                        parsed[key] = json.loads(value) if value.strip().startswith("[") else value
                    except json.JSONDecodeError as err:
                        raise TaskError(f"{path}, line {i}: field {key}: not a valid list ({err.msg})") from None
                yield i, parsed
                n += 1
                if limit and n >= limit:
                    return
            return
        for i, raw in enumerate(f, start=1):
            line = _decoded(path, raw, i)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskError(f"{path}, line {i}: not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise TaskError(f"{path}, line {i}: expected an object with fields {', '.join(FIELDS)}")
            yield i, obj
            n += 1
            if limit and n >= limit:
                return


def _single_token(tokenizer, value: Any, where: str, cache: dict | None = None) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise TaskError(f"{where}: expected a string or a token id, got {value!r}")
    if tokenizer is None:
        raise TaskError(f"{where}: this model has no tokenizer; give answers as token ids")
    if cache is not None and value in cache:      # answers repeat (names, labels): encode each once
        return cache[value]
    ids = tokenizer.encode(value)
    if len(ids) != 1:
        shown = [tokenizer.decode([t]) for t in ids]
        raise TaskError(f"{where}: answer {value!r} is {len(ids)} tokens {shown}, not one; "
                        f"use a single-token answer (mind the leading space), or score the whole "
                        f"continuation with --metric logprob")
    if cache is not None:
        cache[value] = ids[0]
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
              counterfactual: str | None = None, limit: int | None = None, progress: bool = False) -> Task:
    """Read and validate a task file: our JSONL/CSV format, MIB circuit-track rows, or EAP-IG CSV
    (see `circuits.tasks.mib`; `counterfactual` picks a MIB counterfactual column). Rows are
    read one at a time (`limit`: the first rows only), each checked against ROW_SCHEMA, with a
    progress bar whose total (the row count) shows at once."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: no such task file")
    total = row_count(path)
    if total is not None and limit:
        total = min(total, limit)
    with tqdm(total=total, desc=f"reading {path.name}", unit="row", disable=not progress, leave=False) as bar:
        return _read_task(path, tokenizer, metric, bos_of(tokenizer, prepend_bos), vocab_size, counterfactual,
                          limit, bar)


def bos_of(tokenizer, prepend_bos: bool) -> int | None:
    return getattr(tokenizer, "bos_token_id", None) if prepend_bos and tokenizer is not None else None


def _read_task(path: Path, tokenizer, metric: Metric | None, bos: int | None, vocab_size: int | None,
               counterfactual: str | None, limit: int | None, bar) -> Task:
    rows_in = iter_rows(path, limit)
    first = next(rows_in, None)
    if first is None:
        with path.open("rb") as f:
            empty = not any(raw.strip() for raw in f)
        raise TaskError(f"{path}: the file is empty" if empty else f"{path}: the file has no examples")
    if mib.is_mib(first[1]) or mib.is_eap_ig(first[1]):
        rows = [first]
        for row in rows_in:
            rows.append(row)
            bar.update(1)
        imported = mib.load(path, rows, tokenizer, counterfactual, bos)
        _check_vocab(imported, vocab_size, path)
        return imported if metric is None else imported.with_metric(metric)
    if counterfactual is not None:
        raise TaskError(f"{path}: --counterfactual applies to MIB-format data only")
    metric = metric or Metric.LOGIT_DIFF
    clean, corrupted, answers, wrongs, lines = [], [], [], [], []
    labels, where_of = [], []
    continued = examples = 0
    answer_ids: dict[str, int] = {}
    for ln, row in itertools.chain([first], rows_in):
        bar.update(1)
        examples += 1
        where = f"{path}, line {ln}"
        check_row(row, where, wrong_required=metric is not Metric.LOGPROB)
        label = _labels(row.get(POSITIONS_FIELD), where)
        c = _prompt(tokenizer, row["clean"], where, bos)
        x = _prompt(tokenizer, row["corrupted"], where, bos)
        # logprob scores the answer alone: wrong answers are not read, so not tokenized either
        wrong = [] if metric is Metric.LOGPROB else \
            [_single_token(tokenizer, a, where, answer_ids) for a in _as_list(row.get("wrong") or [])]
        continuation = _continuation(tokenizer, row["answer"], metric)
        if continuation:
            # log p(whole continuation) = Σ_i log p(a_i | prompt, a_<i): one row per token, both
            # prompts extended by the same answer prefix. The mean over rows is the mean
            # continuation log-probability per example, times a constant.
            steps = [(c + continuation[:i], x + continuation[:i], [t]) for i, t in enumerate(continuation)]
            continued += 1
        else:
            steps = [(c, x, [_single_token(tokenizer, a, where, answer_ids) for a in _as_list(row["answer"])])]
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
    if limit:
        meta["limit"] = limit
    if continued:
        meta.update({"multi_token_answers": continued, "examples": examples})
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



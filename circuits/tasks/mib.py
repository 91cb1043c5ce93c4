"""Task data in the MIB circuit-track layout, and the EAP-IG CSV layout, read as Tasks.

MIB rows (JSON Lines, as the `mib-bench/*` datasets ship them) hold a clean `prompt` and
counterfactual objects `<name>_counterfactual` with their own `prompt`. Answers are read the
way the MIB circuit-track loader reads them, so circuits stay comparable with MIB's:

- IOI (`metadata.indirect_object`, `metadata.subject`): answer " " + indirect object, wrong
  " " + subject (first token of each); default counterfactual `s2_io_flip_counterfactual`.
- multiple choice (MCQA, ARC: `choices.label`, `answerKey`): answer = the clean label,
  wrong = the counterfactual's label, no leading space; default `symbol_counterfactual`.
- arithmetic (`operand1`, `label`): answer = str(label), wrong = the counterfactual's label,
  no leading space; default `random_counterfactual`.

EAP-IG CSV rows have `clean`, `corrupted` and token ids `correct_idx` (+ `incorrect_idx`) for
logit difference; greater-than rows (`label` or a lone `correct_idx`: the start year's last two
digits) score P(later year) − P(earlier year).

Dropped and counted in `task.meta["dropped"]`, not refused: rows without the counterfactual
(HF exports hold nulls), rows whose answer and wrong answer tokenize to different lengths or,
for arithmetic, to several tokens (MIB's loader drops these too), and rows whose clean and
counterfactual prompts tokenize to different lengths (patching needs aligned positions).
A missing field is refused, naming the line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from circuits.tasks.task import Metric, Task, TaskError, from_pairs, pad_id

DEFAULT_COUNTERFACTUAL = {"ioi": "s2_io_flip_counterfactual", "multiple-choice": "symbol_counterfactual",
                          "arithmetic": "random_counterfactual"}


def is_mib(row: dict) -> bool:
    return "prompt" in row and any(k.endswith("_counterfactual") for k in row)


def is_eap_ig(row: dict) -> bool:
    return "clean" in row and "corrupted" in row and ("correct_idx" in row or "label" in row)


def mib_kind(row: dict, where: str) -> str:
    if isinstance(row.get("metadata"), dict) and "indirect_object" in row["metadata"]:
        return "ioi"
    if isinstance(row.get("choices"), dict) and "answerKey" in row:
        return "multiple-choice"
    if "label" in row and ("operand1" in row or "operator" in row):
        return "arithmetic"
    raise TaskError(f"{where}: a MIB-style row (prompt + *_counterfactual) but not one of the known "
                    f"tasks (IOI: metadata.indirect_object; MCQA/ARC: choices + answerKey; "
                    f"arithmetic: operand1 + label)")


def _field(obj: Any, path: str, where: str) -> Any:
    """obj["a"]["b"] for path "a.b", or a TaskError naming the line and the field."""
    for key in path.split("."):
        if not isinstance(obj, dict) or obj.get(key) is None:
            raise TaskError(f"{where}: missing field {path!r}")
        obj = obj[key]
    return obj


def _text(obj: Any, path: str, where: str) -> str:
    value = _field(obj, path, where)
    if not isinstance(value, str):
        raise TaskError(f"{where}: field {path!r} should be text, got {value!r}")
    return value


def _mcq_label(obj: dict, where: str) -> str:
    labels, key = _field(obj, "choices.label", where), _field(obj, "answerKey", where)
    if not isinstance(labels, list) or isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < len(labels):
        raise TaskError(f"{where}: answerKey {key!r} does not index choices.label {labels!r}")
    return str(labels[key])


class _Dropped(dict):
    def add(self, reason: str) -> None:
        self[reason] = self.get(reason, 0) + 1


def from_mib_rows(rows: list[tuple[int, dict]], tokenizer, name: str, counterfactual: str | None = None,
                  bos: int | None = None, source: str | None = None) -> Task:
    """MIB circuit-track rows → a logit-difference Task (see module docstring); `source` (default:
    the name) names the file in error messages."""
    source = source or name
    if tokenizer is None:
        raise TaskError(f"{source}: MIB data is text; this model has no tokenizer")
    kind = mib_kind(rows[0][1], f"{source}, line {rows[0][0]}")
    cf_name = counterfactual or DEFAULT_COUNTERFACTUAL[kind]
    prefix = [bos] if bos is not None else []
    clean, corrupted, answers, wrongs, lines = [], [], [], [], []
    dropped = _Dropped()
    for ln, row in rows:
        where = f"{source}, line {ln}"
        if mib_kind(row, where) != kind:
            raise TaskError(f"{where}: a {mib_kind(row, where)} row in a file of {kind} rows")
        if cf_name not in row:
            options = sorted(k for k in row if k.endswith("_counterfactual"))
            raise TaskError(f"{where}: no counterfactual {cf_name!r}; this row has "
                            f"{', '.join(options) or 'none'}")
        if row[cf_name] is None:
            dropped.add(f"{cf_name} is null")
            continue
        cf = row[cf_name]
        if kind == "ioi":
            answer = " " + _text(row, "metadata.indirect_object", where)
            wrong = " " + _text(row, "metadata.subject", where)
        elif kind == "multiple-choice":
            answer, wrong = _mcq_label(row, where), _mcq_label(cf, f"{where} ({cf_name})")
        else:
            answer, wrong = str(_field(row, "label", where)), str(_field(cf, "label", f"{where} ({cf_name})"))
        a_ids, w_ids = tokenizer.encode(answer), tokenizer.encode(wrong)
        if not a_ids or len(a_ids) != len(w_ids):
            dropped.add("answer and wrong answer tokenize to different lengths")
            continue
        if kind == "arithmetic" and len(a_ids) > 1:
            dropped.add("arithmetic answer is several tokens")
            continue
        if a_ids[0] == w_ids[0]:
            dropped.add("answer and wrong answer are the same token")
            continue
        c = prefix + tokenizer.encode(_text(row, "prompt", where))
        x = prefix + tokenizer.encode(_text(cf, "prompt", f"{where} ({cf_name})"))
        if len(c) != len(x):
            dropped.add("clean/counterfactual token lengths differ")
            continue
        clean.append(c)
        corrupted.append(x)
        answers.append([a_ids[0]])
        wrongs.append([w_ids[0]])
        lines.append(ln)
    if not clean:
        raise TaskError(f"{source}: no usable rows (dropped: {dropped})")
    return from_pairs(name, clean, corrupted, answers, wrongs, Metric.LOGIT_DIFF,
                      pad_id=pad_id(tokenizer), lines=lines, source=source,
                      meta={"format": "mib", "mib_task": kind, "counterfactual": cf_name, "dropped": dict(dropped)})


def _token_id(value: Any, where: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise TaskError(f"{where}: expected a token id, got {value!r}") from None


def from_eap_ig_rows(rows: list[tuple[int, dict]], tokenizer, name: str, bos: int | None = None,
                     source: str | None = None) -> Task:
    """EAP-IG CSV rows → a Task: logit difference (correct_idx, incorrect_idx), or greater-than
    probability difference (a two-digit start year as `label` or a lone `correct_idx`); `source`
    (default: the name) names the file in error messages."""
    source = source or name
    if tokenizer is None:
        raise TaskError(f"{source}: EAP-IG data is text; this model has no tokenizer")
    prefix = [bos] if bos is not None else []
    years = None
    clean, corrupted, answers, wrongs, lines = [], [], [], [], []
    dropped = _Dropped()
    greater_than = "incorrect_idx" not in rows[0][1]
    for ln, row in rows:
        where = f"{source}, line {ln}"
        c = prefix + tokenizer.encode(_text(row, "clean", where))
        x = prefix + tokenizer.encode(_text(row, "corrupted", where))
        if len(c) != len(x):
            dropped.add("clean/corrupted token lengths differ")
            continue
        if greater_than:
            if years is None:
                years = [tokenizer.encode(f"{y:02d}") for y in range(100)]
            start = _token_id(_field(row, "label" if "label" in row else "correct_idx", where), where)
            if not 0 <= start <= 99:
                raise TaskError(f"{where}: greater-than label {start} is not a two-digit year (0..99)")
            answers.append([t[0] for y, t in enumerate(years) if y > start and len(t) == 1])
            wrongs.append([t[0] for y, t in enumerate(years) if y <= start and len(t) == 1])
        else:
            answers.append([_token_id(_field(row, "correct_idx", where), where)])
            wrongs.append([_token_id(_field(row, "incorrect_idx", where), where)])
        clean.append(c)
        corrupted.append(x)
        lines.append(ln)
    if not clean:
        raise TaskError(f"{source}: no usable rows (dropped: {dropped})")
    metric = Metric.PROB_DIFF if greater_than else Metric.LOGIT_DIFF
    return from_pairs(name, clean, corrupted, answers, wrongs, metric,
                      pad_id=pad_id(tokenizer), lines=lines, source=source,
                      meta={"format": "eap-ig-csv", "dropped": dict(dropped)})


def load(path: str | Path, rows: list[tuple[int, dict]], tokenizer, counterfactual: str | None = None,
         bos: int | None = None) -> Task | None:
    """A Task if the rows are in the MIB or EAP-IG layout, else None."""
    first = rows[0][1]
    name = Path(path).stem
    if is_mib(first):
        return from_mib_rows(rows, tokenizer, name, counterfactual, bos, source=str(path))
    if is_eap_ig(first):
        return from_eap_ig_rows(rows, tokenizer, name, bos, source=str(path))
    return None

"""Tasks: clean and corrupted prompts, answers, wrong answers, and the metric.

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
import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Sequence

import torch

FIELDS = ("clean", "corrupted", "answer", "wrong")


class TaskError(ValueError):
    """Bad task input; the message names the file line."""


class Metric(Enum):
    LOGIT_DIFF = "logit-diff"   # mean logit of answers − mean logit of wrong answers
    PROB_DIFF = "prob-diff"     # total probability of answers − of wrong answers
    LOGPROB = "logprob"         # log of the total probability of the answers
    KL = "kl"                   # KL(clean run ‖ this run) at the answer position
    MSE = "mse"                 # mean squared difference from the clean run's logits (numerical outputs)

    @property
    def is_divergence(self) -> bool:
        """Distance from the clean run (0 there), per example: it cannot cancel across examples."""
        return self in (Metric.KL, Metric.MSE)

    @property
    def higher_is_better(self) -> bool:
        """False for divergences, where ablating something important raises the metric."""
        return not self.is_divergence


@dataclass(frozen=True, eq=False)
class Task:
    """A batch of prompt pairs. Prompts are right-padded; `positions` is each row's last token.

    clean, corrupted: [B, P] long; answers, wrongs: [B, k] long, padded with -1.
    """

    name: str
    clean: torch.Tensor
    corrupted: torch.Tensor
    answers: torch.Tensor
    wrongs: torch.Tensor
    lengths: torch.Tensor
    metric: Metric = Metric.LOGIT_DIFF
    meta: dict = field(default_factory=dict)

    @property
    def positions(self) -> torch.Tensor:
        return self.lengths - 1

    @property
    def valid(self) -> torch.Tensor:
        """[B, P] bool: real tokens (not padding)."""
        return torch.arange(self.clean.shape[1])[None] < self.lengths[:, None]

    def __len__(self) -> int:
        return self.clean.shape[0]

    def subset(self, rows) -> "Task":
        rows = torch.as_tensor(rows, dtype=torch.long)
        P = int(self.lengths[rows].max())
        return Task(self.name, self.clean[rows, :P], self.corrupted[rows, :P], self.answers[rows],
                    self.wrongs[rows], self.lengths[rows], self.metric, dict(self.meta))

    def with_metric(self, metric: Metric) -> "Task":
        return Task(self.name, self.clean, self.corrupted, self.answers, self.wrongs, self.lengths,
                    metric, dict(self.meta))


def _gather_mean(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean of values[b, ids[b, j]] over the non-negative ids of each row."""
    keep = ids >= 0
    picked = values.gather(-1, ids.clamp(min=0).expand(*values.shape[:-1], ids.shape[-1]))
    return (picked * keep).sum(-1) / keep.sum(-1)


def metric_values(metric: Metric, logits: torch.Tensor, task: Task,
                  clean_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example metric. logits: [V·B, vocab] at the answer positions; returns [V·B] float32."""
    logits = logits.float()
    reps = logits.shape[0] // len(task)
    answers, wrongs = task.answers.repeat(reps, 1).to(logits.device), task.wrongs.repeat(reps, 1).to(logits.device)
    if metric is Metric.LOGIT_DIFF:
        return _gather_mean(logits, answers) - _gather_mean(logits, wrongs)
    logp = logits.log_softmax(-1)
    if metric is Metric.PROB_DIFF:
        p = logp.exp()
        keep_a, keep_w = answers >= 0, wrongs >= 0
        pa = (p.gather(-1, answers.clamp(min=0)) * keep_a).sum(-1)
        pw = (p.gather(-1, wrongs.clamp(min=0)) * keep_w).sum(-1)
        return pa - pw
    if metric is Metric.LOGPROB:
        picked = logp.gather(-1, answers.clamp(min=0)).masked_fill(answers < 0, -math.inf)
        return picked.logsumexp(-1)
    if clean_logits is None:
        raise ValueError(f"the {metric.value} metric needs the clean run's logits")
    if metric is Metric.MSE:
        return (logits - clean_logits.float().repeat(reps, 1).to(logits.device)).pow(2).mean(-1)
    ref = clean_logits.float().log_softmax(-1).repeat(reps, 1).to(logits.device)
    return (ref.exp() * (ref - logp)).sum(-1)


def pad_id(tokenizer) -> int:
    """The id right-padding uses: the tokenizer's pad token, else its EOS, else 0. Models that
    attend to every position mask their pad token (`Arch.pad_token_id`), so it must be that one."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return value
    return 0


# ---- building tasks --------------------------------------------------------------------------

def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def from_pairs(name: str, clean: Sequence[Sequence[int]], corrupted: Sequence[Sequence[int]],
               answers: Sequence[Sequence[int]], wrongs: Sequence[Sequence[int]],
               metric: Metric = Metric.LOGIT_DIFF, pad_id: int = 0, lines: Sequence[int] | None = None,
               meta: dict | None = None, source: str | None = None) -> Task:
    """A task from token-id lists, validated; `lines` numbers rows and `source` (default: the
    name; the file for a task file) names the input in error messages."""
    source = source or name
    if not clean:
        raise TaskError(f"{source}: no examples")
    lines = list(lines) if lines is not None else list(range(1, len(clean) + 1))
    for c, x, ln in zip(clean, corrupted, lines):
        if len(c) != len(x):
            raise TaskError(f"{source}, line {ln}: clean has {len(c)} tokens but corrupted has {len(x)}; "
                            f"patching needs token-aligned pairs")
        if not c:
            raise TaskError(f"{source}, line {ln}: empty prompt")
    if all(list(c) == list(x) for c, x in zip(clean, corrupted)):
        raise TaskError(f"{source}: clean and corrupted prompts are identical on every line; "
                        f"a corrupted prompt must differ for patching to measure anything")
    P = max(len(c) for c in clean)
    pad = lambda rows: torch.tensor([list(r) + [pad_id] * (P - len(r)) for r in rows], dtype=torch.long)
    k_a, k_w = max(len(a) for a in answers), max(len(w) for w in wrongs)
    pad_ids = lambda rows, k: torch.tensor([list(r) + [-1] * (k - len(r)) for r in rows], dtype=torch.long)
    return Task(name, pad(clean), pad(corrupted), pad_ids(answers, k_a), pad_ids(wrongs, k_w),
                torch.tensor([len(c) for c in clean], dtype=torch.long), metric, dict(meta or {}))


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
    (see `circuits.mib_data`; `counterfactual` picks a MIB counterfactual column)."""
    from circuits import mib_data
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: no such task file")
    rows = _read_rows(path)
    bos = getattr(tokenizer, "bos_token_id", None) if prepend_bos and tokenizer is not None else None
    imported = mib_data.load(path, rows, tokenizer, counterfactual, bos)
    if imported is not None:
        _check_vocab(imported, vocab_size, path)
        return imported if metric is None else imported.with_metric(metric)
    if counterfactual is not None:
        raise TaskError(f"{path}: --counterfactual applies to MIB-format data only")
    metric = metric or Metric.LOGIT_DIFF
    required = [f for f in FIELDS if not (f == "wrong" and metric is Metric.LOGPROB)]
    clean, corrupted, answers, wrongs, lines = [], [], [], [], []
    continued = 0
    for ln, row in rows:
        where = f"{path}, line {ln}"
        unknown = sorted(set(row) - set(FIELDS))
        if unknown:
            raise TaskError(f"{where}: unknown field(s) {', '.join(unknown)}; "
                            f"a task row has {', '.join(FIELDS)}")
        missing = [f for f in required if f not in row or row[f] in ("", None, [])]
        if missing:
            raise TaskError(f"{where}: missing field(s) {', '.join(missing)}")
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
            corrupted.append(x_i)
            answers.append(a_i)
            wrongs.append(wrong)
            lines.append(ln)
    pad = pad_id(tokenizer)
    meta = {"source": str(path)}
    if continued:
        meta.update({"multi_token_answers": continued, "examples": len(rows)})
    return from_pairs(path.stem, clean, corrupted, answers, wrongs, metric, pad_id=pad, lines=lines,
                      meta=meta, source=str(path))


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


def check_metric(values: torch.Tensor, task: Task, what: str) -> None:
    """Refuse NaN metrics, naming the rows."""
    bad = torch.nonzero(~torch.isfinite(values[: len(task)])).flatten().tolist()
    if bad:
        raise TaskError(f"{task.name}: the {task.metric.value} metric is not finite on the {what} run "
                        f"for row(s) {', '.join(str(b + 1) for b in bad[:10])}")

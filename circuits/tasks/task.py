"""The Task record: clean and corrupted prompts, answers, wrong answers, and the metric.

Tasks are built from token ids (`from_pairs`), from files (`circuits.tasks.files`) or by the
built-in generators (`circuits.tasks.builtin`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Sequence

import torch

from circuits.errors import CircuitsError

FIELDS = ("clean", "corrupted", "answer", "wrong")


class TaskError(CircuitsError, ValueError):
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
    # optional position labels (see `circuits.positions`): names in token order, and each row's
    # token index of each label, [B, K] long
    position_names: tuple[str, ...] = ()
    position_index: torch.Tensor | None = None

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
        index = None if self.position_index is None else self.position_index[rows]
        return Task(self.name, self.clean[rows, :P], self.corrupted[rows, :P], self.answers[rows],
                    self.wrongs[rows], self.lengths[rows], self.metric, dict(self.meta),
                    self.position_names, index)

    def with_metric(self, metric: Metric) -> "Task":
        return Task(self.name, self.clean, self.corrupted, self.answers, self.wrongs, self.lengths,
                    metric, dict(self.meta), self.position_names, self.position_index)


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

def from_pairs(name: str, clean: Sequence[Sequence[int]], corrupted: Sequence[Sequence[int]],
               answers: Sequence[Sequence[int]], wrongs: Sequence[Sequence[int]],
               metric: Metric = Metric.LOGIT_DIFF, pad_id: int = 0, lines: Sequence[int] | None = None,
               meta: dict | None = None, source: str | None = None,
               position_names: tuple[str, ...] = (), position_index: torch.Tensor | None = None) -> Task:
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
                torch.tensor([len(c) for c in clean], dtype=torch.long), metric, dict(meta or {}),
                tuple(position_names), position_index if position_names else None)


def check_metric(values: torch.Tensor, task: Task, what: str) -> None:
    """Refuse NaN metrics, naming the rows."""
    bad = torch.nonzero(~torch.isfinite(values[: len(task)])).flatten().tolist()
    if bad:
        raise TaskError(f"{task.name}: the {task.metric.value} metric is not finite on the {what} run "
                        f"for row(s) {', '.join(str(b + 1) for b in bad[:10])}")


def split(task: Task, test_fraction: float, seed: int = 0) -> tuple[Task, Task]:
    """(discovery, test): a seeded random partition of the examples; round(n · test_fraction)
    go to the test set. Methods see only the discovery set; circuits are judged on the test set."""
    n = len(task)
    if task.meta.get("examples", n) != n:
        raise TaskError(f"task {task.name} has several answer-token rows per example; a held-out split "
                        f"of multi-token answers is not supported")
    from circuits.tasks.splits import split_sizes
    n_test = split_sizes(n, test_fraction)[1]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    test_rows, discovery_rows = order[:n_test].sort().values, order[n_test:].sort().values
    discovery, test = task.subset(discovery_rows), task.subset(test_rows)
    for part, rows in (("discovery", discovery_rows), ("test", test_rows)):
        (discovery if part == "discovery" else test).meta.update(
            {"split": part, "split_seed": seed, "test_fraction": test_fraction, "examples": len(rows)})
    return discovery, test


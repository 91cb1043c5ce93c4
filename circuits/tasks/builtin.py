"""The built-in tasks: one frozen record each, listable without torch.

A record names its generator in `circuits.tasks.generators` rather than holding it, so the
command line can check a task name before anything heavy is imported.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from circuits.tasks.task import Task


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    generator: str              # function name in circuits.tasks.generators: (model, n, seed) -> Task
    example: dict | None = None
    any_model: bool = True      # False: only for the models it names (builds refuse others)

    def build(self, model, n: int = 64, seed: int = 0) -> Task:
        generators = importlib.import_module("circuits.tasks.generators")
        return getattr(generators, self.generator)(model, n=n, seed=seed)


TASKS: dict[str, TaskSpec] = {
    "induction": TaskSpec("induction", "repeated random tokens; predict the next repeated token", "induction",
                          {"clean": "<bos> 7 31 12 ... 7 31", "corrupted": "<bos> 44 9 25 ... 7 31",
                           "answer": "12", "wrong": "25"}),
    "ioi": TaskSpec("ioi", "indirect object identification (ABBA/BABA, ABC corruption)", "ioi",
                    {"clean": "When Mary and John went to the store, John gave a drink to",
                     "corrupted": "When Anna and Tom went to the store, Paul gave a drink to",
                     "answer": " Mary", "wrong": " John"}),
    "greater-than": TaskSpec("greater-than", "years: P(year > start) − P(year ≤ start)", "greater_than",
                             {"clean": "The war lasted from the year 1732 to the year 17",
                              "corrupted": "The war lasted from the year 1701 to the year 17",
                              "answer": "33..99", "wrong": "00..32"}),
    "sva": TaskSpec("sva", "subject-verb agreement across an attractor noun", "subject_verb",
                    {"clean": "The author near the table", "corrupted": "The authors near the table",
                     "answer": " is", "wrong": " are"}),
    "capital-country": TaskSpec("capital-country", "capital of a country", "capital_country",
                                {"clean": "The capital of France is", "corrupted": "The capital of Spain is",
                                 "answer": " Paris", "wrong": " Madrid"}),
    "pronoun": TaskSpec("pronoun", "gendered pronoun after a name", "gendered_pronoun",
                        {"clean": "Mary went to the park because", "corrupted": "John went to the park because",
                         "answer": " she", "wrong": " he"}),
    "tracr": TaskSpec("tracr", "a tracr-compiled model's own program (tracr-reverse/-proportion/-sort only)",
                      "tracr_task", {"clean": "c a b b a", "corrupted": "b b c a c", "answer": "c", "wrong": "a"},
                      any_model=False),
}


def example_pair(name: str) -> dict | None:
    return TASKS[name].example


def is_builtin(name: str) -> bool:
    return name in TASKS


def build_task(name: str, model, n: int = 64, seed: int = 0) -> Task:
    """The built-in task `name` for `model` (its tokenizer and vocabulary), n examples."""
    if name not in TASKS:
        from circuits.tasks.task import TaskError
        raise TaskError(f"unknown built-in task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name].build(model, n=n, seed=seed)



"""The registry of scoring methods: one frozen record per method, importable without torch.

A record names the function that scores (`entry`, "module:function") instead of holding it, so
the command line can list and check methods before anything heavy is imported; `score` imports
it on first use. Every scoring function follows `circuits.methods.base.ScoreFn`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    entry: str                      # "module:function" of the ScoreFn
    defaults: dict = field(default_factory=dict)
    exact: bool = False

    def score(self, setup, progress: bool = False, **params):
        """[S, R] float32 importances (higher = more important) for the setup's task."""
        module, function = self.entry.split(":")
        return getattr(importlib.import_module(module), function)(setup, progress=progress, **params)


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


_SCORING = "circuits.methods.scoring"
register(Method("eap", "attribution patching: 2 forwards and 1 backward score every edge", f"{_SCORING}:eap"))
register(Method("eap-ig-inputs", "EAP with integrated gradients along interpolated input embeddings",
                f"{_SCORING}:eap_ig_inputs", {"steps": 5}))
register(Method("eap-ig-activations", "EAP with integrated gradients along interpolated sender outputs "
                "(every receiver input moves on a straight line)", f"{_SCORING}:eap_ig_activations", {"steps": 5}))
register(Method("clean-corrupted", "gradients averaged over the clean and the corrupted input",
                f"{_SCORING}:clean_corrupted"))
register(Method("exact", "the true patching effect of each edge alone (one batched forward per group)",
                f"{_SCORING}:exact", {"variants": 16}, exact=True))

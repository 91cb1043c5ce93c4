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
register(Method("eap", "attribution patching: 2 forwards and 1 backward score every edge "
                "(direction noising: gradient at the clean run; denoising: at the ablated run)",
                f"{_SCORING}:eap", {"direction": "noising"}))
register(Method("eap-gim", "EAP with GIM's backward: norm statistics frozen, attention softmax "
                "backward at temperature 2, q/k/v gradients scaled 1/4, 1/4, 1/2",
                f"{_SCORING}:eap_gim", {"direction": "noising", "freeze_norm": True, "softmax_temperature": 2.0,
                                        "q_scale": 0.25, "k_scale": 0.25, "v_scale": 0.5}))
register(Method("eap-ig-inputs", "EAP with integrated gradients along interpolated input embeddings",
                f"{_SCORING}:eap_ig_inputs", {"steps": 5}))
register(Method("eap-ig-activations", "EAP with integrated gradients along interpolated sender outputs "
                "(every receiver input moves on a straight line)", f"{_SCORING}:eap_ig_activations", {"steps": 5}))
register(Method("clean-corrupted", "gradients averaged over the clean and the corrupted input",
                f"{_SCORING}:clean_corrupted"))
register(Method("exact", "the true patching effect of each edge alone (one batched forward per group)",
                f"{_SCORING}:exact", {"variants": 16}, exact=True))
register(Method("edge-pruning", "learned hard-concrete edge masks, trained through the patching "
                "coefficients toward a target sparsity (warm start: eap-gim)",
                "circuits.methods.edge_pruning:edge_pruning",
                {"target_sparsity": 0.99, "steps": 60, "lr": 0.1, "l0_weight": 100.0, "objective": "metric",
                 "schedule": "mib", "warm_start": "eap-gim", "estimator": "pathwise", "samples": 8, "seed": 0}))
register(Method("ensemble", "several methods' scores combined (average of |score| ranks by default; "
                "signed rank or normalised-score average)",
                "circuits.methods.ensemble:ensemble",
                {"members": "eap-ig-inputs,eap-gim,edge-pruning", "combine": "magnitude"}))


# ---- method specs on the command line: "name" or "name:key=value:key=value" (torch-free) ----

CHOICES = {"direction": ("noising", "denoising"), "combine": ("rank", "score", "magnitude"), "objective": ("kl", "metric"),
           "schedule": ("mib", "single"), "estimator": ("pathwise", "score", "both")}


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def check_params(name: str, params: dict) -> dict:
    """Refuse parameters a method does not take and values out of range, in one line each."""
    spec = get(name)
    for key, value in params.items():
        if key not in spec.defaults:
            accepted = ", ".join(sorted(spec.defaults)) or "none"
            raise ValueError(f"method {name} has no parameter {key!r} (its parameters: {accepted})")
        if key in CHOICES and value not in CHOICES[key]:
            raise ValueError(f"{name}: {key} must be one of {', '.join(CHOICES[key])}, got {value!r}")
        if key == "target_sparsity" and not (isinstance(value, (int, float)) and 0 < value < 1):
            raise ValueError(f"{name}: target sparsity is the fraction of edges removed and must be in "
                             f"(0, 1), got {value!r}")
        if key in ("steps", "variants") and not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name}: {key} must be a whole number of at least 1, got {value!r}")
        if key == "samples" and not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name}: samples (antithetic mask pairs a step) must be a whole number of at "
                             f"least 1, got {value!r}")
        if key == "members":
            members = [m.strip() for m in str(value).split(",") if m.strip()]
            if not members:
                raise ValueError(f"{name}: members must name at least one method")
            for m in members:
                get(m)
                if m == name:
                    raise ValueError(f"{name} cannot be a member of itself")
        if key == "warm_start" and value not in (None, "none", ""):
            get(value)
            if value == name:
                raise ValueError(f"{name} cannot warm-start from itself")
    return params


def parse_spec(text: str) -> tuple[str, dict]:
    """'eap:direction=denoising' → ('eap', {'direction': 'denoising'}), checked."""
    name, *parts = text.strip().split(":")
    get(name)
    params = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"{text!r}: method parameters are written name:key=value, got {part!r}")
        key = key.strip().replace("-", "_")
        # ensemble members are comma-separated inside a comma-separated list: write them a+b+c
        params[key] = value.replace("+", ",") if key == "members" else _value(value.strip())
    return name, check_params(name, params)


def parse_list(text: str) -> list[tuple[str, dict]]:
    """'eap,eap-ig-inputs,edge-pruning:steps=20' → [(name, params), ...], checked, in order."""
    specs = [parse_spec(t) for t in text.split(",") if t.strip()]
    if not specs:
        raise ValueError("the method list is empty: name at least one method")
    return specs

"""The built-in scoring methods (their records are in `registry`)."""

from __future__ import annotations

import torch

from circuits.evaluation import Setup
from circuits.methods.attribution import Attribution, attribute, gradient_scores
from circuits.methods.base import importance_sign
from circuits.methods.exact import exact_effects


def _midpoints(steps: int) -> list[float]:
    if steps < 1:
        raise ValueError("steps must be at least 1")
    return [(k + 0.5) / steps for k in range(steps)]


def eap(setup: Setup, progress: bool = False) -> torch.Tensor:
    metric = setup.task.metric
    if metric.is_divergence:
        # A divergence from the clean run is at its minimum there: its gradient is exactly zero,
        # so every score would be rounding noise.
        raise ValueError(
            f"eap takes the gradient at the clean run, where the {metric.value} metric (a divergence "
            f"from the clean run) has zero gradient: every edge would score 0. Use eap-ig-inputs, "
            f"eap-ig-activations or clean-corrupted, or a task metric (--metric logit-diff, ...)")
    return importance_sign(setup) * gradient_scores(setup, [1.0], "inputs", progress)


def eap_ig_inputs(setup: Setup, steps: int = 5, progress: bool = False) -> torch.Tensor:
    return importance_sign(setup) * gradient_scores(setup, _midpoints(steps), "inputs", progress)


def eap_ig_activations(setup: Setup, steps: int = 5, progress: bool = False) -> torch.Tensor:
    return importance_sign(setup) * gradient_scores(setup, _midpoints(steps), "activations", progress)


def clean_corrupted(setup: Setup, progress: bool = False) -> torch.Tensor:
    return importance_sign(setup) * gradient_scores(setup, [0.0, 1.0], "inputs", progress)


def exact(setup: Setup, variants: int = 16, progress: bool = False) -> torch.Tensor:
    return importance_sign(setup) * exact_effects(setup, variants=variants, progress=progress)


def _gradient_plan(method: str, steps: int) -> tuple[list[float], str]:
    """(alphas, mode) of each gradient method, as the functions above call `gradient_scores`."""
    plans = {"eap": ([1.0], "inputs"), "eap-ig-inputs": (_midpoints(steps), "inputs"),
             "eap-ig-activations": (_midpoints(steps), "activations"),
             "clean-corrupted": ([0.0, 1.0], "inputs")}
    if method not in plans:
        raise ValueError(f"neuron scores come from attribution: use one of {', '.join(plans)}, not {method}")
    return plans[method]


def neuron_attribution(setup: Setup, method: str = "eap-ig-activations", steps: int = 5,
                       progress: bool = False) -> Attribution:
    """Edge and neuron importances ([S, R] or [P, S, R], and [S, d]) from one gradient method's
    backward passes: a neuron's score estimates ablating that output dimension of its sender."""
    if method == "eap" and setup.task.metric.is_divergence:
        eap(setup)                                               # raises with eap's reason
    alphas, mode = _gradient_plan(method, steps)
    found = attribute(setup, alphas, mode, progress, neurons=True)
    sign = importance_sign(setup)
    return Attribution(sign * found.edges, sign * found.neurons)

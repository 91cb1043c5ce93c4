"""The built-in scoring methods (their records are in `registry`)."""

from __future__ import annotations

import torch

from circuits.evaluation import Setup
from circuits.methods.attribution import gradient_scores
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

"""The built-in scoring methods (their records are in `registry`)."""

from __future__ import annotations

import torch

from circuits.evaluation import Setup
from circuits.methods.attribution import Attribution, attribute, gradient_scores
from circuits.methods.base import importance_sign
from circuits.methods.exact import exact_effects
from circuits.model.components import GradientMods


def _midpoints(steps: int) -> list[float]:
    if steps < 1:
        raise ValueError("steps must be at least 1")
    return [(k + 0.5) / steps for k in range(steps)]


DIRECTIONS = ("noising", "denoising")


def _one_point_gradient(setup: Setup, direction: str, progress: bool, mods: GradientMods | None,
                        name: str) -> torch.Tensor:
    """Attribution with the gradient at one end: the clean run (noising: what ablating the edge
    costs) or the run with every sender ablated (denoising: what restoring it brings back; for
    resample ablation the corrupted run, as TransformerLens's attribution_patch). Both estimate
    the same importance, m(clean) − m(edge ablated), to first order."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be noising or denoising, got {direction!r}")
    metric = setup.task.metric
    if direction == "noising":
        if metric.is_divergence:
            # A divergence from the clean run is at its minimum there: its gradient is exactly
            # zero, so every score would be rounding noise.
            raise ValueError(
                f"{name} takes the gradient at the clean run, where the {metric.value} metric (a divergence "
                f"from the clean run) has zero gradient: every edge would score 0. Use --direction denoising, "
                f"eap-ig-inputs, eap-ig-activations or clean-corrupted, or a task metric (--metric logit-diff, ...)")
        return importance_sign(setup) * gradient_scores(setup, [1.0], "inputs", progress, mods)
    return importance_sign(setup) * gradient_scores(setup, [0.0], "activations", progress, mods)


def eap(setup: Setup, direction: str = "noising", progress: bool = False) -> torch.Tensor:
    return _one_point_gradient(setup, direction, progress, None, "eap")


def eap_gim(setup: Setup, direction: str = "noising", freeze_norm: bool = True,
            softmax_temperature: float = 2.0, q_scale: float = 0.25, k_scale: float = 0.25,
            v_scale: float = 0.5, progress: bool = False) -> torch.Tensor:
    """EAP with GIM's backward (defaults: GIM's own). Every switch off is `eap` exactly."""
    if not softmax_temperature > 0:
        raise ValueError(f"softmax_temperature must be positive, got {softmax_temperature}")
    mods = GradientMods(bool(freeze_norm), float(softmax_temperature), float(q_scale), float(k_scale),
                        float(v_scale))
    return _one_point_gradient(setup, direction, progress, mods, "eap-gim")


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

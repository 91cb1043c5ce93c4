"""Scoring methods under one protocol (`base.Method`); importing this package registers them."""

from circuits.methods import scoring  # noqa: F401  (registers the built-in methods)
from circuits.methods.base import REGISTRY, Method, get, importance_sign, node_scores

__all__ = ["REGISTRY", "Method", "get", "importance_sign", "node_scores"]

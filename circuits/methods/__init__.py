"""Scoring methods under one protocol (`base.ScoreFn`), listed in a torch-free registry."""

from circuits.methods.registry import REGISTRY, Method, get, register

__all__ = ["REGISTRY", "Method", "get", "register"]

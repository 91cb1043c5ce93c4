"""Sizes of a discovery/test split, checked without torch (the command line asks before loading)."""

from __future__ import annotations

from circuits.errors import CircuitsError


class SplitError(CircuitsError, ValueError):
    """A held-out split that leaves too few examples on one side."""


def check_fraction(test_fraction: float) -> float:
    if not 0 < test_fraction < 1:
        raise SplitError(f"the test fraction must be in (0, 1), got {test_fraction:g}")
    return test_fraction


def check_split(n: int | None, test_fraction: float) -> None:
    """Before loading: the fraction, and the sizes when the number of examples is known (None:
    a task file, checked once read)."""
    check_fraction(test_fraction)
    if n is not None:
        split_sizes(n, test_fraction)


def split_sizes(n: int, test_fraction: float) -> tuple[int, int]:
    """(discovery, test) sizes of a split of n examples: round(n · test_fraction) are tested.
    Refused when the test set would have fewer than 2 examples or discovery none."""
    check_fraction(test_fraction)
    n_test = round(n * test_fraction)
    if n_test < 2:
        raise SplitError(f"a test fraction of {test_fraction:g} of {n} examples leaves {n_test} test "
                         f"example{'s' if n_test != 1 else ''}; at least 2 are needed (more examples or a "
                         f"larger --test-fraction)")
    if n - n_test < 1:
        raise SplitError(f"a test fraction of {test_fraction:g} of {n} examples leaves no discovery examples")
    return n - n_test, n_test

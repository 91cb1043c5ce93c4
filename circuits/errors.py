"""The root of the engine's own exceptions (importable without torch).

Each is bad input or an unusable environment, stated in one line that names what to fix: the
command line prints it without a stack trace and exits 2.
"""


class CircuitsError(Exception):
    """Base of every error the engine raises on purpose."""

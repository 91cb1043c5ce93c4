"""Exceptions that mean bad input from the user; the CLI prints them without a stack trace."""

from circuits.adapters import UnsupportedModel
from circuits.circuit import CircuitFileError
from circuits.models import ModelLoadError
from circuits.render import RenderError
from circuits.tasks import TaskError

USER_ERRORS = (UnsupportedModel, CircuitFileError, ModelLoadError, TaskError, RenderError,
               FileNotFoundError, ValueError)

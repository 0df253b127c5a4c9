"""The bundle's user errors, and how a run reports them.

A :class:`BundleError` is a problem with what the user gave (data, checkpoints, caches, arguments, output
folders) whose message names it and ends with what to do. The bundle's error classes inherit it beside their
usual base (``DatasetError(BundleError, ValueError)``), so code that catches ``ValueError`` still does.

Under ``python -m monai.bundle run`` MONAI wraps every error of a config expression in ``RuntimeError: Failed to
evaluate ConfigExpression`` after some sixty lines of traceback. :func:`install_user_error_hook` (the configs'
second ``initialize`` step, after the process settings) replaces Python's report of an uncaught error whose
cause chain holds a ``BundleError`` by that error's message alone, the fix as its last lines; the exit code
stays 1. With
``SURGICAL_SAM_DEBUG=1`` in the environment the full traceback is printed as before.
"""

from __future__ import annotations

import os
import sys
from types import TracebackType

__all__ = [
    "DEBUG_ENVIRONMENT",
    "BundleError",
    "MissingInputError",
    "WorkflowMovedError",
    "format_user_error",
    "install_user_error_hook",
    "user_error_in",
    "workflow_moved",
]

#: Set to 1 to see the full traceback of a user error.
DEBUG_ENVIRONMENT = "SURGICAL_SAM_DEBUG"


class BundleError(Exception):
    """A problem with the user's input or folders; the message says what it is and how to fix it."""


class MissingInputError(BundleError, FileNotFoundError):
    """Inputs a run needs are missing (the dataset, SAM weights, the embedding cache, a model): each is named with
    the command that makes it."""


class WorkflowMovedError(BundleError, ValueError):
    """A run id of an earlier version whose workflow is now an overlay config of its own."""


def workflow_moved(run_id: str, overlay: str) -> None:
    """Stop a run of ``run_id`` (a config's stub of an earlier version's run id), naming the ``overlay`` that holds it."""
    raise WorkflowMovedError(
        f"`run {run_id}` is no longer part of inference.yaml: its workflow is the overlay configs/{overlay}. "
        f"Merge it after inference.yaml and run it, e.g.\n  python -m monai.bundle run --config_file "
        f"\"['configs/inference.yaml','configs/{overlay}']\" (the demo model: add configs/demo_inference.yaml last)."
    )


def user_error_in(error: BaseException | None) -> BundleError | None:
    """The first :class:`BundleError` of ``error`` and its causes (``raise ... from``, or raised while handling)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, BundleError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def format_user_error(error: BundleError) -> str:
    """The report of a user error: one line saying what stopped, then the message (its fix last)."""
    return (
        f"The run stopped: {type(error).__name__} (for the full traceback run again with "
        f"{DEBUG_ENVIRONMENT}=1).\n{error}"
    )


def _report(previous, kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
    found = None if os.environ.get(DEBUG_ENVIRONMENT, "").strip() not in ("", "0") else user_error_in(error)
    if found is None:
        previous(kind, error, traceback)
        return
    sys.stderr.write("\n" + format_user_error(found) + "\n")
    sys.stderr.flush()


def install_user_error_hook() -> None:
    """Report an uncaught error caused by a :class:`BundleError` as its message only (see the module's docstring).

    Idempotent; other errors keep Python's report (or the hook installed before this one).
    """
    if getattr(sys.excepthook, "bundle_user_error_hook", False):
        return
    previous = sys.excepthook

    def hook(kind, error, traceback):
        _report(previous, kind, error, traceback)

    hook.bundle_user_error_hook = True  # type: ignore[attr-defined]
    sys.excepthook = hook

"""What every command of ``surgical-sam`` shares: :func:`command`, the one place where a command's user errors become
a one-paragraph message and exit code 1, and the parsers of its arguments (each error names the option)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["PROG", "command", "existing_dir", "fail", "int_pair", "name_list", "positive_int"]

#: The command's name in its messages.
PROG = "surgical-sam"


def fail(message: str) -> SystemExit:
    """A user error: fire lets ``SystemExit`` through, Python prints the message and exits with 1."""
    return SystemExit(f"{PROG}: error: {message}")


def command(*user_errors: type[Exception]):
    """Make a function a command: the one place where the errors of a command that are the user's end it with a
    one-paragraph message and exit code 1 (``SystemExit``).

    Those are a ``BundleError`` (the bundle's own errors, whose messages name the input and the fix), also one
    MONAI wrapped while evaluating a config, and ``user_errors``: the built-in errors through which the command's
    libraries report bad input (a missing file, a bad value). With ``SURGICAL_SAM_DEBUG=1`` they keep their
    traceback.
    """
    from ..errors import DEBUG_ENVIRONMENT, user_error_in

    def wrap(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def run(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except Exception as error:
                found = user_error_in(error) or (error if isinstance(error, user_errors) else None)
                if found is None or os.environ.get(DEBUG_ENVIRONMENT, "").strip() not in ("", "0"):
                    raise
                raise fail(str(found)) from None

        return run

    return wrap


def int_pair(value: Any, name: str) -> tuple[int, int]:
    """``128,160`` / ``"128,160"`` / ``"128x160"`` / ``[128, 160]`` / ``128`` -> (128, 160) / (128, 128)."""
    if isinstance(value, str):
        parts = [p for p in value.replace("x", ",").replace("X", ",").replace(" ", ",").split(",") if p]
    elif isinstance(value, (int, float)):
        parts = [value, value]
    else:
        parts = list(value)
    try:
        pair = tuple(int(p) for p in parts)
        if len(pair) != 2 or any(float(p) != int(float(p)) for p in parts):
            raise ValueError
    except (TypeError, ValueError):
        raise fail(f"--{name} must be two integers H,W (e.g. 128,160), got {value!r}.") from None
    if min(pair) < 1:
        raise fail(f"--{name} must be positive, got {value!r}.")
    return pair  # type: ignore[return-value]


def positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise fail(f"--{name} must be an integer, got {value!r}.")
    try:
        number = int(value)
        if float(value) != number:
            raise ValueError
    except (TypeError, ValueError):
        raise fail(f"--{name} must be an integer, got {value!r}.") from None
    if number < minimum:
        raise fail(f"--{name} must be at least {minimum}, got {number}.")
    return number


def name_list(value: Any) -> list[str]:
    """``--class_names a,b,c`` arrives as a tuple from fire, or as one string when a name has spaces."""
    if isinstance(value, str):
        names = [n.strip() for n in value.split(",")]
    elif isinstance(value, (list, tuple)):
        names = [str(n).strip() for n in value]
    else:
        names = [str(value).strip()]
    if not names or any(not n for n in names):
        raise fail(f"--class_names must be a comma-separated list of non-empty names, got {value!r}.")
    return names


def existing_dir(path: Any, name: str) -> Path:
    if path is None or path == "":
        raise fail(f"--{name} is required.")
    folder = Path(str(path)).expanduser()
    if not folder.is_dir():
        what = "a file, not a folder" if folder.exists() else "not found"
        raise fail(f"--{name} {folder}: {what}.")
    return folder

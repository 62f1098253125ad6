"""What the adapters' start-up checks share: whether a method a reach wraps still has the
shape it was written for, and which release of a server runs us."""

from __future__ import annotations

import inspect
from importlib import metadata
from typing import Any


def is_method(function: Any, parameters: list[str]) -> bool:
    """Whether ``function`` is a coroutine function taking exactly these parameters."""
    return (
        function is not None
        and inspect.iscoroutinefunction(function)
        and list(inspect.signature(function).parameters) == parameters
    )


def release(package: str) -> str:
    """The installed version of ``package``, for the start-up log and warnings."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "(unknown version)"

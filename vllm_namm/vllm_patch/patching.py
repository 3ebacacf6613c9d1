"""``patch(owner, name)``: the one way this package replaces a vLLM method.

Every patch point follows the same steps (keep the original, wrap it, put the wrapper in its
place, never twice: vLLM may load plugins several times per process), so they live here once.
The wrapper receives the original as its first argument::

    @patch(GPUModelRunner, "execute_model")
    def execute_model(original, self, scheduler_output, *args, **kwargs):
        ...
        return original(self, scheduler_output, *args, **kwargs)

Plain methods, ``staticmethod``, ``classmethod`` and ``property`` (its getter) keep their kind;
an instance (not a class) gets the wrapper as an instance attribute over its bound method.
The vLLM version is checked before any patch, in :func:`vllm_namm.vllm_patch.install`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

_PATCHED = "_namm_patched"


def is_patched(owner: Any, name: str) -> bool:
    """Whether ``owner.name`` is already one of our wrappers."""
    return getattr(_function(inspect.getattr_static(owner, name)), _PATCHED, False)


def _function(raw: Any) -> Any:
    if isinstance(raw, (staticmethod, classmethod)):
        return raw.__func__
    if isinstance(raw, property):
        return raw.fget
    return raw


def patch(owner: Any, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator replacing ``owner.name`` by the decorated wrapper, once (later calls do nothing)."""

    def decorate(wrapper: Callable[..., Any]) -> Callable[..., Any]:
        if not isinstance(owner, type):
            if getattr(vars(owner).get(name), _PATCHED, False):  # this instance's own wrapper
                return wrapper
            setattr(owner, name, _replacement(wrapper, getattr(owner, name)))  # over the bound method
            return wrapper
        raw = inspect.getattr_static(owner, name)
        original = _function(raw)
        if getattr(original, _PATCHED, False):
            return wrapper
        replacement = _replacement(wrapper, original)
        kind = type(raw) if isinstance(raw, (staticmethod, classmethod, property)) else None
        setattr(owner, name, kind(replacement) if kind else replacement)
        return wrapper

    return decorate


def _replacement(wrapper: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def replacement(*args: Any, **kwargs: Any) -> Any:
        return wrapper(original, *args, **kwargs)

    setattr(replacement, _PATCHED, True)
    return replacement


__all__ = ["is_patched", "patch"]

"""The registry of merge methods: the one place that knows the list."""

from __future__ import annotations

import logging

from .base import MergeMethod

logger = logging.getLogger(__name__)

__all__ = ["available_methods", "get_method", "register_method"]

_REGISTRY: dict[str, type[MergeMethod]] = {}


def register_method(cls_or_name: type[MergeMethod] | str):
    """Register a :class:`MergeMethod` subclass under its ``name`` (or under an explicit name).

    Use as ``@register_method`` or ``@register_method("my_name")``. Re-registering a name replaces it. A method
    registered in any imported module appears in :func:`available_methods`, ``MergeConfig``, recipes, merge cards
    and ``sens-peft merge --help``.

    Args:
        cls_or_name: The class to register, or the name to register the decorated class under.

    Returns:
        The class (decorator form), or a decorator.
    """

    def _register(cls: type[MergeMethod], name: str | None = None) -> type[MergeMethod]:
        if not (isinstance(cls, type) and issubclass(cls, MergeMethod)):
            raise TypeError(f"register_method expects a MergeMethod subclass, got {cls!r}")
        key = name or cls.name
        if not key:
            raise ValueError(f"{cls.__name__} has no name; set the class attribute `name`")
        if name is not None:
            cls.name = name
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            logger.info("merge method %r re-registered (%s replaces %s)", key, cls.__name__,
                        _REGISTRY[key].__name__)
        _REGISTRY[key] = cls
        return cls

    if isinstance(cls_or_name, str):
        return lambda cls: _register(cls, cls_or_name)
    return _register(cls_or_name)


def get_method(name: str) -> MergeMethod:
    """An instance of the registered method ``name``.

    Raises:
        ValueError: if no method has that name.
    """
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; available: {available_methods()}") from None


def available_methods() -> list[str]:
    """Names of the registered merge methods."""
    return list(_REGISTRY)

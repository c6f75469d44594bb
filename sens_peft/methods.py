"""Merge methods (placeholder registry; the merge-math work replaces this file)."""

_REGISTRY = ("task_arithmetic", "ties", "dare_linear", "dare_ties")


def available_methods() -> list[str]:
    return list(_REGISTRY)

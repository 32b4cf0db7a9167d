"""The plugin's one error type for bad configuration (startup and per request).

It sits below every other module (the pure routing registries raise it too), so it has no
imports of its own.
"""

from __future__ import annotations

__all__ = ["RoutingConfigError"]


class RoutingConfigError(ValueError):
    """Invalid routing configuration; ``field`` is the offending key (``recroute.<name>``)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.detail = message
        super().__init__(f"{field}: {message}")

"""What the routing policy reads of a routing config: the fields, not the class.

``config.py`` (`RoutingConfig`) validates its schedule and scorer names against the
registries of this package, so the policy cannot name the config class (not even for
type checking: that was a cycle). It is written against this protocol instead, which
`RoutingConfig` satisfies structurally; tests and the reference implementation may pass
any object with these attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["RoutingSettings"]


class RoutingSettings(Protocol):
    """The routing fields the policy reads (``config.RoutingConfig`` documents each)."""

    @property
    def enabled(self) -> bool: ...
    @property
    def mode(self) -> str: ...
    @property
    def schedule(self) -> str: ...
    @property
    def keep(self) -> float | None: ...
    @property
    def avg_visual_tokens(self) -> int | None: ...
    @property
    def router_layers(self) -> Sequence[int] | None: ...
    @property
    def custom(self) -> Sequence[tuple[int, float]] | None: ...
    @property
    def reference_layers(self) -> int: ...
    @property
    def granularity(self) -> str: ...
    @property
    def block_size(self) -> int: ...
    @property
    def block_reduce(self) -> str: ...
    @property
    def score_layer(self) -> str: ...
    @property
    def incumbency(self) -> float: ...
    @property
    def max_returners(self) -> int | None: ...
    @property
    def reentry(self) -> str: ...

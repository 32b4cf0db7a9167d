"""The arithmetic of schedules (routing/schedule.py): routed stages and what they keep,
router layers placed at fractions of a model's depth, and the keep fractions that meet an
average visual-token budget. Pure functions of numbers, no model and no vLLM."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vllm_recroute.errors import RoutingConfigError
from vllm_recroute.routing.settings import RoutingSettings

__all__ = [
    "Keeps",
    "Stage",
    "average_retention",
    "bisect_keeps",
    "check_in_range",
    "num_keep",
    "retention_of",
    "round_half_up",
    "scaled_points",
    "solve_pdrop",
    "stage_at",
]

Keeps = tuple[float, ...]
_BISECTION_STEPS = 60  # λ in [0, 1] to ~1e-18: far below any meaningful retention difference


@dataclass(frozen=True)
class Stage:
    """Decoder layers ``[start, end)`` routed with one active set.

    ``keep`` is a fraction of the request's *total* visual tokens (not of the previous
    stage's active set), so stages are independent and reroute can grow the active set.
    """

    start: int
    end: int
    keep: float


def num_keep(keep: float, num_visual: int) -> int:
    """Number of visual tokens a keep fraction means: at least one (a routed stage always has an
    active visual token when there are any), at most all. Halves round up (not Python's
    round-half-to-even) so the count does not depend on the parity of ``num_visual``."""
    if num_visual <= 0:
        return 0
    return min(num_visual, max(1, round_half_up(keep * num_visual)))


def stage_at(stages: Sequence[Stage], layer_idx: int) -> int | None:
    """Index of the stage whose layers hold ``layer_idx``; None before the first router
    point (those layers see every token)."""
    for k, stage in enumerate(stages):
        if stage.start <= layer_idx < stage.end:
            return k
    return None


def average_retention(stages: Sequence[Stage], num_layers: int) -> float:
    """Mean over all ``num_layers`` layers of the visual-token fraction active in that layer
    (layers before the first router point count 1). This is the paper budget divided by the
    visual-token count: ``avg_visual_tokens / num_visual``."""
    if num_layers <= 0:
        raise ValueError(f"num_layers must be > 0, got {num_layers}")
    first = stages[0].start if stages else num_layers
    total = first + sum((s.end - s.start) * s.keep for s in stages)
    return total / num_layers


# ---------------------------------------------------------------------- the registry


def scaled_points(
    name: str,
    cfg: RoutingSettings,
    fractions: tuple[float, ...],
    num_layers: int,
    to_layer: Callable[[float], int],
) -> tuple[int, ...]:
    """``router_layers`` if given, else the layers at ``fractions`` of the depth (``to_layer``
    rounds), a colliding point moved one layer later, one at or past the last dropped."""
    if cfg.router_layers is not None:
        check_in_range("router_layers", cfg.router_layers, num_layers)
        return tuple(cfg.router_layers)
    points: list[int] = []
    for frac in fractions:
        point = max(points[-1] + 1 if points else 1, to_layer(frac * num_layers))
        if point < num_layers:
            points.append(point)
    if not points:
        raise RoutingConfigError(
            "recroute.schedule",
            f"{name} needs a model with at least 2 decoder layers (got {num_layers})",
        )
    return tuple(points)


def check_in_range(name: str, points: tuple[int, ...], num_layers: int) -> None:
    # A router point at num_layers would route no layer; silently ignoring it would hide a
    # config written for a deeper model.
    bad = [p for p in points if not 1 <= p < num_layers]
    if bad:
        raise RoutingConfigError(
            f"recroute.{name}",
            f"router layer(s) {bad} out of range for a model with {num_layers} decoder layers; "
            f"must be in [1, {num_layers - 1}]",
        )


def solve_pdrop(
    first: int,
    lengths: list[int],
    exponents: tuple[int, ...],
    num_layers: int,
    target: float,
    floor: float,
) -> tuple[float, ...]:
    """λ for stages that keep max(λ^e, one token)."""
    return bisect_keeps(
        lambda lam: tuple(max(floor, lam**e) for e in exponents),
        lambda keeps: retention_of(first, lengths, keeps, num_layers),
        target,
    )


def retention_of(first: int, lengths: list[int], keeps: Keeps, num_layers: int) -> float:
    return (first + sum(n * k for n, k in zip(lengths, keeps, strict=True))) / num_layers


def bisect_keeps(
    keeps: Callable[[float], Keeps],
    retention: Callable[[Keeps], float],
    target: float,
    lam_max: float = 1.0,
) -> Keeps:
    """Bisection on λ in [0, lam_max]. Retention is continuous and non-decreasing in λ, and
    a fixed step count keeps the result deterministic."""
    lo, hi = 0.0, lam_max
    if retention(keeps(lo)) >= target:
        return keeps(lo)
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        if retention(keeps(mid)) < target:
            lo = mid
        else:
            hi = mid
    return keeps(hi)


def round_half_up(x: float) -> int:
    return math.floor(x + 0.5)

"""Where the router points are and how many visual tokens each stage keeps.

A schedule is resolved per model depth (router points scale with it) and, when the budget is
given as an average visual-token count, per request (the keep fractions depend on how many
visual tokens the request has). Stage 0 — the layers before the first router point — is
implicit: it always sees every token, so it is not listed.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from vllm_recroute.errors import RoutingConfigError
from vllm_recroute.routing.budget import (
    Keeps,
    Stage,
    average_retention,
    bisect_keeps,
    check_in_range,
    num_keep,
    retention_of,
    round_half_up,
    scaled_points,
    solve_pdrop,
)
from vllm_recroute.routing.settings import RoutingSettings

__all__ = [
    "SCHEDULES",
    "Schedule",
    "Stage",
    "average_retention",
    "get_schedule",
    "num_keep",
    "resolve_stages",
    "router_points",
]

# Defaults from the papers: FastV prunes after layer 2 of 32 keeping 50%; PyramidDrop routes at
# 1/4, 1/2, 3/4 of depth with ratio 0.5 per stage.
_FASTV_LAYER = 2
_DEFAULT_KEEP = 0.5
_PDROP_FRACTIONS = (0.25, 0.5, 0.75)
# SparseVLM's pruning layers 2, 6 and 15 of LLaVA-1.5's 32 (as fractions of depth).
_SPARSEVLM_FRACTIONS = (2 / 32, 6 / 32, 15 / 32)
# The layouts of "Reroute, Don't Remove"'s released configs (elmma/mllm-reroute,
# configs/experiment/llava15/*, 32-layer LLaVA-1.5): reroute matched to FastV keeps one keep
# at layers 3, 7, 15, 23; matched to PyramidDrop it keeps α, α, α/2, α/4 at 2, 7, 15, 23,
# against PyramidDrop's geometric λ, λ², λ³, λ⁴ at the same four layers ("earlyL2").
_FASTV_MATCHED_FRACTIONS = (3 / 32, 7 / 32, 15 / 32, 23 / 32)
_EARLY_FRACTIONS = (2 / 32, 7 / 32, 15 / 32, 23 / 32)
_PDROP_MATCHED_SHAPE = (1.0, 1.0, 0.5, 0.25)


def resolve_stages(
    cfg: RoutingSettings, num_layers: int, num_visual: int | None = None
) -> tuple[Stage, ...]:
    """Routed stages for a model of ``num_layers`` decoder layers; they tile
    ``[first router point, num_layers)``. ``num_visual`` is required only for
    ``avg_visual_tokens`` budgets. ``mode="off"`` gives ``()``.
    """
    if not cfg.enabled:
        return ()
    points, keeps = _points_and_keeps(cfg, num_layers)
    if cfg.avg_visual_tokens is not None:
        keeps = _keeps_for_budget(cfg, points, num_layers, num_visual)
    ends = (*points[1:], num_layers)
    return tuple(Stage(s, e, k) for s, e, k in zip(points, ends, keeps, strict=True))


def router_points(cfg: RoutingSettings, num_layers: int) -> tuple[int, ...]:
    """The layers that start a routed stage. They never depend on the request (only the keeps
    may), so the model wrapper can fix them at load time."""
    if not cfg.enabled:
        return ()
    return _points_and_keeps(cfg, num_layers)[0]


class Schedule(ABC):
    """One named schedule: where its router points are and what each stage keeps.

    Stateless; one instance per name in :data:`SCHEDULES`. Adding a schedule is one subclass
    here and one registry entry: the config validates names and router-layer counts from the
    registry, and ``tests/unit/test_registries.py`` runs the contract over every entry.
    """

    name: ClassVar[str]
    # How many router points a ``router_layers`` override must list (None: the schedule
    # takes explicit ``custom`` (layer, keep) pairs instead).
    num_router_points: ClassVar[int | None]
    # Config fields a minimal valid config of this schedule needs (docs, contract tests).
    example: ClassVar[dict[str, Any]] = {}
    # Whether the router points scale with the model's depth (named paper schedules do).
    scales_with_depth: ClassVar[bool] = True

    @abstractmethod
    def layout(self, cfg: RoutingSettings, num_layers: int) -> tuple[tuple[int, ...], Keeps]:
        """Router points and the keep of each stage for a ``num_layers``-deep model."""

    @abstractmethod
    def budget_keeps(
        self, cfg: RoutingSettings, num_layers: int, target: float, floor: float
    ) -> Keeps:
        """Keeps whose average retention is ``target`` (each at least ``floor``)."""

    def validate(self, cfg: RoutingSettings) -> None:
        """Cross-field checks of a config naming this schedule (RoutingConfigError)."""
        if cfg.custom is not None:
            raise RoutingConfigError(
                "recroute.custom",
                f"only allowed with schedule 'custom' (schedule is {self.name!r})",
            )
        n = self.num_router_points
        if cfg.router_layers is not None and len(cfg.router_layers) != n:
            raise RoutingConfigError(
                "recroute.router_layers",
                f"got {list(cfg.router_layers)}; schedule {self.name!r} needs exactly "
                f"{n} router layer(s)",
            )


class FastV(Schedule):
    """FastV: one router point at layer 2 of 32 (scaled to depth), keep λ (default 0.5)."""

    name = "fastv"
    num_router_points = 1

    def layout(self, cfg: RoutingSettings, num_layers: int) -> tuple[tuple[int, ...], Keeps]:
        return self._points(cfg, num_layers), (_lam(cfg),)

    def _points(self, cfg: RoutingSettings, num_layers: int) -> tuple[int, ...]:
        if cfg.router_layers is not None:
            check_in_range("router_layers", cfg.router_layers, num_layers)
            return cfg.router_layers
        point = max(1, round_half_up(_FASTV_LAYER * num_layers / cfg.reference_layers))
        check_in_range("schedule", (point,), num_layers)
        return (point,)

    def budget_keeps(
        self, cfg: RoutingSettings, num_layers: int, target: float, floor: float
    ) -> Keeps:
        # r·L = p + (L - p)·k  =>  k = (r·L - p) / (L - p)
        (point,) = self._points(cfg, num_layers)
        keep = (target * num_layers - point) / (num_layers - point)
        return (min(1.0, max(floor, keep)),)


class PyramidDrop(Schedule):
    """PyramidDrop: router points at 1/4, 1/2, 3/4 of depth keeping λ, λ², λ³."""

    name = "pdrop"
    num_router_points = 3

    def layout(self, cfg: RoutingSettings, num_layers: int) -> tuple[tuple[int, ...], Keeps]:
        points, exponents = self._points(cfg, num_layers)
        lam = _lam(cfg)
        return points, tuple(lam**e for e in exponents)

    def _points(
        self, cfg: RoutingSettings, num_layers: int
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Router points and the power of λ each stage keeps (stage i keeps λ^(i+1)).

        On shallow models the default points collide (L=2: 1, 1, 2): a stage whose range is
        empty is dropped and the *later* exponent wins at that layer, which is exactly what
        reading the schedule layer by layer gives.
        """
        if cfg.router_layers is not None:
            check_in_range("router_layers", cfg.router_layers, num_layers)
            return cfg.router_layers, tuple(range(1, len(cfg.router_layers) + 1))
        by_point: dict[int, int] = {}
        for i, frac in enumerate(_PDROP_FRACTIONS):
            point = max(1, round_half_up(frac * num_layers))
            if point < num_layers:
                by_point[point] = i + 1
        if not by_point:
            raise RoutingConfigError(
                "recroute.schedule",
                f"pdrop needs a model with at least 2 decoder layers (got {num_layers})",
            )
        points = tuple(sorted(by_point))
        return points, tuple(by_point[p] for p in points)

    def budget_keeps(
        self, cfg: RoutingSettings, num_layers: int, target: float, floor: float
    ) -> Keeps:
        points, exponents = self._points(cfg, num_layers)
        lengths = [e - s for s, e in zip(points, (*points[1:], num_layers), strict=True)]
        return solve_pdrop(points[0], lengths, exponents, num_layers, target, floor)


class Custom(Schedule):
    """Explicit ``custom`` (layer, keep) pairs; the budget is in the pairs themselves."""

    name = "custom"
    num_router_points = None
    example: ClassVar[dict[str, Any]] = {"custom": [[1, 0.5], [2, 0.25]]}
    scales_with_depth = False

    def layout(self, cfg: RoutingSettings, num_layers: int) -> tuple[tuple[int, ...], Keeps]:
        assert cfg.custom is not None  # guaranteed by validate()
        points = tuple(layer for layer, _ in cfg.custom)
        check_in_range("custom", points, num_layers)
        return points, tuple(keep for _, keep in cfg.custom)

    def budget_keeps(
        self, cfg: RoutingSettings, num_layers: int, target: float, floor: float
    ) -> Keeps:
        raise RoutingConfigError("recroute.avg_visual_tokens", "not allowed with schedule 'custom'")

    def validate(self, cfg: RoutingSettings) -> None:
        if cfg.custom is None:
            raise RoutingConfigError(
                "recroute.custom",
                "required when schedule is 'custom'; must be a non-empty list of [layer, keep] "
                "pairs with strictly increasing integer layers >= 1 and keep in (0, 1]",
            )
        # Budgets and router points are already explicit in ``custom``; a second source
        # would be ambiguous, so refuse rather than pick one.
        for name in ("keep", "avg_visual_tokens", "router_layers"):
            if getattr(cfg, name) is not None:
                raise RoutingConfigError(
                    f"recroute.{name}",
                    "not allowed with schedule 'custom' (put (layer, keep) pairs in "
                    "recroute.custom)",
                )


class SparseVLM(Schedule):
    """SparseVLM's stage layout: router points at layers 2, 6, 15 of 32 (scaled to depth),
    keeping λ, λ², λ³ (the PyramidDrop progression; SparseVLM's own text raters and token
    recycling are not part of a schedule). The early first point is what reaches the
    literature's 64-of-576 budgets, which PyramidDrop's 1/4-depth first point cannot.

    On shallow models colliding points are pushed one layer later (L=4: 1, 2, 3); a point
    at or past the last layer is dropped with its stage.
    """

    name = "sparsevlm"
    num_router_points = 3

    def layout(self, cfg: RoutingSettings, num_layers: int) -> tuple[tuple[int, ...], Keeps]:
        points = self._points(cfg, num_layers)
        lam = _lam(cfg)
        return points, tuple(lam ** (i + 1) for i in range(len(points)))

    def _points(self, cfg: RoutingSettings, num_layers: int) -> tuple[int, ...]:
        return scaled_points(self.name, cfg, _SPARSEVLM_FRACTIONS, num_layers, round_half_up)

    def budget_keeps(
        self, cfg: RoutingSettings, num_layers: int, target: float, floor: float
    ) -> Keeps:
        points = self._points(cfg, num_layers)
        lengths = [e - s for s, e in zip(points, (*points[1:], num_layers), strict=True)]
        exponents = tuple(range(1, len(points) + 1))
        return solve_pdrop(points[0], lengths, exponents, num_layers, target, floor)


class _FourPoints(Schedule):
    """A paper layout of four router points (fractions of a 32-layer depth) whose keeps are
    one function of λ. Scaled down (floor, at least 1) rather than rounded: the share of
    depth before the first router point must not grow on a shallower model, or the
    paper's lowest budgets (FastV at layer 3 of 32 reaches 11%) become unreachable (L=16:
    1, 3, 7, 11). Colliding points move one layer later; one at or past the last layer is
    dropped with its stage (L=4: 1, 2, 3)."""

    num_router_points = 4
    fractions: ClassVar[tuple[float, ...]]
    # the λ at which every keep is 1 (budgets up to a full model stay reachable)
    lam_max: ClassVar[float] = 1.0

    @abstractmethod
    def keeps(self, lam: float, n: int) -> Keeps:
        """The keeps of the first ``n`` stages for λ (non-decreasing in λ)."""

    def layout(self, cfg: RoutingSettings, num_layers: int) -> tuple[tuple[int, ...], Keeps]:
        points = self._points(cfg, num_layers)
        return points, self.keeps(_lam(cfg), len(points))

    def _points(self, cfg: RoutingSettings, num_layers: int) -> tuple[int, ...]:
        return scaled_points(self.name, cfg, self.fractions, num_layers, math.floor)

    def budget_keeps(
        self, cfg: RoutingSettings, num_layers: int, target: float, floor: float
    ) -> Keeps:
        points = self._points(cfg, num_layers)
        lengths = [e - s for s, e in zip(points, (*points[1:], num_layers), strict=True)]
        n = len(points)
        return bisect_keeps(
            lambda lam: tuple(max(floor, k) for k in self.keeps(lam, n)),
            lambda keeps: retention_of(points[0], lengths, keeps, num_layers),
            target,
            self.lam_max,
        )


class FastVMatched(_FourPoints):
    """Reroute matched to FastV (the paper's ``ours_vs_fastv``): one keep λ at router points
    3, 7, 15, 23 of 32. Under remove only the first point removes anything (every later
    stage keeps as many as are left), so remove with this schedule is FastV at its first
    router point: the clean test of what recovery adds."""

    name = "fastv-matched"
    fractions = _FASTV_MATCHED_FRACTIONS

    def keeps(self, lam: float, n: int) -> Keeps:
        return (lam,) * n


class PDropMatched(_FourPoints):
    """Reroute matched to PyramidDrop (the paper's ``ours_vs_pdrop``): α, α, α/2, α/4 at
    router points 2, 7, 15, 23 of 32 (α = λ), budget-matched to ``pdrop-early``."""

    name = "pdrop-matched"
    fractions = _EARLY_FRACTIONS
    lam_max = 1 / min(_PDROP_MATCHED_SHAPE)

    def keeps(self, lam: float, n: int) -> Keeps:
        return tuple(min(1.0, lam * f) for f in _PDROP_MATCHED_SHAPE[:n])


class PDropEarly(_FourPoints):
    """PyramidDrop's geometric keeps λ, λ², λ³, λ⁴ at router points 2, 7, 15, 23 of 32
    (the paper's ``pdrop_earlyL2`` baseline, which reaches budgets that PyramidDrop's
    1/4-depth first point cannot)."""

    name = "pdrop-early"
    fractions = _EARLY_FRACTIONS

    def keeps(self, lam: float, n: int) -> Keeps:
        return tuple(lam ** (i + 1) for i in range(n))


SCHEDULES: dict[str, Schedule] = {
    s.name: s
    for s in (
        FastV(), PyramidDrop(), Custom(), SparseVLM(), FastVMatched(), PDropMatched(),
        PDropEarly(),
    )
}  # fmt: skip


def get_schedule(name: str) -> Schedule:
    try:
        return SCHEDULES[name]
    except KeyError:
        allowed = ", ".join(SCHEDULES)
        raise RoutingConfigError(
            "recroute.schedule", f"got {name!r}; allowed values: {allowed}"
        ) from None


def _lam(cfg: RoutingSettings) -> float:
    return cfg.keep if cfg.keep is not None else _DEFAULT_KEEP


def _points_and_keeps(
    cfg: RoutingSettings, num_layers: int
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    return get_schedule(cfg.schedule).layout(cfg, num_layers)


# ---------------------------------------------------------------------- average budgets


def _keeps_for_budget(
    cfg: RoutingSettings, points: tuple[int, ...], num_layers: int, num_visual: int | None
) -> tuple[float, ...]:
    """Keeps whose average retention is ``min(1, avg_visual_tokens / num_visual)``.

    If the target is below what the schedule can reach (the layers before the first router
    point always see every token), every stage keeps one token: the cheapest valid schedule.
    """
    assert cfg.avg_visual_tokens is not None
    if num_visual is None:
        raise ValueError("avg_visual_tokens budgets need the request's num_visual")
    if num_visual <= 0:  # nothing to route; any keep means zero tokens
        return tuple(1.0 for _ in points)
    target = min(1.0, cfg.avg_visual_tokens / num_visual)
    floor = 1.0 / num_visual  # one token: num_keep never goes below it either
    return get_schedule(cfg.schedule).budget_keeps(cfg, num_layers, target, floor)

"""One stage numbering for everything that leaves a request's own stage tuple.

Inside a request, its routed stages are the tuple ``resolve_stages`` returns (schedule.py)
and are indexed ``k = 0, 1, ...`` (``stage_at``, ``RouteState.deferred[k]``,
``ParkedKey.k``, the parked tier's ``units[(request, k)]``). Everywhere else a stage is a
*stage number*: the KV-spec stage of a layer (kv/spec.py ``RoutedStageSpec.stage``, one KV
group per stage), a deferral plan's and a worker report's stage (connector/,
kv/manager.py), a released-block event's (messages.py) and the ``stage`` label of the
per-stage metrics. Stage 0 is the layers before the first router point (they see every
token), so the request's ``k``-th routed stage is stage ``spec_stage(k)``.
"""

from __future__ import annotations

__all__ = ["spec_stage"]


def spec_stage(k: int) -> int:
    """The stage number of a request's ``k``-th routed stage (0-based ``k``)."""
    if k < 0:
        raise ValueError(f"a routed stage index is >= 0, got {k}")
    return k + 1

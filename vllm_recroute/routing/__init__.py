"""Pure routing logic (no vLLM import): where to route, how to score, whom to keep.

The routing decision is made in ``decision.py`` from the scores of ``scorers.py`` at the router
points of ``schedule.py`` (its arithmetic: ``budget.py``). The vLLM integration in
``vllm_recroute/worker/step.py`` (and the plain PyTorch reference implementation) calls these
at each router point, so both paths take the same decisions.
"""

from vllm_recroute.routing.budget import Stage, average_retention, num_keep, stage_at
from vllm_recroute.routing.decision import route_request, route_with, select_active
from vllm_recroute.routing.deferral import planned_deferred
from vllm_recroute.routing.schedule import resolve_stages, router_points
from vllm_recroute.routing.scorers import (
    SCORERS,
    AttentionScorer,
    KeyNormScorer,
    ScoreInputs,
    Scorer,
    get_scorer,
    query_indices,
    scoring_layer,
)
from vllm_recroute.routing.stage_numbers import spec_stage

__all__ = [
    "SCORERS",
    "AttentionScorer",
    "KeyNormScorer",
    "ScoreInputs",
    "Scorer",
    "Stage",
    "average_retention",
    "get_scorer",
    "num_keep",
    "planned_deferred",
    "query_indices",
    "resolve_stages",
    "route_request",
    "route_with",
    "router_points",
    "scoring_layer",
    "select_active",
    "spec_stage",
    "stage_at",
]

"""How many visual tokens each routed stage will not hold, known before the prefill runs.

The active count of a stage depends only on the budget, not on the scores: ``num_keep``
tokens compete among ``V`` (reroute) or among the previous stage's active ones (remove),
and ``decision.select_active`` takes ``min(keep, candidates)`` of them. So the scheduler
can allocate a routed stage's compacted pages from the first step (kv/manager.py) instead
of allocating the whole prompt and releasing the deferred tail after the forward.

With ``granularity="block"`` whole routing blocks are taken while the active count stays
``<= keep``, but at least one block: the count depends on the block sizes the scores pick,
so only a bound is known. The plan then holds the fewest deferred tokens the decision can
produce (at most ``max(keep, block_size)`` active); the worker's report settles the rest.
"""

from __future__ import annotations

from vllm_recroute.routing.budget import num_keep
from vllm_recroute.routing.schedule import resolve_stages
from vllm_recroute.routing.settings import RoutingSettings

__all__ = ["planned_deferred"]


def planned_deferred(cfg: RoutingSettings, num_layers: int, num_visual: int) -> tuple[int, ...]:
    """Per routed stage, in order: visual tokens it will not hold (exact for token
    granularity, a lower bound for block granularity); ``()`` when nothing is routed."""
    if num_visual <= 0:
        return ()
    out = []
    upper = num_visual  # most tokens the previous stage can hold active
    for stage in resolve_stages(cfg, num_layers, num_visual):
        keep = num_keep(stage.keep, num_visual)
        candidates = num_visual if cfg.mode == "reroute" else upper
        if cfg.granularity == "block" and keep > 0:
            keep = max(keep, cfg.block_size)  # one block may exceed the budget
        upper = min(keep, candidates)
        out.append(num_visual - upper)
    return tuple(out)

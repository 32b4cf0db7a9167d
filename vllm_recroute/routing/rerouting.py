"""Decode-time re-routing: which parked units come back, which active units leave.

A *unit* is a group of ``park_block_tokens`` visual tokens of one request at one routing
stage that are all active or all deferred there (the parked tier moves whole units). At a
re-routing step the current query is scored against one digest per unit (its mean
post-RoPE key at the stage's first layer, per KV head); the best-scoring units fill the
stage's active budget. Only full-size units swap, so the budget (and the pages holding it)
never changes: every restored unit takes the slots of one evicted unit.

Pure torch, shared by the vLLM integration (`vllm_recroute/worker/parking.py`) and the
reference implementation (`reference/oracle.py`), so both take the same decisions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Swap", "chunk_units", "plan_swaps", "unit_scores"]


def chunk_units(indices: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Consecutive chunks of ``size`` (the last may be shorter) of a 1-D index tensor."""
    return [indices[i : i + size] for i in range(0, int(indices.numel()), size)]


def unit_scores(q: torch.Tensor, digests: torch.Tensor, scale: float) -> torch.Tensor:
    """Score ``[U]`` of each unit for one query: mean over query heads of q . digest.

    ``q`` is ``[num_heads, head_dim]`` (post-RoPE), ``digests`` ``[U, num_kv_heads,
    head_dim]``; grouped-query heads share their KV head's digest.
    """
    if digests.shape[0] == 0:
        return torch.zeros(0)
    group = q.shape[0] // digests.shape[1]
    d = digests.float().repeat_interleave(group, dim=1)  # [U, H, D]
    return (d * q.float()[None]).sum(-1).mean(-1) * scale


@dataclass(frozen=True)
class Swap:
    evict: int  # active unit id that goes to the parked pool
    restore: int  # parked unit id that takes its slots


def plan_swaps(
    active: dict[int, float], parked: dict[int, float], limit: int | None = None
) -> list[Swap]:
    """Swaps that make the ``len(active)`` best units of ``active | parked`` the active set,
    or the first ``limit`` of them (``reroute_max_swaps``; None: all).

    Scores by unit id. Ties are broken by unit id (lower wins), so the plan is reproducible.
    Pairs the best restored unit with the worst evicted one, so the first swaps are the
    ones that gain most.
    """
    ranked = sorted([*active.items(), *parked.items()], key=lambda kv: (-kv[1], kv[0]))
    chosen = {uid for uid, _ in ranked[: len(active)]}
    restore = [uid for uid, _ in ranked if uid in parked and uid in chosen]
    evict = [uid for uid, _ in reversed(ranked) if uid in active and uid not in chosen]
    return [Swap(e, r) for e, r in zip(evict, restore, strict=True)][:limit]

"""Turn one request's visual-token scores into the active set of a stage.

Decisions must be reproducible across processes and between the vLLM path and the reference
implementation, so ties are broken by index (stable sort), never left to ``torch.topk``.
"""

from __future__ import annotations

import math

import torch

from vllm_recroute.routing.settings import RoutingSettings

__all__ = ["route_request", "route_with", "select_active", "stay_or_return"]

_BLOCK_REDUCE = {"max": "amax", "mean": "mean"}


def select_active(
    scores: torch.Tensor,
    k_keep: int,
    *,
    candidates: torch.Tensor | None = None,
    block_ids: torch.Tensor | None = None,
    block_reduce: str = "max",
) -> torch.Tensor:
    """Bool mask ``[V]`` of the active visual tokens.

    ``candidates`` (bool ``[V]``, ``None`` = all) are the eligible tokens; at most ``k_keep`` of
    them become active. With ``block_ids`` (``[V]`` long, e.g. ``position // block_size``) whole
    blocks are taken in descending block score while the active count stays ``<= k_keep``, but
    at least one block; non-candidate tokens of a taken block stay inactive.
    """
    num_visual = scores.shape[0]
    # device-agnostic: decided where the scores are (the worker brings them to the host)
    if candidates is not None:
        candidates = candidates.to(scores.device)
    if block_ids is not None:
        block_ids = block_ids.to(scores.device)
    if candidates is None:
        candidates = torch.ones(num_visual, dtype=torch.bool, device=scores.device)
    active = torch.zeros(num_visual, dtype=torch.bool, device=scores.device)
    if k_keep <= 0 or not bool(candidates.any()):
        return active
    # NaN would sort first under descending order; treat it as the least important instead.
    scores = torch.nan_to_num(scores.float(), nan=float("-inf"))
    if block_ids is None:
        return _select_tokens(scores, k_keep, candidates, active)
    return _select_blocks(scores, k_keep, candidates, block_ids, block_reduce, active)


def route_request(
    scores: torch.Tensor,
    k_keep: int,
    mode: str,
    prev_active: torch.Tensor | None,
    block_ids: torch.Tensor | None = None,
    block_reduce: str = "max",
    incumbency: float = 0.0,
    max_returners: int | None = None,
) -> torch.Tensor:
    """One request's decision at one router point.

    ``reroute``: every visual token competes, deferred ones included. ``remove``: only the
    previous stage's active tokens compete (``prev_active`` ``None`` at the first router point
    means all), so a token deferred once never comes back.

    Two training-free brakes on returning tokens (reroute, after the first router point,
    token granularity; :func:`stay_or_return`): ``incumbency`` β, a deferred token takes
    an active one's place only if its score beats it by the factor 1 + β (0: today's
    reroute; ``inf``: the active tokens are ranked first), and ``max_returners``, at most
    this many active tokens are displaced at this router point.
    """
    if mode == "reroute":
        candidates = None
    elif mode == "remove":
        candidates = prev_active
    else:
        raise ValueError(f"route_request: mode must be 'reroute' or 'remove', got {mode!r}")
    braked = incumbency > 0 or max_returners is not None
    if mode == "reroute" and prev_active is not None and braked:
        if block_ids is not None:
            raise ValueError("incumbency / max_returners route tokens, not blocks")
        return stay_or_return(scores, k_keep, prev_active, incumbency, max_returners)
    return select_active(
        scores, k_keep, candidates=candidates, block_ids=block_ids, block_reduce=block_reduce
    )


def route_with(
    cfg: RoutingSettings,
    scores: torch.Tensor,
    k_keep: int,
    prev_active: torch.Tensor | None,
    block_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`route_request` with a request's routing config (``mode``, ``block_reduce``,
    ``incumbency``, ``max_returners``): the one call the engine and the references make."""
    return route_request(
        scores,
        k_keep,
        cfg.mode,
        prev_active,
        block_ids=block_ids,
        block_reduce=cfg.block_reduce,
        incumbency=cfg.incumbency,
        max_returners=cfg.max_returners,
    )


def stay_or_return(
    scores: torch.Tensor,
    k_keep: int,
    prev_active: torch.Tensor,
    incumbency: float,
    max_returners: int | None,
) -> torch.Tensor:
    """Reroute with incumbents favoured: tokens ranked by score, an incumbent's (a token of
    ``prev_active``) multiplied by 1 + ``incumbency`` (scores of the registered scorers
    are non-negative; ``inf`` ranks every incumbent first), then the top ``k_keep`` taken
    with at most ``max_returners`` returners beyond the slots the incumbents cannot fill
    (a stage that keeps more than the previous one still fills its budget)."""
    num_visual = scores.shape[0]
    prev = prev_active.to(scores.device).bool()
    active = torch.zeros(num_visual, dtype=torch.bool, device=scores.device)
    if k_keep <= 0:
        return active
    scores = torch.nan_to_num(scores.float(), nan=float("-inf"))
    order = torch.sort(scores, descending=True, stable=True).indices
    if math.isinf(incumbency):
        order = order[torch.sort(prev[order].int(), descending=True, stable=True).indices]
    elif incumbency > 0:
        boosted = torch.where(prev, scores * (1 + incumbency), scores)
        order = torch.sort(boosted, descending=True, stable=True).indices
    returner = ~prev[order]
    if max_returners is not None:
        allowed = max(max_returners, k_keep - int(prev.sum()))
        within = torch.cumsum(returner.int(), 0) <= allowed
        order = order[~returner | within]
    active[order[:k_keep]] = True
    return active


def _select_tokens(
    scores: torch.Tensor, k_keep: int, candidates: torch.Tensor, active: torch.Tensor
) -> torch.Tensor:
    idx = candidates.nonzero().squeeze(1)  # increasing, so a stable sort breaks ties low-first
    order = torch.sort(scores[idx], descending=True, stable=True).indices
    active[idx[order[:k_keep]]] = True
    return active


def _select_blocks(
    scores: torch.Tensor,
    k_keep: int,
    candidates: torch.Tensor,
    block_ids: torch.Tensor,
    block_reduce: str,
    active: torch.Tensor,
) -> torch.Tensor:
    if block_reduce not in _BLOCK_REDUCE:
        raise ValueError(f"recroute.block_reduce: got {block_reduce!r}; allowed values: max, mean")
    # Blocks are compared by their candidate tokens only: a removed token must not lift its block.
    blocks, slot = torch.unique(block_ids[candidates], sorted=True, return_inverse=True)
    cand_scores = scores[candidates]
    block_score = torch.zeros(blocks.shape[0], dtype=torch.float32, device=scores.device)
    block_score = block_score.scatter_reduce(
        0, slot, cand_scores, reduce=_BLOCK_REDUCE[block_reduce], include_self=False
    )
    sizes = torch.bincount(slot, minlength=blocks.shape[0])
    # ``blocks`` is sorted by id, so a stable sort breaks score ties by lower block id.
    order = torch.sort(block_score, descending=True, stable=True).indices
    taken = torch.cumsum(sizes[order], 0) <= k_keep
    taken[0] = True  # always at least one block, even one larger than k_keep
    chosen = blocks[order[taken]]
    return active | (candidates & torch.isin(block_ids, chosen))

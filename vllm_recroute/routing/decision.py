"""Turn one request's visual-token scores into the active set of a stage.

Decisions must be reproducible across processes and between the vLLM path and the reference
implementation, so ties are broken by index (stable sort), never left to ``torch.topk``.
"""

from __future__ import annotations

import torch

__all__ = ["route_request", "select_active"]

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
) -> torch.Tensor:
    """One request's decision at one router point.

    ``reroute``: every visual token competes, deferred ones included. ``remove``: only the
    previous stage's active tokens compete (``prev_active`` ``None`` at the first router point
    means all), so a token deferred once never comes back.
    """
    if mode == "reroute":
        candidates = None
    elif mode == "remove":
        candidates = prev_active
    else:
        raise ValueError(f"route_request: mode must be 'reroute' or 'remove', got {mode!r}")
    return select_active(
        scores, k_keep, candidates=candidates, block_ids=block_ids, block_reduce=block_reduce
    )


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

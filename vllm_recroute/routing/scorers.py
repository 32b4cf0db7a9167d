"""Training-free importance scores for a request's visual tokens (higher = more important).

One small class per scorer behind a registry, so a new scorer is one class plus one dict
entry. A scorer sees one request's post-RoPE queries and keys at the layer just before a
router point and returns one float32 score per visual token.

Devices (docs/architecture.md, "GPU path"): scores are computed where ``q``/``k`` live (the
activations' device); index inputs may be host tensors and are moved there. The caller
brings the scores of a whole router point to the host in one copy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm_recroute.errors import RoutingConfigError

__all__ = [
    "SCORERS",
    "AttentionScorer",
    "KeyNormScorer",
    "ScoreInputs",
    "Scorer",
    "get_scorer",
    "query_indices",
]


@dataclass
class ScoreInputs:
    """One request's tensors at the scoring layer (``T`` = the request's tokens, in order)."""

    # [T, num_heads, head_dim] post-RoPE queries; only the rows at query_idx are read (the
    # engine projects no other), and None for a scorer that reads none (needs_queries)
    q: torch.Tensor | None
    k: torch.Tensor  # [T, num_kv_heads, head_dim] post-RoPE keys (num_heads % num_kv_heads == 0)
    visual_idx: torch.Tensor  # [V] long, indices into T of the visual tokens, increasing
    query_idx: torch.Tensor  # [Q] long, indices of the tokens whose attention is used
    scale: float  # softmax scale, typically 1/sqrt(head_dim)


class Scorer(ABC):
    name: ClassVar[str]
    # True if a token's score depends only on tokens up to it. Only causal scorers are safe when
    # chunked prefill splits a prompt before the question (or the last token) has arrived.
    causal: ClassVar[bool]
    # False: scores from keys alone, so the engine projects no queries for it
    needs_queries: ClassVar[bool] = True

    @abstractmethod
    def score(self, x: ScoreInputs) -> torch.Tensor:
        """Return ``[V]`` float32 scores, higher = more important."""


class AttentionScorer(Scorer):
    """FastV-style: attention paid to each visual token by the query tokens.

    Per head: causal softmax (keys ``j <= i``) of ``scale * q_i · k_j`` in float32; then the mean
    over heads and query tokens. Keys are *all* the request's tokens, deferred ones included:
    the score is the attention the query would pay if every token were visible, which is what
    lets a deferred token win its way back at a later router point.
    """

    name = "attention"
    causal = False  # the query (last / question tokens) comes after the visual tokens

    def score(self, x: ScoreInputs) -> torch.Tensor:
        if x.visual_idx.numel() == 0:
            return torch.zeros(0, dtype=torch.float32, device=x.k.device)
        if x.query_idx.numel() == 0:
            raise ValueError("attention scorer needs at least one query token")
        if x.q is None:
            raise ValueError("attention scorer needs queries")
        num_heads, num_kv = x.q.shape[1], x.k.shape[1]
        if num_heads % num_kv:
            raise ValueError(f"num_heads {num_heads} not a multiple of num_kv_heads {num_kv}")
        device = x.k.device
        query_idx = x.query_idx.to(device)
        k = x.k.float()  # [T, KV, D]
        # Group query heads by their kv head instead of repeating k (GQA), same maths.
        q = x.q[query_idx].float().unflatten(1, (num_kv, num_heads // num_kv))  # [Q,KV,G,D]
        # The [Q, KV, G, T] float32 logits are the routed step's largest extra activation,
        # which vLLM's profile run never sees: bounded by chunking the queries
        # (SCORE_CHUNK_ELEMENTS), exact (each query's softmax is its own).
        per_query = num_heads * k.shape[0]
        step = max(1, SCORE_CHUNK_ELEMENTS // max(1, per_query))
        total = torch.zeros(k.shape[0], dtype=torch.float32, device=device)
        for lo in range(0, int(query_idx.numel()), step):
            total += _attention_sums(q[lo : lo + step], k, query_idx[lo : lo + step], x.scale)
        per_token = total / (int(query_idx.numel()) * num_heads)  # mean over queries, heads
        return per_token[x.visual_idx.to(device)].contiguous()


class KeyNormScorer(Scorer):
    """Text-agnostic: ``-mean over kv heads of ||k_j||_2``.

    Keys with a small norm tend to attract attention (the query-independent part of q·k), so a
    low norm marks an important token. Needs no later token, hence causal and safe under
    chunked prefill.
    """

    name = "key_norm"
    causal = True
    needs_queries = False

    def score(self, x: ScoreInputs) -> torch.Tensor:
        keys = x.k[x.visual_idx.to(x.k.device)].float()  # [V, KV, D]
        return -torch.linalg.vector_norm(keys, dim=-1).mean(dim=-1)


SCORERS: dict[str, type[Scorer]] = {cls.name: cls for cls in (AttentionScorer, KeyNormScorer)}


def get_scorer(name: str) -> Scorer:
    """Instantiate the scorer registered under ``name`` (scorers are stateless)."""
    try:
        return SCORERS[name]()
    except KeyError:
        allowed = ", ".join(SCORERS)
        raise RoutingConfigError(
            "recroute.scorer", f"got {name!r}; allowed values: {allowed}"
        ) from None


def scoring_layer(router_point: int, score_layer: str) -> int:
    """The decoder layer whose attention (on its own input) scores a router point:
    ``before``: the layer before it (FastV, PyramidDrop); ``at``: the router layer itself
    ("Reroute, Don't Remove"'s released code). The engine and the reference both ask here."""
    if score_layer == "before":
        return router_point - 1
    if score_layer == "at":
        return router_point
    raise RoutingConfigError(
        "recroute.score_layer", f"got {score_layer!r}; allowed values: before, at"
    )


def query_indices(num_tokens: int, visual_idx: torch.Tensor, score_query: str) -> torch.Tensor:
    """Indices of the tokens whose attention the attention scorer averages.

    ``last``: the last prompt token (FastV). ``question``: the text tokens after the last
    visual token; a prompt that ends with its image has no such token, so it falls back to the
    last token rather than averaging nothing.
    """
    if num_tokens <= 0:
        raise ValueError("query_indices needs at least one token")
    device = visual_idx.device
    last = torch.tensor([num_tokens - 1], dtype=torch.long, device=device)
    if score_query == "last":
        return last
    if score_query != "question":
        raise RoutingConfigError(
            "recroute.score_query", f"got {score_query!r}; allowed values: last, question"
        )
    start = int(visual_idx.max()) + 1 if visual_idx.numel() else 0
    if start >= num_tokens:
        return last
    return torch.arange(start, num_tokens, dtype=torch.long, device=device)


# At most this many float32 logits per chunk of queries (64 MiB): the bound on the attention
# scorer's extra activation memory, whatever the prompt length or number of query tokens.
SCORE_CHUNK_ELEMENTS = 16 * 1024 * 1024


def _attention_sums(q: torch.Tensor, k: torch.Tensor, query_idx: torch.Tensor, scale: float):
    """``[T]``: causal attention probabilities summed over these queries and all heads."""
    logits = torch.einsum("qhgd,thd->qhgt", q, k) * scale
    future = _future_mask(query_idx, k.shape[0])  # [Q, T], on the logits' device
    logits = logits.masked_fill(future[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).sum(dim=(0, 1, 2))


def _future_mask(query_idx: torch.Tensor, num_keys: int) -> torch.Tensor:
    """``[Q, T]`` True where key ``j`` comes after query ``i`` (not visible causally)."""
    keys = torch.arange(num_keys, device=query_idx.device)
    return keys[None, :] > query_idx[:, None]

"""Which rows of a step are routed: a reading of the step's batch, changing no state.

    rows of the step:    r0 (prefill)           r1 (decode)   r2 (prefill, split)
    classified as:       PrefillRoute           decode row    split: runs unrouted
                         (its whole prompt      (a routed     (its prompt from the
                         from the first image   request with  first image on is not
                         on is in the step)     deferred      all in the step)
                                                tokens)

A prompt is routed only if its whole prompt from the first image on is in the step
(question-conditioned scores need the question); a prompt split there runs unrouted,
counted in ``chunked_fallbacks``: never silently routed on partial information.

Classification only reads (the request's routing state, its options, its first image).
What it implies for the state is applied by the runtime at step start, explicitly
(worker/runtime.py, ``WorkerRuntime.begin_step``): the ``fresh`` requests' old state is
forgotten, the ``split`` prompts are counted, and ``forced`` is filled with the decoding
rows that asked for a re-route (a loaded later turn).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vllm_recroute.config import RoutingConfig
from vllm_recroute.routing import Stage, resolve_stages
from vllm_recroute.vllm_view import StepBatch
from vllm_recroute.worker.state import RouteState

__all__ = ["Lookups", "PrefillRoute", "StepRows", "classify_rows"]


@dataclass
class PrefillRoute:
    """A request whose prompt (from its first image on) is in this step: routed now."""

    req_id: str
    row: int  # index in the batch
    start: int  # first token row of the request in the step
    prompt_end: int  # row after the last prompt token
    visual_rows: torch.Tensor  # rows (absolute) of routable visual tokens
    stages: tuple[Stage, ...]
    cfg: RoutingConfig
    masks: list[torch.Tensor] = field(default_factory=list)  # per stage, bool [V]
    scores: list[torch.Tensor] = field(default_factory=list)  # per stage, float [V]


@dataclass
class StepRows:
    """The step's rows as routing sees them."""

    batch: StepBatch
    prefills: list[PrefillRoute] = field(default_factory=list)
    decodes: dict[int, RouteState] = field(default_factory=dict)  # batch row -> state
    fresh: list[str] = field(default_factory=list)  # start afresh: old state forgotten
    split: list[str] = field(default_factory=list)  # prompts split at their image: counted
    forced: set[int] = field(default_factory=set)  # decode rows re-routed at this forward


@dataclass(frozen=True)
class Lookups:
    """What classifying a row reads, bound by the runtime to its state and the step's
    runner."""

    image_token_id: int
    num_layers: int
    state_of: Callable[[str], RouteState | None]
    config_of: Callable[[str], RoutingConfig]  # the request's effective routing config
    first_image: Callable[[str], int | None]  # its first image's token offset, if any


def classify_rows(batch: StepBatch, look: Lookups) -> StepRows:
    rows = StepRows(batch)
    for row, req_id in enumerate(batch.req_ids):
        _classify(rows, row, req_id, look)
    return rows


def _classify(rows: StepRows, row: int, req_id: str, look: Lookups) -> None:
    computed = int(rows.batch.num_computed[row])
    if computed > 0 and not _starts_afresh(rows, row, req_id, computed, look):
        return
    rows.fresh.append(req_id)  # a new or recomputed (preempted) request starts afresh
    cfg = look.config_of(req_id)
    if not cfg.enabled:
        return
    route = _prefill_route(rows, row, req_id, computed, cfg, look)
    if route is not None:
        rows.prefills.append(route)


def _starts_afresh(rows: StepRows, row: int, req_id: str, computed: int, look: Lookups) -> bool:
    """A request with computed tokens: a routed one decodes (a row of ``decodes`` while it
    has deferred tokens). No state: an unrouted request's decode, a later chunk of a split
    prompt, or a prompt after a prefix-cache hit. Only a prompt whose images all lie ahead
    can still be routed (kv/manager.py caches routed stages before the first image only,
    so a hit never reaches one)."""
    state = look.state_of(req_id)
    if state is not None:
        if any(state.deferred):
            rows.decodes[row] = state
        return False
    if computed >= rows.batch.prompt_lens[row]:
        return False
    first_image = look.first_image(req_id)
    return first_image is not None and first_image >= computed


def _prefill_route(
    rows: StepRows, row: int, req_id: str, computed: int, cfg: RoutingConfig, look: Lookups
) -> PrefillRoute | None:
    batch = rows.batch
    start, end = int(batch.qsl[row]), int(batch.qsl[row + 1])
    prompt_len = batch.prompt_lens[row] - computed  # prompt rows in this step (cache hit)
    if end - start < prompt_len:
        # Counted once per prompt: by the chunk that holds its first image.
        first_image = look.first_image(req_id)
        if first_image is not None and first_image < computed + end - start:
            rows.split.append(req_id)
        return None
    # The last prompt token is never routed: its logits are sampled.
    ids = batch.token_ids[start : start + prompt_len - 1]
    is_visual = ids == look.image_token_id
    if not bool(is_visual.any()):
        return None
    visual_rows = torch.nonzero(is_visual).flatten() + start
    stages = resolve_stages(cfg, look.num_layers, int(visual_rows.numel()))
    if not stages:
        return None
    return PrefillRoute(req_id, row, start, start + prompt_len, visual_rows, stages, cfg)

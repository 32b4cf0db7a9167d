"""One forward pass of a routed decoder: which rows are routed, scored, and kept.

The routing *decision* is made here, at the layer just before each router point: scores
from `routing/scorers.py`, top-k by `routing/decision.py`. The step is built at layer 0
from the step's batch (`vllm_view.StepBatch`):

    rows of the step:    r0 (prefill)           r1 (decode)   r2 (prefill)
    stage 0 layers:      t t v v v v v v t t    t             t v v v v t
    router point 1       scores for r0's and r2's visual tokens, taken at the layer
                         just before the router point, from the residual stream
    stage 1 layers:      t t v . v . . v t t    t             t . v v . t
    stage 2 layers:      t t . v v . v . t t    t             t v . v . t   (reroute:
                         a token deferred at stage 1 may be active again)

Deferred rows skip the stage's layers (worker/decoder.py carries their hidden state);
attention inside a stage sees the active set only (worker/compaction.py). A prompt is
routed only if its whole prompt from the first image on is in the step (question-
conditioned scores need the question); a prompt split there runs unrouted, counted in
``chunked_fallbacks``: never silently routed on partial information.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vllm_recroute import vllm_view
from vllm_recroute.config import RoutingConfig
from vllm_recroute.requests.options import decode_reroute_every
from vllm_recroute.routing import (
    ScoreInputs,
    Stage,
    get_scorer,
    num_keep,
    query_indices,
    resolve_stages,
    route_with,
    scoring_layer,
    stage_at,
)
from vllm_recroute.vllm_view import StepBatch
from vllm_recroute.worker.compaction import Segment, StepTables, compact_segment, take_positions
from vllm_recroute.worker.parking import PageRow
from vllm_recroute.worker.projections import project_qkv
from vllm_recroute.worker.state import RouteState

if TYPE_CHECKING:
    from vllm_recroute.worker.decoder import RoutedDecoder

logger = logging.getLogger("vllm_recroute")

__all__ = ["PrefillRoute", "StepRouter"]


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


class StepRouter:
    """Routing of one forward pass; built at layer 0 from the step's batch."""

    def __init__(self, decoder: RoutedDecoder, runner: Any, num_rows: int) -> None:
        self.decoder = decoder
        self.runner = runner
        self.batch = StepBatch.of(runner)
        self.num_rows = num_rows
        self.prefills: list[PrefillRoute] = []
        self.decodes: dict[int, RouteState] = {}  # batch row -> state
        self._segments: dict[int, Segment] = {}
        self._device_rows: dict[int, torch.Tensor] = {}  # segment start -> its rows there
        self.tables = StepTables(runner, self.batch, decoder.released)
        for row, req_id in enumerate(self.batch.req_ids):
            self._classify(row, req_id)
        starts = {s.start for p in self.prefills for s in p.stages}
        starts |= {s.start for st in self.decodes.values() for s in st.stages}
        # loaded later turns re-route once, at this forward, for their own question
        decoding = [self.batch.req_ids[row] for row in self.decodes]
        forced = decoder.store.take_reroutes(decoding)
        self.forced = {row for row in self.decodes if self.batch.req_ids[row] in forced}
        self.boundaries = sorted(starts | {0, decoder.num_layers})
        self.stage_starts = starts
        self.active = bool(self.prefills or self.decodes)
        # Rows move (gathers, scoring, parking, re-routing) only for a routed prefill or a
        # due decode re-route; every other routed step is the ordinary (compiled) forward
        # with its compacted attention installed before it (decoder.py, "Compilation").
        self.needs_eager = bool(self.prefills) or self._reroute_due()

    def _reroute_due(self) -> bool:
        tier = self.decoder.tier
        if tier is None:
            return False
        return any(self._due(row, state) for row, state in self.decodes.items())

    def _due(self, row: int, state: RouteState) -> bool:
        output_index = int(self.batch.num_computed[row]) - self.batch.prompt_lens[row] + 1
        return row in self.forced or self.decoder.tier.due(output_index, state.reroute_every)

    def install_all(self, layer_names: list[str]) -> None:
        """A step that moves no rows: install every routed layer's compacted attention
        now, before the (compiled) forward runs."""
        for start in self.boundaries[1:-1]:
            seg = self.segment(start)
            if seg is None or not seg.slot_mapping:
                continue
            if seg.active_rows is not None:  # only padding rows may be inactive here
                assert int(seg.active_rows.numel()) == self.batch.num_rows
            for idx in range(seg.start, seg.end):
                gid = self.decoder.groups.of_layer(idx).gid
                vllm_view.install_layer_attention(
                    layer_names[idx],
                    seg.attn_metadata[gid],
                    _padded(seg.slot_mapping[gid], self.num_rows),
                )

    # -- classification -------------------------------------------------------------

    def _classify(self, row: int, req_id: str) -> None:
        dec, batch = self.decoder, self.batch
        start, end = int(batch.qsl[row]), int(batch.qsl[row + 1])
        computed = int(batch.num_computed[row])
        prompt_len = batch.prompt_lens[row]
        if computed > 0:
            state = dec.store.get(req_id)
            if state is not None:
                if any(state.deferred):
                    self.decodes[row] = state
                return
            # No state: an unrouted request's decode, a later chunk of a split prompt, or a
            # prompt after a prefix-cache hit. Only a prompt whose images all lie ahead can
            # still be routed (kv/manager.py caches routed stages before the first image
            # only, so a hit never reaches one).
            if computed >= prompt_len:
                return
            first_image = self._first_image(req_id)
            if first_image is None or first_image < computed:
                return
        dec.store.forget([req_id])  # a new or recomputed (preempted) request starts afresh
        cfg = dec.config_of(self.runner, req_id)
        if not cfg.enabled:
            return
        prompt_len -= computed  # the prompt rows in this step (after a prefix-cache hit)
        if end - start < prompt_len:
            # Counted once per prompt: by the chunk that holds its first image.
            first_image = self._first_image(req_id)
            if first_image is not None and first_image < computed + end - start:
                dec.ledger.record({"chunked_fallbacks": 1})
                logger.warning(
                    "vllm-recroute: request %s prompt split by chunked prefill; running it "
                    "unrouted (set recroute.chunked_prefill='off' to keep prompts whole)",
                    req_id,
                )
            return
        # The last prompt token is never routed: its logits are sampled.
        ids = batch.token_ids[start : start + prompt_len - 1]
        is_visual = ids == dec.image_token_id
        if not bool(is_visual.any()):
            return
        visual_rows = torch.nonzero(is_visual).flatten() + start
        stages = resolve_stages(cfg, dec.num_layers, int(visual_rows.numel()))
        if not stages:
            return
        self.prefills.append(
            PrefillRoute(req_id, row, start, start + prompt_len, visual_rows, stages, cfg)
        )

    def _first_image(self, req_id: str) -> int | None:
        return vllm_view.first_image_offset(vllm_view.worker_request(self.runner, req_id))

    # -- scoring at the layer before a router point ----------------------------------

    def score_before(
        self,
        layer_idx: int,
        layer: Any,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> None:
        """Decide active sets, run before layer_idx on its input: of stages starting at
        layer_idx + 1 for requests scored ``before`` their router point, and of stages
        starting at layer_idx for those scored ``at`` it (``score_layer``).

        Scores are computed on the activations' device; this layer's scores (every
        request's, reduced over TP ranks) cross to the host in one copy, and the decision
        is made there (the device rule, docs/architecture.md "GPU path")."""
        todo = [
            (p, k)
            for p in self.prefills
            for k, s in enumerate(p.stages)
            if scoring_layer(s.start, p.cfg.score_layer) == layer_idx
        ]
        if not todo:
            return
        on_device = [
            self._scores_on_device(route, layer, positions, hidden, residual) for route, _ in todo
        ]
        # every rank scores its own head shard: the mean over ranks is the model's
        scores = self.decoder.tp.mean(torch.cat(on_device)).cpu()
        sizes = [int(t.numel()) for t in on_device]
        for (route, k), route_scores in zip(todo, scores.split(sizes), strict=True):
            self._decide(route, k, route_scores)
        for router in sorted({r.stages[k].start for r, k in todo}):
            at = [(r, k) for r, k in todo if r.stages[k].start == router]
            self.decoder.check.verify(
                router, [r.req_id for r, _ in at], [r.masks[k] for r, k in at]
            )

    def _scores_on_device(self, route: PrefillRoute, layer, positions, hidden, residual):
        rows = slice(route.start, route.prompt_end)  # a request's rows are contiguous
        x = hidden[rows] if residual is None else hidden[rows] + residual[rows]
        q, kk, _, scale = project_qkv(layer, _rows_of(positions, rows), x)
        vis = route.visual_rows - route.start
        n = route.prompt_end - route.start
        inputs = ScoreInputs(q, kk, vis, query_indices(n, vis, route.cfg.score_query), scale)
        return get_scorer(route.cfg.scorer).score(inputs)

    def _decide(self, route: PrefillRoute, k: int, scores: torch.Tensor) -> None:
        """One request's active set at its k-th stage, from host scores."""
        num_visual = int(route.visual_rows.numel())
        mask = route_with(
            route.cfg,
            scores,
            num_keep(route.stages[k].keep, num_visual),
            route.masks[k - 1] if k > 0 else None,
            self._block_ids(route, int(self.batch.num_computed[route.row])),
        )
        route.masks.append(mask)
        route.scores.append(scores)
        if len(route.masks) == len(route.stages):
            self._remember(route)

    @staticmethod
    def _block_ids(route: PrefillRoute, computed: int) -> torch.Tensor | None:
        """granularity 'block': the routing unit of each visual token (its sequence index
        // size). From the sequence index, not the RoPE positions: M-RoPE positions of an
        image's tokens are grid coordinates (every token of an image shares its temporal
        one), not KV slots."""
        if route.cfg.granularity != "block":
            return None
        seq = computed + (route.visual_rows - route.start)
        return seq.long() // route.cfg.block_size

    def _remember(self, route: PrefillRoute) -> None:
        dec = self.decoder
        v = int(route.visual_rows.numel())
        deferred = tuple(v - int(m.sum()) for m in route.masks)
        every = decode_reroute_every(route.cfg)
        dec.store.put(route.req_id, RouteState(route.stages, deferred, every))
        if dec.kv_release:  # spec stage k+1 = this request's k-th routed stage
            dec.outbox.report(route.req_id, {k + 1: d for k, d in enumerate(deferred)})
        deferred_layers = sum(
            d * (s.end - s.start) for s, d in zip(route.stages, deferred, strict=True)
        )
        cost = dec.cost
        dec.ledger.record(
            {
                "routed_requests": {f"{route.cfg.mode}/{route.cfg.schedule}": 1},
                "visual_tokens": v,
                "visual_token_layers": v * dec.num_layers,
                "deferred_visual_token_layers": deferred_layers,
                "decoder_flops_saved": cost.flops_per_token_layer * deferred_layers,
                "kv_bytes_saved": cost.kv_bytes_per_token_layer * deferred_layers,
                "stage_visual_tokens": {str(k + 1): v for k in range(len(deferred))},
                "stage_active_visual_tokens": {str(k + 1): v - d for k, d in enumerate(deferred)},
            }
        )

    # -- parked tier (worker/parking.py) ------------------------------------------------

    def tier_before(
        self, layer_idx: int, positions: torch.Tensor, hidden: torch.Tensor, residual: Any
    ) -> None:
        """At a stage's first layer: park its deferred units (prefill), or re-route a
        decoding request's units when due. Runs before the layer writes any KV."""
        for route in self.prefills:
            for k, stage in enumerate(route.stages):
                if stage.start == layer_idx and route.cfg.mode == "reroute":
                    self._park(route, k, positions, hidden, residual)
        for row, state in self.decodes.items():
            due = self._due(row, state)
            for k, stage in enumerate(state.stages):
                if stage.start == layer_idx and due:
                    self._reroute(row, k, stage, positions, hidden, residual)

    def _park(self, route: PrefillRoute, k: int, positions, hidden, residual) -> None:
        tier = self.decoder.tier
        vis = route.visual_rows
        mask = route.masks[k]
        # Compacted position of each prompt row at this stage: the cached prefix (never
        # deferred) plus its rank among the step's active rows.
        active = torch.ones(route.prompt_end - route.start, dtype=torch.bool, device="cpu")
        active[(vis - route.start)[~mask]] = False  # host bookkeeping (the device rule)
        ctx = int(self.batch.num_computed[route.row])
        cpos = (ctx + torch.cumsum(active.long(), 0) - 1)[vis - route.start]
        stage = route.stages[k]
        delta = tier.park_prefill(
            route.req_id,
            k,
            stage.start,
            stage.end,
            take_positions(positions, vis),
            hidden[vis] + residual[vis],
            mask,
            cpos,
            route.scores[k],
        )
        self.decoder.ledger.record(delta, tier.gauges())

    def _reroute(self, row: int, k: int, stage: Stage, positions, hidden, residual) -> None:
        dec = self.decoder
        end = int(self.batch.qsl[row + 1])
        last = slice(end - 1, end)  # the request's last row
        x = hidden[last] + residual[last]
        q, _, _, scale = project_qkv(dec.layers[stage.start], _rows_of(positions, last), x)
        pages = []
        for i in range(stage.start, stage.end):
            group = dec.groups.of_layer(i)
            pages.append(PageRow(self.tables(group.gid)[row], group.block_size))
        # the plan is made on the host (a few digests per unit): one small copy
        delta = dec.tier.reroute(self.batch.req_ids[row], k, q[0].cpu(), scale, pages)
        dec.ledger.record(delta, dec.tier.gauges())

    # -- segments ---------------------------------------------------------------------

    def segment(self, layer_idx: int) -> Segment | None:
        """The segment containing layer_idx, built on first use (after its scoring)."""
        start = max(b for b in self.boundaries if b <= layer_idx)
        if start == 0:
            return None  # stage 0: every token, vLLM's own metadata
        seg = self._segments.get(start)
        if seg is None:
            end = min(b for b in self.boundaries if b > layer_idx)
            seg = self._build_segment(start, end)
            self._segments[start] = seg
        return seg

    def device_rows(self, seg: Segment, device: torch.device) -> torch.Tensor:
        """The segment's active rows on the activations' device: the gather/scatter index
        of every layer of the segment. Normally carried by the segment's packed metadata
        copy (``compact_segment``); else copied once per segment and step."""
        if seg.device_rows is not None and seg.device_rows.device == device:
            return seg.device_rows
        rows = self._device_rows.get(seg.start)
        if rows is None:
            assert seg.active_rows is not None
            rows = seg.active_rows.to(device, non_blocking=True)
            self._device_rows[seg.start] = rows
        return rows

    def run_on_rows(self, inner, seg: Segment, positions, hidden, residual, *args, **kwargs):
        """Run one layer (``inner``) on the segment's active rows only; deferred rows carry
        their (hidden, residual) unchanged. Gather and scatter on the activations' device."""
        rows = self.device_rows(seg, hidden.device)
        h, r = inner(take_positions(positions, rows), hidden[rows], residual[rows], *args, **kwargs)
        return hidden.index_copy(0, rows, h), residual.index_copy(0, rows, r)

    def segment_rows(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Host bookkeeping of the segment starting at ``start``: which step rows run it
        (bool per row) and, per request, the tokens absent from its KV before this step."""
        active = torch.ones(self.num_rows, dtype=torch.bool, device="cpu")
        active[self.batch.num_rows :] = False  # padding rows, if any
        offsets = torch.zeros(self.batch.num_reqs, dtype=torch.long, device="cpu")
        for route in self.prefills:
            k = stage_at(route.stages, start)
            if k is not None:
                active[route.visual_rows[~route.masks[k]]] = False
        for row, state in self.decodes.items():
            k = stage_at(state.stages, start)
            if k is not None:
                offsets[row] = state.deferred[k]
        return active, offsets

    def _build_segment(self, start: int, end: int) -> Segment:
        # host bookkeeping (crosses to the device once, in compact_segment and device_rows)
        active, offsets = self.segment_rows(start)
        if bool(active.all()) and not bool(offsets.any()):
            return Segment(start, end, None)
        active_rows = None if bool(active.all()) else torch.nonzero(active).flatten()
        seg = Segment(start, end, active_rows)
        groups = self.decoder.groups.of_layers(start, end)
        compact_segment(seg, self.batch, active, offsets, groups, self.tables)
        return seg


def _rows_of(positions: torch.Tensor, rows: slice) -> torch.Tensor:
    """Positions of a contiguous row range (a view: no index tensor crosses to the
    device); M-RoPE positions are ``[3, T]``."""
    return positions[:, rows] if positions.dim() == 2 else positions[rows]


def _padded(slot_mapping: torch.Tensor, num_rows: int) -> torch.Tensor:
    """A compiled step may carry padding rows (CUDA graph sizes): they write nowhere
    (slot -1, vLLM's PAD_SLOT_ID)."""
    pad = num_rows - int(slot_mapping.numel())
    if pad <= 0:
        return slot_mapping
    return torch.cat([slot_mapping, slot_mapping.new_full((pad,), -1)])

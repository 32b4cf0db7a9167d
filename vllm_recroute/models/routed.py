"""The routed decoder: where routing decisions are applied inside a vLLM model.

The *decision* (scores, top-k) lives in `vllm_recroute.routing`; this module applies it
to a vLLM decoder stack, generically over decoder layers with the usual vLLM signature
`layer(positions, hidden_states, residual) -> (hidden_states, residual)`.

One step, three requests (t = text, v = visual, . = deferred at that stage):

    rows of the step:    r0 (prefill)           r1 (decode)   r2 (prefill)
    stage 0 layers:      t t v v v v v v t t    t             t v v v v t
    router point 1       scores for r0's and r2's visual tokens, taken at the layer
                         just before the router point, from the residual stream
    stage 1 layers:      t t v . v . . v t t    t             t . v v . t
    stage 2 layers:      t t . v v . v . t t    t             t v . v . t   (reroute:
                         a token deferred at stage 1 may be active again)

Deferred rows skip the stage's layers: their (hidden, residual) pair is carried
unchanged. Inside a stage, attention sees only active tokens because each stage's
layers get their own *compacted* view of the KV cache: a request's active tokens are
written at positions 0, 1, 2, ... of its (unchanged) block table, so the stage's KV holds
exactly the active set and `seq_lens` counts only it. Keys are cached after RoPE with
their original positions, so compaction shifts no position. A request in decode keeps
writing at `num_computed - deferred[stage]`, where `deferred` is remembered per request
from its prefill (RouteStore). The stage's attention metadata is rebuilt through the
layer group's own metadata builder, so any vLLM attention backend works unchanged.

A prompt is routed only if its whole prompt is in the step (question-conditioned scores
need the question). A prompt split by chunked prefill runs unrouted, counted in
the `chunked_fallbacks` counter: never silently routed on partial information.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_recroute.config import RoutingConfig
from vllm_recroute.metrics.accounting import add_into, empty_data
from vllm_recroute.models.projections import project_qkv
from vllm_recroute.patches import apply_patches, current_step, on_requests_gone
from vllm_recroute.request_options import routing_for_request
from vllm_recroute.routing import (
    ScoreInputs,
    Stage,
    get_scorer,
    num_keep,
    query_indices,
    resolve_stages,
    route_request,
    stage_at,
)

logger = logging.getLogger("vllm_recroute")


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class RouteState:
    """What a routed request must remember between steps (worker side)."""

    stages: tuple[Stage, ...]
    deferred: tuple[int, ...]  # per stage: this request's tokens absent from the stage's KV
    reroute_every: int = 0  # parked tier: decode steps between re-routings (0 = never)


class RouteStore:
    """Per-request routing state and the worker's routing accounting.

    State is forgotten when vLLM says a request finished or was preempted. Accounting
    (metrics/accounting.py) is kept twice: `totals` since start (tests, /stats) and
    `pending`, the delta not yet reported to the front end (drained by the stats
    connector, metrics/connector.py).
    """

    def __init__(self) -> None:
        self._states: dict[str, RouteState] = {}
        self.totals = empty_data()
        self._pending = empty_data()
        # kv_release: per (request, KV group), block-table row indices whose pages the
        # scheduler released (vllm_recroute/kv/manager.py); and deferred counts per stage
        # not yet reported to the scheduler.
        self.dead_rows: dict[tuple[str, int], set[int]] = {}
        self._deferred_reports: dict[str, dict[int, int]] = {}
        self.forget_hooks: list[Any] = []  # called with the forgotten ids (parked tier)
        # Later-turn restore (models/turns.py): finished requests are held, state and parked
        # units intact, until this step's turn jobs ran (None: off, forget at once).
        self.held: set[str] | None = None
        self.reroute_now: set[str] = set()  # re-route at the next forward (a loaded turn)
        _STORES.append(self)

    def get(self, req_id: str) -> RouteState | None:
        return self._states.get(req_id)

    def put(self, req_id: str, state: RouteState) -> None:
        self._states[req_id] = state

    def forget(self, req_ids: Iterable[str]) -> None:
        gone = set(req_ids)
        if self.held is not None:
            hold = {r for r in gone if r in self._states}
            self.held |= hold
            gone -= hold
        self._forget_now(gone)

    def release_held(self) -> None:
        """Forget the held requests now (their turn jobs, if any, have run)."""
        if self.held:
            held, self.held = self.held, set()
            self._forget_now(held)

    def _forget_now(self, gone: set[str]) -> None:
        self.reroute_now -= gone
        for req_id in gone:
            self._states.pop(req_id, None)
            self._deferred_reports.pop(req_id, None)
        if self.dead_rows:
            for key in [k for k in self.dead_rows if k[0] in gone]:
                del self.dead_rows[key]
        for hook in self.forget_hooks:
            hook(gone)

    def report_deferred(self, req_id: str, per_stage: dict[int, int]) -> None:
        self._deferred_reports[req_id] = dict(per_stage)

    def drain_deferred(self) -> dict[str, dict[int, int]]:
        out, self._deferred_reports = self._deferred_reports, {}
        return out

    def apply_released(self, req_id: str, gid: int, row_indices: Iterable[int]) -> None:
        if req_id in self._states:  # else finished/preempted meanwhile: nothing to mirror
            self.dead_rows.setdefault((req_id, gid), set()).update(row_indices)

    def record(self, delta: dict[str, Any]) -> None:
        add_into(self.totals, delta)
        add_into(self._pending, delta)

    def drain(self) -> dict[str, Any]:
        out, self._pending = self._pending, empty_data()
        return out

    def __len__(self) -> int:
        return len(self._states)


# Stores of the routed models in this process (one per model; the stats connector drains
# them without a reference to the model).
_STORES: list[RouteStore] = []


def drain_deferred_reports() -> dict[str, dict[int, int]]:
    """kv_release: request -> {stage: deferred tokens} decided since the last call."""
    out: dict[str, dict[int, int]] = {}
    for store in _STORES:
        out.update(store.drain_deferred())
    return out


def apply_released_blocks(events: Iterable[Any]) -> None:
    """kv_release: mirror the scheduler's page releases (kv/manager.ReleasedBlocks)."""
    for event in events:
        for store in _STORES:
            store.apply_released(event.request_id, event.kv_cache_group_id, event.row_indices)


_TURN_STORES: list[Any] = []  # models/turns.TurnStore of this process's routed models


def apply_turn_jobs(evicted: list[int], saves: list[Any], loads: list[Any]) -> set[str]:
    """Later-turn restore: run this step's jobs (kv/turn_index.py); returns the requests
    whose held pages may now be freed."""
    sent: set[str] = set()
    for turns in _TURN_STORES:
        turns.apply(evicted, saves, loads)
        sent |= turns.take_sent()
    return sent


def drain_route_stats() -> dict[str, Any]:
    """Accounting not yet reported, summed over this process's routed models."""
    out = empty_data()
    for store in _STORES:
        add_into(out, store.drain())
    return out


# --------------------------------------------------------------------------- per step


@dataclass
class PrefillRoute:
    """A request whose whole prompt is in this step and gets routed now."""

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
class Segment:
    """Layers [start, end) over which every request's active set is constant."""

    start: int
    end: int
    active_rows: torch.Tensor | None  # None: every row active
    attn_metadata: dict[int, Any] = field(default_factory=dict)  # kv group -> metadata
    slot_mapping: dict[int, torch.Tensor] = field(default_factory=dict)  # empty: vLLM's own


class StepRouter:
    """Routing of one forward pass; built at layer 0 from the step's batch."""

    def __init__(self, decoder: RoutedDecoder, step: Any, num_rows: int) -> None:
        self.decoder = decoder
        runner = step.runner
        batch = runner.input_batch
        n = batch.num_reqs
        self.runner = runner
        self.num_reqs = n
        self.num_rows = num_rows
        self.qsl = runner.query_start_loc.cpu[: n + 1].to(torch.long)
        self.num_computed = torch.as_tensor(batch.num_computed_tokens_cpu[:n], dtype=torch.long)
        self.req_ids = list(batch.req_ids[:n])
        self.prompt_lens = [int(p) for p in batch.num_prompt_tokens[:n]]
        self.prefills: list[PrefillRoute] = []
        self.decodes: dict[int, RouteState] = {}  # batch row -> state
        self._segments: dict[int, Segment] = {}
        self._tables: dict[int, torch.Tensor] = {}  # kv group -> this step's block table
        token_ids = runner.input_ids.cpu[: int(self.qsl[-1])]
        prompts = batch.num_prompt_tokens[:n]
        for row, req_id in enumerate(batch.req_ids[:n]):
            self._classify(row, req_id, token_ids, int(prompts[row]))
        starts = {s.start for p in self.prefills for s in p.stages}
        starts |= {s.start for st in self.decodes.values() for s in st.stages}
        # loaded later turns re-route once, at this forward, for their own question
        pending = decoder.store.reroute_now
        self.forced = {row for row in self.decodes if self.req_ids[row] in pending}
        pending -= {self.req_ids[row] for row in self.forced}
        self.boundaries = sorted(starts | {0, decoder.num_layers})
        self.stage_starts = starts
        self.active = bool(self.prefills or self.decodes)

    # -- classification -------------------------------------------------------------

    def _classify(self, row: int, req_id: str, token_ids: torch.Tensor, prompt_len: int) -> None:
        store = self.decoder.store
        start, end = int(self.qsl[row]), int(self.qsl[row + 1])
        computed = int(self.num_computed[row])
        if computed > 0:
            state = store.get(req_id)
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
        store.forget([req_id])  # a new or recomputed (preempted) request starts afresh
        cfg = routing_for_request(self.decoder.config, self.runner, req_id)
        if not cfg.enabled:
            return
        prompt_len -= computed  # the prompt rows in this step (after a prefix-cache hit)
        if end - start < prompt_len:
            # Counted once per prompt: by the chunk that holds its first image.
            first_image = self._first_image(req_id)
            if first_image is not None and first_image < computed + end - start:
                store.record({"chunked_fallbacks": 1})
                logger.warning(
                    "vllm-recroute: request %s prompt split by chunked prefill; running it "
                    "unrouted (set recroute.chunked_prefill='off' to keep prompts whole)",
                    req_id,
                )
            return
        # The last prompt token is never routed: its logits are sampled.
        is_visual = token_ids[start : start + prompt_len - 1] == self.decoder.image_token_id
        if not bool(is_visual.any()):
            return
        visual_rows = torch.nonzero(is_visual).flatten() + start
        stages = resolve_stages(cfg, self.decoder.num_layers, int(visual_rows.numel()))
        if not stages:
            return
        self.prefills.append(
            PrefillRoute(req_id, row, start, start + prompt_len, visual_rows, stages, cfg)
        )

    def _first_image(self, req_id: str) -> int | None:
        """Prompt position where the request's first multimodal item starts (None: none)."""
        feats = getattr(self.runner.requests.get(req_id), "mm_features", None) or ()
        offsets = [f.mm_position.offset for f in feats]
        return min(offsets) if offsets else None

    # -- scoring at the layer before a router point ----------------------------------

    def score_before(
        self,
        layer_idx: int,
        layer: Any,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> None:
        """Decide active sets of stages starting at layer_idx + 1 (run before layer_idx)."""
        router = layer_idx + 1
        todo = [(p, k) for p in self.prefills for k, s in enumerate(p.stages) if s.start == router]
        for route, k in todo:
            rows = torch.arange(route.start, route.prompt_end)
            x = hidden[rows] if residual is None else hidden[rows] + residual[rows]
            q, kk, scale = _query_keys(layer, _take_positions(positions, rows), x)
            vis = route.visual_rows - route.start
            inputs = ScoreInputs(
                q=q,
                k=kk,
                visual_idx=vis,
                query_idx=query_indices(int(rows.numel()), vis, route.cfg.score_query),
                scale=scale,
            )
            scores = get_scorer(route.cfg.scorer).score(inputs)
            prev = route.masks[k - 1] if k > 0 else None
            block_ids = None
            if route.cfg.granularity == "block":
                block_ids = _take_positions(positions, route.visual_rows)
                block_ids = block_ids[0] if block_ids.dim() == 2 else block_ids
                block_ids = block_ids.long() // route.cfg.block_size
            mask = route_request(
                scores,
                num_keep(route.stages[k].keep, int(vis.numel())),
                route.cfg.mode,
                prev,
                block_ids=block_ids,
                block_reduce=route.cfg.block_reduce,
            )
            route.masks.append(mask)
            route.scores.append(scores)
            if len(route.masks) == len(route.stages):
                self._remember(route)

    def _remember(self, route: PrefillRoute) -> None:
        v = int(route.visual_rows.numel())
        deferred = tuple(v - int(m.sum()) for m in route.masks)
        every = route.cfg.reroute_every if route.cfg.mode == "reroute" else 0
        self.decoder.store.put(route.req_id, RouteState(route.stages, deferred, every))
        if self.decoder.kv_release:  # spec stage k+1 = this request's k-th routed stage
            self.decoder.store.report_deferred(
                route.req_id, {k + 1: d for k, d in enumerate(deferred)}
            )
        deferred_layers = sum(
            d * (s.end - s.start) for s, d in zip(route.stages, deferred, strict=True)
        )
        cost = self.decoder.cost
        self.decoder.store.record(
            {
                "routed_requests": {f"{route.cfg.mode}/{route.cfg.schedule}": 1},
                "visual_tokens": v,
                "visual_token_layers": v * self.decoder.num_layers,
                "deferred_visual_token_layers": deferred_layers,
                "decoder_flops_saved": cost.flops_per_token_layer * deferred_layers,
                "kv_bytes_saved": cost.kv_bytes_per_token_layer * deferred_layers,
                "stage_visual_tokens": {str(k + 1): v for k in range(len(deferred))},
                "stage_active_visual_tokens": {str(k + 1): v - d for k, d in enumerate(deferred)},
            }
        )

    # -- parked tier (models/parking.py) ------------------------------------------------

    def tier_before(
        self, layer_idx: int, positions: torch.Tensor, hidden: torch.Tensor, residual: Any
    ) -> None:
        """At a stage's first layer: park its deferred units (prefill), or re-route a
        decoding request's units when due. Runs before the layer writes any KV."""
        tier = self.decoder.tier
        for route in self.prefills:
            for k, stage in enumerate(route.stages):
                if stage.start == layer_idx and route.cfg.mode == "reroute":
                    self._park(tier, route, k, positions, hidden, residual)
        for row, state in self.decodes.items():
            output_index = int(self.num_computed[row]) - self.prompt_lens[row] + 1
            due = row in self.forced or tier.due(output_index, state.reroute_every)
            for k, stage in enumerate(state.stages):
                if stage.start == layer_idx and due:
                    self._reroute(tier, row, k, stage, positions, hidden, residual)

    def _park(self, tier, route: PrefillRoute, k: int, positions, hidden, residual) -> None:
        vis = route.visual_rows
        mask = route.masks[k]
        # Compacted position of each prompt row at this stage: the cached prefix (never
        # deferred) plus its rank among the step's active rows.
        active = torch.ones(route.prompt_end - route.start, dtype=torch.bool)
        active[(vis - route.start)[~mask]] = False
        ctx = int(self.num_computed[route.row])
        cpos = (ctx + torch.cumsum(active.long(), 0) - 1)[vis - route.start]
        stage = route.stages[k]
        delta = tier.park_prefill(
            route.req_id,
            k,
            stage.start,
            stage.end,
            _take_positions(positions, vis),
            hidden[vis] + residual[vis],
            mask,
            cpos,
            route.scores[k],
        )
        self.decoder.store.record({**delta, **tier.gauges()})

    def _reroute(self, tier, row: int, k: int, stage: Stage, positions, hidden, residual) -> None:
        from vllm_recroute.models.parking import PageRow

        r = torch.tensor([int(self.qsl[row + 1]) - 1])  # the request's last row in the step
        x = hidden[r] + residual[r]
        layer = self.decoder.layers[stage.start]
        q, _, scale = _query_keys(layer, _take_positions(positions, r), x)
        pages = []
        for i in range(stage.start, stage.end):
            gid = self.decoder.group_of(self.runner, i)
            block_size, _ = self.decoder.group_info[gid]
            pages.append(PageRow(self._block_table(gid, self.num_reqs)[row], block_size))
        delta = tier.reroute(self.req_ids[row], k, q[0], scale, pages)
        self.decoder.store.record({**delta, **tier.gauges()})

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

    def _build_segment(self, start: int, end: int) -> Segment:
        active = torch.ones(self.num_rows, dtype=torch.bool)
        active[int(self.qsl[-1]) :] = False  # padding rows, if any
        offsets = torch.zeros(self.num_reqs, dtype=torch.long)
        for route in self.prefills:
            k = stage_at(route.stages, start)
            if k is not None:
                active[route.visual_rows[~route.masks[k]]] = False
        for row, state in self.decodes.items():
            k = stage_at(state.stages, start)
            if k is not None:
                offsets[row] = state.deferred[k]
        if bool(active.all()) and not bool(offsets.any()):
            return Segment(start, end, None)
        active_rows = None if bool(active.all()) else torch.nonzero(active).flatten()
        seg = Segment(start, end, active_rows)
        self._compact_metadata(seg, active, offsets)
        return seg

    def _compact_metadata(self, seg: Segment, active: torch.Tensor, offsets: torch.Tensor) -> None:
        from vllm.v1.attention.backend import CommonAttentionMetadata

        n = self.num_reqs
        rows = int(self.qsl[-1])
        req_of_step_row = torch.repeat_interleave(torch.arange(n), self.qsl.diff())
        counts = torch.zeros(n, dtype=torch.long).index_add_(
            0, req_of_step_row, active[:rows].long()
        )
        qsl = torch.zeros(n + 1, dtype=torch.int32)
        qsl[1:] = torch.cumsum(counts, 0)
        ctx = self.num_computed - offsets
        seq_lens = (ctx + counts).to(torch.int32)
        req_of_row = torch.repeat_interleave(torch.arange(n), counts)
        rank = torch.arange(int(qsl[-1])) - qsl[:-1].long()[req_of_row]
        pos = ctx[req_of_row] + rank
        for gid in self.decoder.groups_of_layers(self.runner, seg.start, seg.end):
            block_size, attn_group = self.decoder.group_info[gid]
            table = self._block_table(gid, n)
            blocks = table[req_of_row, pos // block_size].long()
            slots = blocks * block_size + pos % block_size
            device = self.runner.input_batch.block_table[gid].get_device_tensor(n).device
            cm = CommonAttentionMetadata(
                query_start_loc=qsl.to(device),
                query_start_loc_cpu=qsl,
                seq_lens=seq_lens.to(device),
                seq_lens_cpu_upper_bound=seq_lens,
                num_reqs=n,
                num_actual_tokens=int(qsl[-1]),
                max_query_len=int(counts.max()) if n else 0,
                max_seq_len=int(seq_lens.max()) if n else 0,
                block_table_tensor=table.to(device),
                slot_mapping=slots.to(device),
                causal=True,
                is_prefilling=self.num_computed == 0,
            )
            seg.attn_metadata[gid] = attn_group.build_metadata(cm)
            seg.slot_mapping[gid] = cm.slot_mapping

    def _block_table(self, gid: int, n: int) -> torch.Tensor:
        """The group's block table (CPU), with released pages removed from each row when
        kv_release is on: a row's live entries, in order, hold compacted positions.
        Built once per group and step."""
        table = self._tables.get(gid)
        if table is None:
            table = self._tables[gid] = self._live_table(gid, n)
        return table

    def _live_table(self, gid: int, n: int) -> torch.Tensor:
        bt = self.runner.input_batch.block_table[gid]
        dead = self.decoder.store.dead_rows
        if not dead:
            return bt.get_cpu_tensor()[:n]
        table = bt.get_cpu_tensor()[:n].clone()
        for r, req_id in enumerate(self.runner.input_batch.req_ids[:n]):
            rows = dead.get((req_id, gid))
            if rows:
                width = int(bt.num_blocks_per_row[r])
                live = [i for i in range(width) if i not in rows]
                table[r].zero_()
                table[r, : len(live)] = bt.get_cpu_tensor()[r, live]
        return table


# --------------------------------------------------------------------------- decoder


@dataclass(frozen=True)
class LayerCost:
    """Per token and decoder layer: what a deferred token does not spend (estimates)."""

    flops_per_token_layer: int  # 2 x weights of one decoder layer (matmul FLOPs)
    kv_bytes_per_token_layer: int  # K and V of one token in one layer

    @classmethod
    def of(cls, layer: Any, vllm_config: Any) -> LayerCost:
        tp = vllm_config.parallel_config.tensor_parallel_size  # weights are sharded by tp
        params = sum(p.numel() for p in layer.parameters()) * tp
        attn = layer.self_attn
        itemsize = torch.empty((), dtype=vllm_config.model_config.dtype).element_size()
        return cls(2 * params, 2 * attn.kv_size * tp * itemsize)


class RoutedDecoder:
    """Installs routing on a vLLM decoder stack (`model.layers`), without renaming weights.

    Each decoder layer's `forward` is wrapped on the instance (module names, and so
    weight loading, are untouched).
    """

    def __init__(self, text_model: Any, vllm_config: Any, image_token_id: int) -> None:
        from vllm_recroute.models.config_hook import check_routing_requirements

        apply_patches()
        self.config = check_routing_requirements(vllm_config)
        self.image_token_id = int(image_token_id)
        self.layers = list(text_model.layers)
        self.num_layers = len(self.layers)
        self.store = RouteStore()
        self.cost = LayerCost.of(self.layers[0], vllm_config)
        on_requests_gone(self.store.forget)
        self._step: StepRouter | None = None
        self.group_of_layer: dict[str, int] = {}
        self.group_info: dict[int, tuple[int, Any]] = {}
        self._layer_names = [_attn_layer_name(layer) for layer in self.layers]
        self.kv_release = self.config.kv_release
        self.stage_of_layer: dict[str, int] = {}
        if self.kv_release:
            self._report_stage_specs()
        self.tier = None
        if self.config.parked_bytes > 0:
            from vllm_recroute.models.parking import ParkingTier

            self.tier = ParkingTier(self.config, self.layers)
            self.store.forget_hooks.append(self._forget_parked)
        self.turns = None
        self.runner: Any = None  # the model runner, known from the first forward
        if self.config.turn_cache_bytes > 0:
            from vllm_recroute.models.turns import TurnStore

            self.turns = TurnStore(self)
            self.store.held = set()
            _TURN_STORES.append(self.turns)
        for idx, layer in enumerate(self.layers):
            layer.forward = self._wrap(idx, layer, layer.forward)

    def _forget_parked(self, req_ids: set[str]) -> None:
        delta = self.tier.forget(sorted(req_ids))
        if delta:
            self.store.record({**delta, **self.tier.gauges()})

    def _report_stage_specs(self) -> None:
        """kv_release: each layer reports its routing stage in its KV-cache spec, so vLLM
        gives every stage its own group(s) and RoutedStageManager (kv/spec.py)."""
        from vllm_recroute.kv.spec import stage_spec_from
        from vllm_recroute.routing import router_points

        points = router_points(self.config, self.num_layers)
        for idx, layer in enumerate(self.layers):
            stage = sum(1 for p in points if p <= idx)
            self.stage_of_layer[self._layer_names[idx]] = stage
            attn = layer.self_attn.attn
            inner = attn.get_kv_cache_spec

            def get_kv_cache_spec(vllm_config, _inner=inner, _stage=stage):
                spec = _inner(vllm_config)
                return None if spec is None else stage_spec_from(spec, _stage)

            attn.get_kv_cache_spec = get_kv_cache_spec

    def _bind_groups(self, runner: Any) -> None:
        """Which KV-cache group each decoder layer writes (one with kv_release off, one or
        more per routing stage with it on), with the group's block size and attention
        group (its metadata builder)."""
        wanted = set(self._layer_names)
        for gid, attn_groups in enumerate(runner.attn_groups):
            for group in attn_groups:
                for name in wanted & set(group.layer_names):
                    self.group_of_layer[name] = gid
                    spec = runner.kv_cache_config.kv_cache_groups[gid].kv_cache_spec
                    self.group_info[gid] = (spec.block_size, group)
        missing = wanted - set(self.group_of_layer)
        if missing:
            raise RuntimeError(f"vllm-recroute: no KV cache group for layers {sorted(missing)}")
        if self.kv_release:
            from vllm_recroute.kv.spec import check_stage_groups

            # A group mixing stages would put compacted and uncompacted KV in one table.
            check_stage_groups(runner.kv_cache_config.kv_cache_groups, self.stage_of_layer)

    def group_of(self, runner: Any, layer_idx: int) -> int:
        """The KV-cache group that decoder layer ``layer_idx`` writes."""
        if not self.group_of_layer:
            self._bind_groups(runner)
        return self.group_of_layer[self._layer_names[layer_idx]]

    def groups_of_layers(self, runner: Any, start: int, end: int) -> list[int]:
        if not self.group_of_layer:
            self._bind_groups(runner)
        names = self._layer_names[start:end]
        return sorted({self.group_of_layer[n] for n in names})

    def _wrap(self, idx: int, layer: Any, inner: Any) -> Any:
        name = self._layer_names[idx]

        def forward(positions, hidden_states, residual, *args, **kwargs):
            if idx == 0:
                self._step = self._begin_step(hidden_states.shape[0])
            step = self._step
            if step is None:
                return inner(positions, hidden_states, residual, *args, **kwargs)
            step.score_before(idx, layer, positions, hidden_states, residual)
            seg = step.segment(idx)
            if self.tier is not None and idx in step.stage_starts:
                step.tier_before(idx, positions, hidden_states, residual)
            if seg is None or not seg.slot_mapping:
                return inner(positions, hidden_states, residual, *args, **kwargs)
            _install(name, self.group_of_layer[name], seg)
            rows = seg.active_rows
            if rows is None:
                return inner(positions, hidden_states, residual, *args, **kwargs)
            h, r = inner(
                _take_positions(positions, rows),
                hidden_states[rows],
                residual[rows],
                *args,
                **kwargs,
            )
            return hidden_states.index_copy(0, rows, h), residual.index_copy(0, rows, r)

        return forward

    def _begin_step(self, num_rows: int) -> StepRouter | None:
        step = current_step()
        if step is None:
            return None  # dummy/profiling run: plain model
        self.runner = step.runner
        router = StepRouter(self, step, num_rows)
        return router if router.active else None


# --------------------------------------------------------------------------- helpers


def _install(layer_name: str, gid: int, seg: Segment) -> None:
    from vllm.forward_context import get_forward_context

    ctx = get_forward_context()
    if not isinstance(ctx.attn_metadata, dict):
        raise RuntimeError("vllm-recroute: micro-batched attention metadata is not supported")
    ctx.attn_metadata[layer_name] = seg.attn_metadata[gid]
    ctx.slot_mapping[layer_name] = seg.slot_mapping[gid]


def _attn_layer_name(layer: Any) -> str:
    return layer.self_attn.attn.layer_name


def _take_positions(positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    # M-RoPE models (Qwen2.5-VL) carry [3, T] positions through the same gather.
    return positions[:, rows] if positions.dim() == 2 else positions[rows]


def _query_keys(layer: Any, positions: torch.Tensor, x: torch.Tensor):
    """Post-RoPE q and k the layer would compute for residual-stream rows x."""
    q, k, _, scale = project_qkv(layer, positions, x)
    return q, k, scale


__all__ = ["LayerCost", "RouteState", "RouteStore", "RoutedDecoder", "drain_route_stats"]

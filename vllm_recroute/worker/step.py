"""One forward pass of a routed decoder: scoring, decisions, and the routed path.

The routing *decision* is made here, at the layer just before each router point: scores
from `routing/scorers.py`, top-k by `routing/decision.py`. The step's rows come classified
from the runtime (worker/rows.py, read at step start by `WorkerRuntime.begin_step`):

    rows of the step:    r0 (prefill)           r1 (decode)   r2 (prefill)
    stage 0 layers:      t t v v v v v v t t    t             t v v v v t
    router point 1       scores for r0's and r2's visual tokens, taken at the layer
                         just before the router point, from the residual stream
    stage 1 layers:      t t v . v . . v t t    t             t . v v . t
    stage 2 layers:      t t . v v . v . t t    t             t v . v . t   (reroute:
                         a token deferred at stage 1 may be active again)

`StepRouter.run_layer` is the routed path: at a segment's first layer it scores (before
a router point), parks or re-routes (a stage's first layer, parked tier), installs the
segment's compacted attention and runs the segment's layers as one piece (worker/
layer_runs.py: eager, or compiled) on its active rows, gathered once and scattered back
once (worker/segments.py); deferred rows carry their (hidden, residual) pair unchanged. A
step that moves no rows installs every routed layer's attention before the (compiled)
forward instead (`install_all`). Such a step's due decode re-routes (parked tier) run in
the attention op of their stages' first layers (`reroute_from_query`, hooked by the
decoder); on the routed path the query is projected from the layer's input. Parking and
re-routes are worker/step_tier.py's (`StepTier`). Attention inside a stage
sees the active set only (worker/compaction.py).
The state the step changes is the runtime's, through its methods (``remember``,
``record``) and the parked tier's.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from vllm_recroute import vllm_view
from vllm_recroute.routing import (
    ScoreInputs,
    get_scorer,
    num_keep,
    query_indices,
    route_with,
    scoring_layer,
)
from vllm_recroute.routing.reentry import Reentry, reenters
from vllm_recroute.worker.compaction import (
    Segment,
    StepTables,
    padded_slots,
    rows_of,
    take_positions,
)
from vllm_recroute.worker.layer_runs import LayerRuns
from vllm_recroute.worker.rows import PrefillRoute, StepRows
from vllm_recroute.worker.runtime import WorkerRuntime
from vllm_recroute.worker.segments import StepSegments, Stream, gather, materialize, scatter
from vllm_recroute.worker.state import RouteState
from vllm_recroute.worker.step_tier import StepTier

__all__ = ["StepRouter"]


class StepRouter:
    """Routing of one forward pass, over the rows the runtime classified at step start."""

    @classmethod
    def start(
        cls,
        rt: WorkerRuntime,
        runner: Any,
        num_rows: int,
        reroute_in_attention: bool = False,
        runs: LayerRuns | None = None,
    ) -> StepRouter | None:
        """This forward's router, or None when it routes and installs nothing.
        ``reroute_in_attention``: a pure-decode step's re-routes may run inside the
        attention op of their stages' first layers (the decoder hooks it), so the step
        stays the ordinary (compiled) one."""
        if rt.routes_nothing(runner):
            return None
        router = cls(rt, runner, rt.begin_step(runner), num_rows, reroute_in_attention, runs)
        return router if router.active else None

    def __init__(
        self,
        rt: WorkerRuntime,
        runner: Any,
        rows: StepRows,
        num_rows: int,
        reroute_in_attention: bool = False,
        runs: LayerRuns | None = None,
    ) -> None:
        self.rt = rt
        self.runs = runs  # how the routed path runs a segment's layers (the decoder's)
        self.batch = rows.batch
        self.num_rows = num_rows
        self.prefills: list[PrefillRoute] = rows.prefills
        self.decodes: dict[int, RouteState] = rows.decodes  # batch row -> state
        self.forced = rows.forced  # decode rows re-routed at this forward (later turns)
        self._reentries: dict[str, Reentry] = {}  # per prefill request, this forward only
        self.tables = StepTables(runner, self.batch, rt.released)
        starts = {s.start for p in self.prefills for s in p.stages}
        starts |= {s.start for st in self.decodes.values() for s in st.stages}
        self.boundaries = sorted(starts | {0, rt.num_layers})
        self.stage_starts = starts
        self.segs = StepSegments(
            self.batch,
            self.prefills,
            self.decodes,
            rt.groups,
            self.tables,
            num_rows,
            self.boundaries,
        )
        # layers where a prefill request is scored (a segment's piece stops before them)
        self.score_layers = {
            scoring_layer(s.start, p.cfg.score_layer) for p in self.prefills for s in p.stages
        }
        self._ran_to = 0  # the routed path ran every layer below this (its segments' pieces)
        self.moves: Counter[str] = Counter()  # gathers / scatters of this forward (tests)
        self.active = bool(self.prefills or self.decodes)
        # parking and the decode re-routes due at this forward (worker/step_tier.py)
        self.tier = StepTier(rt, self.batch, self.tables, self.decodes, self.forced)
        # Rows move (gathers, scoring, parking) only for a routed prefill: that step runs
        # eager, its re-routes included (StepTier.reroute_eager). Every other routed step is the
        # ordinary (compiled) forward with its compacted attention installed before it; its
        # due re-routes run inside the attention op of their stages' first layers
        # (reroute_from_query), unless that is off (eager, as a prefill).
        due = bool(self.tier.due)
        self.needs_eager = bool(self.prefills) or (due and not reroute_in_attention)
        self.reroutes_in_attention = due and not self.needs_eager

    # -- the two paths: eager routed layers, or attention installed before the forward ------

    def run_layer(self, idx: int, layer: Any, positions, hidden, residual, *a, **kw):
        """The routed path at layer ``idx``. A segment runs whole at its first layer: score
        before a router point, re-enter / park / re-route at a stage's first layer, install
        the segment's compacted attention, then its layers as one piece on its active rows
        (`_run_segment`). The wrappers of its later layers pass the stream on unchanged:
        their layers already ran."""
        if idx < self._ran_to:
            return hidden, residual
        self.score_before(idx, positions, hidden, residual)
        seg = self.segs.at(idx)
        if idx in self.stage_starts:
            hidden, residual = self.reenter(idx, hidden, residual)
            if self.rt.tier is not None:
                self._tier_before(idx, positions, hidden, residual)
        _, end = self.segs.span(idx)
        assert self.runs is not None, "the routed path needs the decoder's layer runs"
        end = min([end, *(b for b in self.runs.breaks if idx < b < end)])
        self._ran_to = end
        return self._run_segment(idx, end, seg, (positions, hidden, residual), a, kw)

    def _run_segment(self, start: int, end: int, seg: Segment | None, stream: Stream, a, kw):
        """Layers ``[start, end)`` on the segment's active rows: one gather, the layers as
        one piece (two around a scoring layer inside, which sees the full stream), one
        scatter. Stage 0, or a segment where every row is active, runs on the stream as is."""
        positions, hidden, residual = stream
        rows = None
        if seg is not None:
            for i in range(start, end):
                self._install(i, seg)
            if seg.active_rows is not None:
                rows = self.segs.device_rows(seg, hidden.device)
        pos, h, r = stream if rows is None else self._count("gather", gather(stream, rows))
        for split in sorted(x for x in self.score_layers if start < x < end):
            h, r = self.runs.run(start, split, pos, h, r, *a, **kw)
            full = materialize((hidden, residual), rows, h, r)
            self._count("materialize", full, rows is not None)
            self.score_before(split, positions, *full)
            start = split
        h, r = self.runs.run(start, end, pos, h, r, *a, **kw)
        if rows is None:
            return h, r
        return self._count("scatter", scatter((hidden, residual), rows, h, r))

    def _count(self, move: str, out: Any, moved: bool = True) -> Any:
        if moved:
            self.moves[move] += 1
        return out

    def install_all(self) -> None:
        """A step that moves no rows: install every routed layer's compacted attention
        now, before the (compiled) forward runs."""
        for start in self.boundaries[1:-1]:
            seg = self.segs.at(start)
            if seg is None or not seg.slot_mapping:
                continue
            if seg.active_rows is not None:  # only padding rows may be inactive here
                assert int(seg.active_rows.numel()) == self.batch.num_rows
            for idx in range(seg.start, seg.end):
                self._install(idx, seg, pad_to=self.num_rows)

    def _install(self, idx: int, seg: Segment, pad_to: int | None = None) -> bool:
        """Layer ``idx``'s compacted attention of ``seg`` into the forward context (False:
        the segment keeps vLLM's own). ``pad_to``: a compiled step's rows, padding
        included (the eager path runs on the segment's rows, unpadded)."""
        if not seg.slot_mapping:
            return False
        gid = self.rt.groups.of_layer(idx).gid
        slots = seg.slot_mapping[gid]
        if pad_to is not None:
            slots = padded_slots(slots, pad_to)
        vllm_view.install_layer_attention(self.rt.layer_names[idx], seg.attn_metadata[gid], slots)
        return True

    # -- scoring at the layer before a router point ----------------------------------

    def score_before(
        self,
        layer_idx: int,
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
            self._scores_on_device(route, layer_idx, positions, hidden, residual)
            for route, _ in todo
        ]
        # every rank scores its own head shard: the mean over ranks is the model's
        scores = self.rt.tp.mean(torch.cat(on_device)).cpu()
        sizes = [int(t.numel()) for t in on_device]
        for (route, k), route_scores in zip(todo, scores.split(sizes), strict=True):
            self._decide(route, k, route_scores)
        for router in sorted({r.stages[k].start for r, k in todo}):
            at = [(r, k) for r, k in todo if r.stages[k].start == router]
            self.rt.check.verify(router, [r.req_id for r, _ in at], [r.masks[k] for r, k in at])

    # -- re-entry of returning tokens (reentry: mean_update; routing/reentry.py) --------

    def reenter(self, idx: int, hidden: torch.Tensor, residual: torch.Tensor | None):
        """At a stage's first layer, after its decision: each returning visual token of a
        ``mean_update`` request gets the mean update the active ones had over the stages
        it skipped. Out of place (``hidden`` may be the runner's input buffer); the sum
        goes into the residual (vLLM's fused-norm form: the stream is hidden + residual)."""
        for route in self.prefills:
            k = next((k for k, s in enumerate(route.stages) if s.start == idx), None)
            if k is None or not reenters(route.cfg):
                continue
            rows = route.visual_rows.to(hidden.device)
            x = hidden[rows] if residual is None else hidden[rows] + residual[rows]
            reentry = self._reentries.setdefault(route.req_id, Reentry())
            update = reentry.at_stage_start(x, route.masks[k])
            if residual is None:
                hidden = hidden.index_add(0, rows, update)
            else:
                residual = residual.index_add(0, rows, update)
        return hidden, residual

    def _scores_on_device(self, route: PrefillRoute, layer_idx: int, positions, hidden, residual):
        """One request's scores at layer ``layer_idx``: keys of all its rows (no queries
        or values projected for them), queries of its query tokens only."""
        rows = slice(route.start, route.prompt_end)  # a request's rows are contiguous
        x = hidden[rows] if residual is None else hidden[rows] + residual[rows]
        pos = rows_of(positions, rows)
        vis = route.visual_rows - route.start
        n = route.prompt_end - route.start
        # the query rows on the activations' device once (the scorer reads them there)
        qi = query_indices(n, vis, route.cfg.score_query).to(x.device, non_blocking=True)
        proj = self.rt.proj
        scorer = get_scorer(route.cfg.scorer)
        kk = proj.keys(layer_idx, pos, x)
        q = self._queries(layer_idx, pos, x, qi, kk) if scorer.needs_queries else None
        return scorer.score(ScoreInputs(q, kk, vis, qi, proj.scale(layer_idx)))

    def _queries(self, layer_idx: int, pos, x, qi: torch.Tensor, kk: torch.Tensor):
        """``[T, heads, dim]`` queries, projected (fused layer) at rows ``qi`` only: the
        scorers read no other row's (ScoreInputs)."""
        q_rows = self.rt.proj.qkv(layer_idx, take_positions(pos, qi), x[qi])[0]
        q = q_rows.new_zeros((kk.shape[0], *q_rows.shape[1:]))
        q[qi] = q_rows
        return q

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
            self.rt.remember(route.req_id, route.cfg, route.stages, route.masks)

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

    # -- parked tier (worker/step_tier.py) ---------------------------------------------

    def _tier_before(self, layer_idx: int, positions, hidden, residual) -> None:
        """At a stage's first layer, before it writes any KV: park the stage's deferred
        units (prefill), then the re-routes due there (eager path)."""
        for route in self.prefills:
            for k, stage in enumerate(route.stages):
                if stage.start == layer_idx and route.cfg.mode == "reroute":
                    self.tier.park(route, k, positions, hidden, residual)
        self.tier.reroute_eager(layer_idx, positions, hidden, residual)

    def reroute_layers(self) -> list[int]:
        """The stage-start layers whose attention op re-routes at this forward
        (``tier.reroute_from_query``; none when the step runs eager: then the routed path
        re-routes at those layers)."""
        return sorted(self.tier.due) if self.reroutes_in_attention else []

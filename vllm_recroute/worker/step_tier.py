"""The parked tier's part of one forward: where a deferred unit is parked (prefill) and
where a decoding request's due re-route runs (worker/parking.py does the pool side).

A routed prefill parks each stage's deferred units at the stage's first layer, before the
layer writes any KV (`park`). A decode re-route is due every ``reroute_every``-th output
(or forced by a later turn); it runs at each of the request's stage-start layers, either
eager on the routed path (`reroute_eager`: the due rows' queries projected from the
layer's input) or inside vLLM's attention op of that layer in a compiled step
(`reroute_from_query`: the op's own post-RoPE query). Both end in one
``ParkingTier.reroute_all`` per layer for every request due there.
"""

from __future__ import annotations

from typing import Any

import torch

from vllm_recroute.routing import Stage
from vllm_recroute.worker.compaction import StepTables, compacted_positions, take_positions
from vllm_recroute.worker.parking import DueReroute
from vllm_recroute.worker.rows import PrefillRoute
from vllm_recroute.worker.runtime import WorkerRuntime
from vllm_recroute.worker.stage_pages import stage_page_rows
from vllm_recroute.worker.state import RouteState

__all__ = ["StepTier"]

Due = list[tuple[int, int, Stage]]  # (batch row, stage index, stage) of each due request


class StepTier:
    """Parking and decode re-routes of one forward. ``due``: stage-start layer -> the
    requests re-routed there at this forward (empty without a parked tier)."""

    def __init__(
        self,
        rt: WorkerRuntime,
        batch: Any,
        tables: StepTables,
        decodes: dict[int, RouteState],
        forced: set[int],
    ) -> None:
        self.rt = rt
        self.batch = batch
        self.tables = tables
        self.forced = forced
        self.due: dict[int, Due] = self._due_reroutes(decodes)

    def _due_reroutes(self, decodes: dict[int, RouteState]) -> dict[int, Due]:
        out: dict[int, Due] = {}
        if self.rt.tier is None:
            return out
        for row, state in decodes.items():
            if self._is_due(row, state):
                for k, stage in enumerate(state.stages):
                    out.setdefault(stage.start, []).append((row, k, stage))
        return out

    def _is_due(self, row: int, state: RouteState) -> bool:
        output_index = int(self.batch.num_computed[row]) - self.batch.prompt_lens[row] + 1
        return row in self.forced or self.rt.tier.due(output_index, state.reroute_every)

    # -- prefill: park a stage's deferred units ------------------------------------------

    def park(self, route: PrefillRoute, k: int, positions, hidden, residual) -> None:
        """Stage ``k``'s deferred units of a prefill request to the tier, from their
        stage-entry state (``hidden + residual``: vLLM's fused-norm stream)."""
        tier = self.rt.tier
        vis = route.visual_rows
        mask = route.masks[k]
        cached = int(self.batch.num_computed[route.row])
        cpos = compacted_positions(route.prompt_end - route.start, vis - route.start, mask, cached)
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
        self.rt.record(delta, tier.gauges())

    # -- decode re-routes ------------------------------------------------------------------

    def reroute_eager(self, layer_idx: int, positions, hidden, residual) -> None:
        """On the routed path at stage-start layer ``layer_idx``: each due request's last
        row's q projected from the layer's input (one projection for all of them)."""
        todo = self.due.get(layer_idx, [])
        if not todo:
            return
        last = [int(self.batch.qsl[row + 1]) - 1 for row, _, _ in todo]
        last = torch.tensor(last, dtype=torch.long, device="cpu")  # host, then one copy
        rows = last.to(hidden.device, non_blocking=True)
        x = hidden[rows] + residual[rows]
        q, _, _, scale = self.rt.proj.qkv(layer_idx, take_positions(positions, rows), x)
        # the plans are made on the host (a few digests per unit): one small copy
        self._swap(todo, q.cpu(), scale)

    def reroute_from_query(self, layer_idx: int, query: torch.Tensor) -> None:
        """Inside vLLM's attention op of stage-start layer ``layer_idx``, before its kernel:
        re-route every request due there with the post-RoPE query the op received
        (``[tokens, heads, head_dim]``, the layer's own, as ``project_qkv`` would give it).
        The swaps write the stage's pages for layers ``[start, end)``: this layer's
        attention and the stage's later layers run after them. Host work outside any
        compiled region; the due rows' q cross to the host in one copy."""
        todo = self.due[layer_idx]
        attn = self.rt.layers[layer_idx].self_attn
        last = [int(self.batch.qsl[row + 1]) - 1 for row, _, _ in todo]  # host ints
        q = torch.stack([query[i] for i in last]).reshape(len(last), -1, attn.head_dim).cpu()
        self._swap(todo, q, float(attn.scaling))

    def _swap(self, todo: Due, q: torch.Tensor, scale: float) -> None:
        """The re-routes of the requests due at one layer, for their host queries ``q``
        ``[len(todo), heads, dim]``: one ``reroute_all``."""
        rt = self.rt
        due = []
        for (row, k, stage), q_row in zip(todo, q, strict=True):
            groups = [rt.groups.of_layer(i) for i in range(stage.start, stage.end)]
            pages = stage_page_rows(lambda gid, _row=row: self.tables(gid)[_row], groups)
            due.append(DueReroute(self.batch.req_ids[row], k, q_row, scale, pages))
        rt.record(rt.tier.reroute_all(due), rt.tier.gauges())

"""A step's segments: layer ranges whose active set is constant, and their row moves.

A segment ``[start, end)`` runs between two consecutive boundaries of the step (every
request's stage starts, plus the model's own run breaks). On the routed path a segment
runs as one piece at its first layer (`StepRouter.run_layer`): its active rows' positions,
hidden and residual are gathered once (`gather`), the segment's layers run on the
compacted tensors, and the result is scattered back into the full stream once
(`scatter`); the deferred rows keep their (hidden, residual) pair. A scoring layer inside
the segment (the layer before the next router point) sees the full stream through one
more scatter (`materialize`), out of place as well.

Device rule: which rows are active is host bookkeeping (`StepSegments.rows`); the rows
cross to the activations' device once per segment and step (`StepSegments.device_rows`,
normally inside the segment's packed metadata copy); gathers and scatters index device
tensors with that device index only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vllm_recroute.routing import stage_at
from vllm_recroute.vllm_view import StepBatch
from vllm_recroute.worker.compaction import LayerGroups, Segment, compact_segment, take_positions
from vllm_recroute.worker.rows import PrefillRoute
from vllm_recroute.worker.state import RouteState

__all__ = ["StepSegments", "Stream", "gather", "materialize", "scatter"]

# (positions, hidden, residual) of some rows; residual None before the first layer
Stream = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


class StepSegments:
    """The segments of one forward, built on first use (after the scoring that decides
    them), with their host rows, compacted attention and device rows."""

    def __init__(
        self,
        batch: StepBatch,
        prefills: list[PrefillRoute],
        decodes: dict[int, RouteState],
        groups: LayerGroups,
        tables: Callable[[int], torch.Tensor],
        num_rows: int,
        boundaries: list[int],
    ) -> None:
        self.batch = batch
        self.prefills = prefills
        self.decodes = decodes
        self.groups = groups
        self.tables = tables
        self.num_rows = num_rows
        self.boundaries = boundaries  # sorted, 0 and the number of layers included
        self._built: dict[int, Segment] = {}
        self._device_rows: dict[int, torch.Tensor] = {}  # segment start -> its rows there

    def span(self, layer_idx: int) -> tuple[int, int]:
        """``[start, end)`` of the segment holding ``layer_idx``."""
        start = max(b for b in self.boundaries if b <= layer_idx)
        return start, min(b for b in self.boundaries if b > layer_idx)

    def at(self, layer_idx: int) -> Segment | None:
        """The segment holding layer_idx (None: stage 0, every token, vLLM's metadata)."""
        start, end = self.span(layer_idx)
        if start == 0:
            return None
        seg = self._built.get(start)
        if seg is None:
            seg = self._build(start, end)
            self._built[start] = seg
        return seg

    def device_rows(self, seg: Segment, device: torch.device) -> torch.Tensor:
        """The segment's active rows on the activations' device: the gather/scatter index
        of the whole segment. Normally carried by the segment's packed metadata copy
        (``compact_segment``); else copied once per segment and step."""
        if seg.device_rows is not None and seg.device_rows.device == device:
            return seg.device_rows
        rows = self._device_rows.get(seg.start)
        if rows is None:
            assert seg.active_rows is not None
            rows = seg.active_rows.to(device, non_blocking=True)
            self._device_rows[seg.start] = rows
        return rows

    def rows(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
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

    def _build(self, start: int, end: int) -> Segment:
        # host bookkeeping (crosses to the device once, in compact_segment and device_rows)
        active, offsets = self.rows(start)
        if bool(active.all()) and not bool(offsets.any()):
            return Segment(start, end, None)
        active_rows = None if bool(active.all()) else torch.nonzero(active).flatten()
        seg = Segment(start, end, active_rows)
        groups = self.groups.of_layers(start, end)
        compact_segment(seg, self.batch, active, offsets, groups, self.tables)
        return seg


def gather(stream: Stream, rows: torch.Tensor) -> Stream:
    """The active rows of the full stream (``rows``: a device index), once per segment."""
    positions, hidden, residual = stream
    kept = None if residual is None else residual[rows]
    return take_positions(positions, rows), hidden[rows], kept


def scatter(
    full: tuple[torch.Tensor, Any], rows: torch.Tensor, h: torch.Tensor, r: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The full stream after a segment: its active rows from (h, r), every other row as
    it entered (deferred rows carry their pair). Out of place: the stream that entered may
    be the runner's input buffer. Segments that move rows start at a router point, never
    at layer 0, so a residual entered (vLLM's first layer takes None)."""
    hidden, residual = full
    assert residual is not None, "a segment that moves rows starts after layer 0"
    return hidden.index_copy(0, rows, h), residual.index_copy(0, rows, r)


def materialize(
    full: tuple[torch.Tensor, Any], rows: torch.Tensor | None, h: torch.Tensor, r: Any
) -> tuple[torch.Tensor, Any]:
    """The full stream in the middle of a segment (for a scoring layer there)."""
    return (h, r) if rows is None else scatter(full, rows, h, r)

"""Where deferred tokens leave attention: segments of layers, compacted KV views.

Inside a routed stage, attention sees only active tokens because each stage's layers get
their own *compacted* view of the KV cache: a request's active tokens are written at
positions 0, 1, 2, ... of its block table (with kv_release: of the *live* entries of its
row, kv/table_view.py), so the stage's KV holds exactly the active set and ``seq_lens``
counts only it. Keys are cached after RoPE with their original positions, so compaction
shifts no position. A request in decode keeps writing at ``num_computed - deferred[stage]``.
The stage's attention metadata is rebuilt through the layer group's own metadata builder,
so any vLLM attention backend works unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_recroute import vllm_view
from vllm_recroute.kv.table_view import ReleasedRows
from vllm_recroute.vllm_view import GroupInfo, StepBatch

__all__ = [
    "LayerGroups",
    "Segment",
    "StepTables",
    "compact_segment",
    "compacted_positions",
    "padded_slots",
    "rows_of",
]


@dataclass
class Segment:
    """Layers [start, end) over which every request's active set is constant."""

    start: int
    end: int
    active_rows: torch.Tensor | None  # host, sorted step rows; None: every row active
    attn_metadata: dict[int, Any] = field(default_factory=dict)  # kv group -> metadata
    slot_mapping: dict[int, torch.Tensor] = field(default_factory=dict)  # empty: vLLM's own
    # active_rows on the table's device (int64; the same tensor on a CPU device), carried
    # by the first group's packed copy; None while active_rows is None
    device_rows: torch.Tensor | None = None


class LayerGroups:
    """Which KV-cache group each decoder layer writes (one with kv_release off, one or
    more per routing stage with it on), bound from the runner at the first step."""

    def __init__(self, layer_names: list[str], check: Callable[[list[Any]], None]) -> None:
        self.layer_names = layer_names
        self._check = check  # kv_release: every group holds one stage (kv/spec.py)
        self._info: dict[str, GroupInfo] = {}

    def bind(self, runner: Any) -> None:
        if self._info:
            return
        info = vllm_view.kv_groups_of_layers(runner, self.layer_names)
        missing = set(self.layer_names) - set(info)
        if missing:
            raise RuntimeError(f"vllm-recroute: no KV cache group for layers {sorted(missing)}")
        self._check(vllm_view.kv_cache_groups(runner))
        self._info = info

    def of_layer(self, layer_idx: int) -> GroupInfo:
        return self._info[self.layer_names[layer_idx]]

    def of_layers(self, start: int, end: int) -> list[GroupInfo]:
        by_gid = {self._info[n].gid: self._info[n] for n in self.layer_names[start:end]}
        return [by_gid[g] for g in sorted(by_gid)]


class StepTables:
    """This step's block tables per group, with released pages removed from each row
    (kv_release): a row's live entries, in order, hold compacted positions. Built once
    per group and step."""

    def __init__(self, runner: Any, batch: StepBatch, released: ReleasedRows) -> None:
        self.runner = runner
        self.batch = batch
        self.released = released
        self._tables: dict[int, torch.Tensor] = {}

    def live_counts(self, gid: int) -> torch.Tensor:
        """Per request row: how many live blocks its compacted row holds."""
        _, widths = vllm_view.block_table(self.runner, gid, self.batch.num_reqs)
        dead = [len(self.released.dead(r, gid)) for r in self.batch.req_ids]
        return torch.tensor(widths, dtype=torch.long) - torch.tensor(dead, dtype=torch.long)

    def __call__(self, gid: int) -> torch.Tensor:
        table = self._tables.get(gid)
        if table is None:
            table = vllm_view.live_block_table(self.runner, gid, self.batch.req_ids, self.released)
            self._tables[gid] = table
        return table


def compact_segment(
    seg: Segment,
    batch: StepBatch,
    active: torch.Tensor,
    offsets: torch.Tensor,
    groups: list[GroupInfo],
    tables: StepTables,
) -> None:
    """Attention metadata and slot mapping of ``seg`` for each of its KV groups.

    ``active``: bool per step row; ``offsets``: per request, tokens absent from the
    stage's KV before this step (decode: its deferred count at the stage).

    Device rule: every index is computed on the host (``active`` and the block tables
    as read from vLLM's CPU block table are host tensors), then each group's indices
    cross to the table's device in one packed non-blocking copy (`vllm_view.SegmentIO`);
    the segment's active rows ride along with its first group's (``seg.device_rows``).
    """
    n = batch.num_reqs
    rows = batch.num_rows
    req_of_step_row = torch.repeat_interleave(torch.arange(n), batch.qsl.diff())
    counts = torch.zeros(n, dtype=torch.long).index_add_(0, req_of_step_row, active[:rows].long())
    qsl = torch.zeros(n + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(counts, 0)
    ctx = batch.num_computed - offsets
    seq_lens = (ctx + counts).to(torch.int32)
    req_of_row = torch.repeat_interleave(torch.arange(n), counts)
    rank = torch.arange(int(qsl[-1])) - qsl[:-1].long()[req_of_row]
    pos = ctx[req_of_row] + rank
    # vLLM's rule (gpu_model_runner.py, _build_attention_metadata): a request is
    # prefilling while it computes prompt tokens, whatever it computed before.
    is_prefilling = batch.num_computed < torch.tensor(batch.prompt_lens, dtype=torch.long)
    device = vllm_view.table_device(tables.runner, groups[0].gid, n) if groups else None
    for i, group in enumerate(groups):
        table = tables(group.gid)
        b = group.block_size
        _check_pages(pos // b, req_of_row, tables.live_counts(group.gid), batch, group.gid)
        blocks = table[req_of_row, pos // b].long()
        host = vllm_view.CompactedIndices(
            qsl=qsl,
            seq_lens=seq_lens,
            block_table=table[:, : _table_width(seq_lens, b, table.shape[1])],
            slot_mapping=blocks * b + pos % b,
            rows=seg.active_rows if i == 0 else None,
        )
        io = group.io(seg.start)
        dev = io.send(host, device)
        cm = vllm_view.common_attention_metadata(host, dev, is_prefilling)
        seg.attn_metadata[group.gid] = io.build(cm)
        seg.slot_mapping[group.gid] = dev.slot_mapping
        if dev.rows is not None:
            seg.device_rows = dev.rows


def _table_width(seq_lens: torch.Tensor, block_size: int, width: int) -> int:
    """Columns the compacted table needs: the widest row's blocks for its compacted
    ``seq_lens`` (attention reads no further; the KV write goes by slot mapping), not
    vLLM's full-width row (max_model_len's blocks), which would cross every step."""
    if not seq_lens.numel():
        return 1
    need = (int(seq_lens.max()) + block_size - 1) // block_size
    return max(1, min(need, width))


def _check_pages(
    block_idx: torch.Tensor,
    req_of_row: torch.Tensor,
    live: torch.Tensor,
    batch: StepBatch,
    gid: int,
) -> None:
    """Every compacted row must land in a live block the scheduler gave the request: a
    write past them would go to another block (or the null block) silently."""
    short = block_idx >= live[req_of_row]
    if bool(short.any()):
        req = batch.req_ids[int(req_of_row[short.nonzero()[0, 0]])]
        raise RuntimeError(
            f"vllm-recroute: request {req} needs more KV blocks in group {gid} than the "
            "scheduler allocated (planned deferred count above the routed one)"
        )


def take_positions(positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Positions of ``rows``; M-RoPE models (Qwen2.5-VL) carry [3, T] positions through
    the same gather."""
    return positions[:, rows] if positions.dim() == 2 else positions[rows]


def compacted_positions(
    num_rows: int, visual: torch.Tensor, mask: torch.Tensor, cached: int
) -> torch.Tensor:
    """Compacted position at a stage of each of a prompt's visual rows: the cached prefix
    (never deferred) plus its rank among the step's active rows (meaningful for active
    ones). ``num_rows``: the prompt's rows in the step; ``visual``: its visual rows
    (relative to its first row), ``mask``: active at the stage. Host bookkeeping (the
    device rule)."""
    active = torch.ones(num_rows, dtype=torch.bool, device="cpu")
    active[visual[~mask]] = False
    return (cached + torch.cumsum(active.long(), 0) - 1)[visual]


def rows_of(positions: torch.Tensor, rows: slice) -> torch.Tensor:
    """Positions of a contiguous row range (a view: no index tensor crosses to the
    device); M-RoPE positions are ``[3, T]``."""
    return positions[:, rows] if positions.dim() == 2 else positions[rows]


def padded_slots(slot_mapping: torch.Tensor, num_rows: int) -> torch.Tensor:
    """A compiled step may carry padding rows (CUDA graph sizes): they write nowhere
    (slot -1, vLLM's PAD_SLOT_ID)."""
    pad = num_rows - int(slot_mapping.numel())
    if pad <= 0:
        return slot_mapping
    return torch.cat([slot_mapping, slot_mapping.new_full((pad,), -1)])

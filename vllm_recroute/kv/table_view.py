"""The worker's view of a stage group's block-table rows after page releases (pure).

The worker's row for a running request only grows (new block IDs are appended,
`vllm/v1/worker/gpu_model_runner.py:_update_states`); the scheduler-side
`RoutedStageManager` replaces released entries by ``null_block`` in place and reports each
release as a `ReleasedBlocks` event (kv/manager.py). :class:`ReleasedRows` records those
events per (request, group) and compacts the worker's rows: the live entries in row order
hold compacted positions ``0, block_size, 2*block_size, ...``. It is what the routed
decoder uses for every routed stage's slot mapping and ``block_table_tensor``
(worker/compaction.py), and what ``tests/unit/kv/test_stage_manager.py`` checks against the
manager's own table.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence, Set
from typing import Any

import torch

__all__ = ["ReleasedRows", "compact_row"]


def compact_row(block_ids: Sequence[int], dead: Set[int]) -> list[int]:
    """Block IDs of a row with the released entries (row indices ``dead``) removed."""
    return [b for i, b in enumerate(block_ids) if i not in dead]


class ReleasedRows:
    """Row indices released by the scheduler, per (request, KV-cache group)."""

    def __init__(self) -> None:
        self._dead: dict[tuple[str, int], set[int]] = {}

    def apply(self, request_id: str, gid: int, row_indices: Iterable[int]) -> None:
        """Record a `ReleasedBlocks` event; an index released twice is a protocol error."""
        dead = self._dead.setdefault((request_id, gid), set())
        rows = set(row_indices)
        if rows & dead:
            raise ValueError(
                f"vllm-recroute: rows {sorted(rows & dead)} of request {request_id} "
                f"(group {gid}) released twice"
            )
        dead |= rows

    def dead(self, request_id: str, gid: int) -> frozenset[int]:
        return frozenset(self._dead.get((request_id, gid), ()))

    def forget(self, request_ids: Set[str]) -> None:
        """Finished / preempted requests: a resumed request gets a whole row again."""
        for key in [k for k in self._dead if k[0] in request_ids]:
            del self._dead[key]

    def __bool__(self) -> bool:
        return bool(self._dead)

    def compact_table(
        self, table: torch.Tensor, widths: Sequence[int], req_ids: Sequence[str], gid: int
    ) -> torch.Tensor:
        """``table`` (rows in ``req_ids`` order, ``widths[r]`` valid entries) with each
        row's released entries removed, live entries moved to the front."""
        if not self._dead:
            return table
        out: Any = None
        for r, req_id in enumerate(req_ids):
            dead = self._dead.get((req_id, gid))
            if not dead:
                continue
            if out is None:
                out = table.clone()
            live = compact_row(table[r, : widths[r]].tolist(), dead)
            out[r].zero_()
            out[r, : len(live)] = torch.tensor(live, dtype=table.dtype)
        return table if out is None else out

"""Worker-side mirror of a stage group's block-table row (pure Python, no vLLM state).

The worker's row for a running request only grows (new block IDs are appended,
`vllm/v1/worker/gpu_model_runner.py:_update_states`); the scheduler-side
`RoutedStageManager` replaces released entries by ``null_block`` in place and reports each
release as a `ReleasedBlocks` event. :class:`CompactedRow` applies those events to the
appended IDs and yields the compacted table (live entries in row order), which the
routed decoder uses for the stage's slot mapping and ``block_table_tensor``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["CompactedRow"]


@dataclass
class CompactedRow:
    """One request's row in one stage group, as the worker sees it."""

    block_ids: list[int] = field(default_factory=list)
    dead: set[int] = field(default_factory=set)

    def append(self, new_block_ids: Iterable[int]) -> None:
        """Blocks appended by the scheduler output (``CachedRequestData.new_block_ids``)."""
        self.block_ids.extend(new_block_ids)

    def reset(self, block_ids: Iterable[int]) -> None:
        """A resumed request gets its whole row again (``resumed_req_ids``): no holes."""
        self.block_ids = list(block_ids)
        self.dead = set()

    def release(self, row_indices: Iterable[int], block_ids: Iterable[int]) -> None:
        """Apply a `ReleasedBlocks` event; the IDs must match what this row holds."""
        for i, b in zip(row_indices, block_ids, strict=True):
            if i >= len(self.block_ids) or self.block_ids[i] != b or i in self.dead:
                raise ValueError(
                    f"release of row {i} (block {b}) does not match the worker row "
                    f"{self.block_ids} (dead {sorted(self.dead)})"
                )
            self.dead.add(i)

    def live_row_indices(self) -> list[int]:
        return [i for i in range(len(self.block_ids)) if i not in self.dead]

    def compacted(self) -> list[int]:
        """Block IDs of compacted positions ``0, block_size, 2*block_size, ...``."""
        return [b for i, b in enumerate(self.block_ids) if i not in self.dead]

    def slot(self, compacted_pos: int, block_size: int) -> int:
        """Slot of compacted position ``compacted_pos`` (for the slot mapping)."""
        live = self.compacted()
        return live[compacted_pos // block_size] * block_size + compacted_pos % block_size

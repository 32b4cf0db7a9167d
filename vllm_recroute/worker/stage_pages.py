"""A stage's K/V in the pages and back: where a request's rows live, and the bytes a
re-route's swaps move (the parked tier decides, worker/parking.py; this moves).

    pages ──read_stage──► evicted units' K/V, per layer (one slot index per KV group)
    restored units ──restored_kv──► per layer K/V: states projected (input norm, K/V
        projection without the queries, RoPE at their original positions), K/V units
        copied; one host->device copy each ──write_stage──► the evicted units' slots
        (the backend's own writer)

Layers of one KV group share their page row and (in vLLM) their cache layout, so one slot
index serves all of them: the per-read index arithmetic runs once per group and re-route,
not once per layer (``KVPageIO.index`` / ``read_at``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vllm_recroute.kv.pages import KVPageIO, SlotIndex
from vllm_recroute.kv.parked_pool import Parked, ParkedKV, ParkedState
from vllm_recroute.worker.projections import Projections

__all__ = [
    "PageRow",
    "page_io",
    "read_stage",
    "restored_kv",
    "stage_page_rows",
    "to_device",
    "write_stage",
]

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, eq=False)
class PageRow:
    """Where compacted position c of a request lives for one layer: block table + size."""

    table: torch.Tensor  # live block ids of the request's row in the layer's group
    block_size: int

    @classmethod
    def of_ids(cls, block_ids: Sequence[int], block_size: int) -> PageRow:
        """A row given as the scheduler's block ids (a kept turn's job)."""
        return cls(torch.tensor(block_ids, dtype=torch.long, device="cpu"), block_size)  # host

    def slots(self, positions: torch.Tensor) -> torch.Tensor:
        b = self.block_size
        return self.table[positions // b].long() * b + positions % b


def page_io(layers: Sequence[Any]) -> list[KVPageIO]:
    """Slot reads and writes of each decoder layer's KV cache (the runtime owns them and
    hands them to the tier and the turn store)."""
    return [
        KVPageIO(layer.self_attn.attn, layer.self_attn.num_kv_heads, layer.self_attn.head_dim)
        for layer in layers
    ]


def stage_page_rows(row_of: Callable[[int], torch.Tensor], groups: Sequence[Any]) -> list[PageRow]:
    """Per layer of a stage (``groups``: each layer's KV group, with ``gid`` and
    ``block_size``): where the request's compacted positions live; ``row_of(gid)`` is the
    request's live block-table row in that group. Layers of one group share one row."""
    rows: dict[int, PageRow] = {}
    for group in groups:
        if group.gid not in rows:
            rows[group.gid] = PageRow(row_of(group.gid), group.block_size)
    return [rows[group.gid] for group in groups]


def read_stage(
    ios: Sequence[KVPageIO], pages: Sequence[PageRow], positions: torch.Tensor
) -> tuple[list[SlotIndex], list[KV]]:
    """Per layer, the slot index of compacted ``positions`` and the K/V held there: one
    index per page row and layout (a layer of another layout gets its own)."""
    made: dict[int, SlotIndex] = {}
    indices, kv = [], []
    for io, page in zip(ios, pages, strict=True):
        index = made.get(id(page))
        if index is None or index.layout != io.layout_key(page.block_size):
            index = made[id(page)] = io.index(page.slots(positions), page.block_size)
        indices.append(index)
        kv.append(io.read_at(index))
    return indices, kv


def write_stage(ios: Sequence[KVPageIO], indices: Sequence[SlotIndex], kv: Sequence[KV]) -> None:
    """Per layer, K/V into the slots of its index (on the cache's device already)."""
    for io, index, (k, v) in zip(ios, indices, kv, strict=True):
        io.write(k, v, index.slots)


def restored_kv(
    proj: Projections, layers: range, back: Sequence[Parked], device: torch.device, pin: bool
) -> list[KV]:
    """Per layer of ``layers`` (the stage's indices), K/V ``[n, kv_heads, dim]`` of the
    restored units in ``back``'s order, states first: states go to the device in one copy
    and through each layer's input norm, K/V projection and RoPE at their original
    positions (``proj``: no queries); K/V units go in one copy."""
    states = [p for p in back if isinstance(p, ParkedState)]
    kvs = [p for p in back if isinstance(p, ParkedKV)]
    if any(isinstance(p, ParkedState) for p in back[len(states) :]):
        raise ValueError("restored units must come states first")
    parts: list[list[KV]] = []
    if states:
        x = to_device([s.x for s in states], 0, device, pin)
        pos = to_device([s.positions for s in states], -1, device, pin)
        parts.append([proj.key_values(idx, pos, x) for idx in layers])
    if kvs:
        kk = to_device([p.k for p in kvs], 1, device, pin)
        vv = to_device([p.v for p in kvs], 1, device, pin)
        parts.append(list(zip(kk.unbind(0), vv.unbind(0), strict=True)))
    if len(parts) == 1:
        return parts[0]
    return [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(*parts, strict=True)]


def to_device(
    parts: Sequence[torch.Tensor], dim: int, device: torch.device, pin: bool
) -> torch.Tensor:
    """Host tensors concatenated into one (pinned when ``pin``, so the copy is
    asynchronous: the device rule) and copied to ``device`` at once."""
    shape = list(parts[0].shape)
    shape[dim] = sum(int(p.shape[dim]) for p in parts)
    host = torch.empty(shape, dtype=parts[0].dtype, device="cpu", pin_memory=pin)
    torch.cat(list(parts), dim=dim, out=host)
    return host.to(device, non_blocking=pin)

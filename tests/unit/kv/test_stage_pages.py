"""worker/stage_pages.py: one slot index per KV group and re-route, reads and writes
through it, and the restore's order (states first).

Guarded: the reads return what each layer holds (not a neighbour's bytes through a shared
index), and a layer of another layout gets its own index.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.kv_layouts import flash_attn, flash_caches
from vllm_recroute.kv.pages import KVPageIO
from vllm_recroute.kv.parked_pool import ParkedKV, ParkedState
from vllm_recroute.worker.projections import Projections
from vllm_recroute.worker.stage_pages import (
    PageRow,
    read_stage,
    restored_kv,
    stage_page_rows,
    write_stage,
)

HEADS, DIM, BLOCK, BLOCKS = 2, 32, 16, 16


def _ios(layouts: list[str]) -> list[KVPageIO]:
    return [
        KVPageIO(
            flash_attn(flash_caches(layout, BLOCKS, BLOCK, HEADS, DIM, torch.float32)[0], DIM),
            HEADS,
            DIM,
        )
        for layout in layouts
    ]


class CountingIO(KVPageIO):
    made = 0

    def index(self, slots, block_size):
        CountingIO.made += 1
        return super().index(slots, block_size)


def test_layers_of_one_group_share_a_page_row_and_one_index():
    groups = [SimpleNamespace(gid=g, block_size=BLOCK) for g in (1, 1, 2, 1)]
    tables = {1: torch.tensor([3, 5]), 2: torch.tensor([7, 0])}
    rows = stage_page_rows(tables.__getitem__, groups)
    assert rows[0] is rows[1] is rows[3] and rows[2] is not rows[0]
    caches = [flash_caches("LBNHC", BLOCKS, BLOCK, HEADS, DIM, torch.float32)[0] for _ in groups]
    ios = [CountingIO(flash_attn(c, DIM), HEADS, DIM) for c in caches]
    positions = torch.tensor([0, 1, 17, 20])
    g = torch.Generator().manual_seed(0)
    truth = []
    for io, row in zip(ios, rows, strict=True):
        k, v = torch.randn(2, 4, HEADS, DIM, generator=g)
        io.write(k, v, row.slots(positions))
        truth.append((k, v))
    CountingIO.made = 0
    indices, kv = read_stage(ios, rows, positions)
    assert CountingIO.made == 2  # one per page row (group), not one per layer
    assert indices[0] is indices[1] is indices[3]
    for (k, v), (tk, tv) in zip(kv, truth, strict=True):
        assert torch.equal(k, tk) and torch.equal(v, tv)  # each layer's own bytes
    # and back: write through the same indices, read what was written
    new = [(v, k) for k, v in truth]
    write_stage(ios, indices, new)
    _, again = read_stage(ios, rows, positions)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, new, strict=True))


def test_a_layer_of_another_layout_gets_its_own_index():
    ios = _ios(["LBNHC", "LBHNC"])  # same group, different strides
    row = PageRow(torch.tensor([4, 9]), BLOCK)
    positions = torch.arange(3, 19)
    for io in ios:
        io.write(*torch.ones(2, 16, HEADS, DIM), row.slots(positions))
    indices, kv = read_stage(ios, [row, row], positions)
    assert indices[0].layout != indices[1].layout
    assert all(torch.equal(k, torch.ones(16, HEADS, DIM)) for k, _ in kv)
    with pytest.raises(ValueError, match="slot index of layout"):
        ios[1].read_at(indices[0])  # an index is refused by a layer of another layout


def test_restored_kv_takes_states_first_and_refuses_another_order():
    layer = SimpleNamespace()  # never projected: K/V units only, then the order check
    kv = ParkedKV(torch.ones(2, 4, HEADS, DIM), torch.zeros(2, 4, HEADS, DIM))
    out = restored_kv(
        Projections([layer, layer]), range(2), [kv, kv], torch.device("cpu"), pin=False
    )
    assert [tuple(k.shape) for k, _ in out] == [(8, HEADS, DIM)] * 2
    state = ParkedState(torch.zeros(4, 8), torch.arange(4))
    with pytest.raises(ValueError, match="states first"):
        restored_kv(Projections([layer]), range(1), [kv, state], torch.device("cpu"), pin=False)

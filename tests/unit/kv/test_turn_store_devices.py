"""TurnStore under CUDA's device rules (FakeCuda): a kept turn lives in host memory.

A device KV cache laid out as vLLM lays it out for FlashAttention (tests/kv_layouts.py),
host block tables, a parked unit in the tier's host pool. Asserted: ``save`` leaves only
host tensors in the record (its K/V rows and its parked units), copying exactly the
record's bytes device -> host; ``nbytes`` counts those host bytes; ``load`` writes them
back so the device cache holds the same values at the new request's slots; no
host/device mix anywhere.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.devices import FakeCuda, is_device, iter_device
from tests.kv_layouts import flash_attn, flash_caches, flash_read
from vllm_recroute.config import RoutingConfig
from vllm_recroute.kv.parked_pool import ParkedKey
from vllm_recroute.messages import TurnLoad, TurnSave
from vllm_recroute.metrics.accounting import Ledger
from vllm_recroute.routing import Stage
from vllm_recroute.worker.parking import ParkingTier, StageUnits
from vllm_recroute.worker.projections import Projections
from vllm_recroute.worker.stage_pages import PageRow, page_io
from vllm_recroute.worker.state import RouteState, RouteStore
from vllm_recroute.worker.turns import TurnStore

pytestmark = pytest.mark.usefixtures("no_grad")

HEADS, DIM, BLOCK, BLOCKS, LAYERS = 2, 32, 16, 12, 3
N, DEFERRED = 20, 6  # tokens with KV; tokens the stage (layers 1, 2) does not hold
DTYPE = torch.bfloat16


@pytest.fixture
def no_grad():
    with torch.no_grad():
        yield


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DTYPE)


def setup(fc: FakeCuda):
    caches = flash_caches("LBNHC", BLOCKS, BLOCK, HEADS, DIM, DTYPE, LAYERS, raw_on=fc.tensor)
    layers = [
        SimpleNamespace(
            self_attn=SimpleNamespace(attn=flash_attn(c, DIM), num_kv_heads=HEADS, head_dim=DIM)
        )
        for c in caches
    ]
    cfg = RoutingConfig(mode="reroute", parked_bytes=1 << 20, park_block_tokens=2)
    tier = ParkingTier(cfg, Projections(layers), page_io(layers))
    store = RouteStore(hold_finished=True)
    store.on_forget(lambda gone: tier.forget(sorted(gone)))
    turns = TurnStore(tier.io, store, Ledger(), tier)

    def pages(layer_idx, block_ids):  # block tables are host tensors
        return PageRow(torch.tensor(block_ids[0], dtype=torch.long), BLOCK)

    def apply(evicted, saves, loads):  # one step's jobs, where the pages are, the pace
        turns.apply(evicted, saves, loads, pages, lambda req_id: 1)

    return tier, store, turns, apply


def test_a_kept_turn_is_host_memory_and_loads_back_onto_the_device():
    with FakeCuda() as fc:
        tier, store, turns, apply = setup(fc)
        t1, t2 = PageRow(torch.tensor([2, 5]), BLOCK), PageRow(torch.tensor([7, 9]), BLOCK)
        rows = [N, N - DEFERRED, N - DEFERRED]
        truth = [
            (rand(n, HEADS, DIM, seed=i), rand(n, HEADS, DIM, seed=10 + i))
            for i, n in enumerate(rows)
        ]
        for io, (k, v) in zip(tier.io, truth, strict=True):  # the forward's pages, on device
            io.write(k, v, t1.slots(torch.arange(k.shape[0])))
        # one parked unit of the stage, in the tier's host pool
        pk, pv = rand(2, 2, HEADS, DIM, seed=20), rand(2, 2, HEADS, DIM, seed=21)
        tier.units[("t1", 0)] = StageUnits(
            1, 3, {0: torch.tensor([5, 6])}, {0: torch.zeros(HEADS, DIM)}, {0: 2, 1: 2}, {1}
        )
        tier.pool.park(ParkedKey("t1", 0, 1), pk, pv, 0.5)
        store.put("t1", RouteState((Stage(1, 3, 0.5),), (DEFERRED,), 1))
        store.finish(["t1"])
        for io in tier.io:
            io.layout(BLOCK)  # measured once per cache, not part of the save
        fc.reset()

        apply([], [TurnSave("t1", 7, N, ((2, 5),))], [])
        record = turns.records[7]
        on_device = list(iter_device((record.kv, record.parked)))
        assert not on_device, f"{len(on_device)} device tensors in the record (not host memory)"
        assert [k.shape[0] for k, _ in record.kv] == rows
        for (k, v), (tk, tv) in zip(record.kv, truth, strict=True):
            assert torch.equal(k, tk) and torch.equal(v, tv)
        unit = record.parked[(0, 1)]
        (k, v), digest, score = unit.payload, unit.digest, unit.score
        assert torch.equal(k, pk) and torch.equal(v, pv) and score == 0.5
        assert torch.equal(digest, pk[:1].float().mean(1))  # the first layer's mean key
        kv_bytes = sum(t.nbytes for kv in truth for t in kv)
        parked_bytes = pk.nbytes + pv.nbytes + digest.nbytes
        assert record.nbytes == kv_bytes + parked_bytes  # host bytes
        assert turns.gauges()["turn_store_bytes"] == record.nbytes
        assert (fc.d2h, fc.d2h_bytes) == (2 * LAYERS, kv_bytes)  # the rows, nothing more
        fc.reset()

        apply([], [], [TurnLoad("t2", 7, 0, N, ((7, 9),))])
        assert fc.d2h == 0 and fc.h2d_bytes >= kv_bytes
        for io, (tk, tv) in zip(tier.io, truth, strict=True):
            slots = t2.slots(torch.arange(tk.shape[0]))
            k, v = io.read(slots, BLOCK)
            assert is_device(k) and torch.equal(k.cpu(), tk) and torch.equal(v.cpu(), tv)
            fk, _ = flash_read(io.cache, DIM, fc.tensor(slots))  # where the kernel looks
            assert torch.equal(fk.cpu(), tk)
        k2, v2 = tier.pool.restore(ParkedKey("t2", 0, 1))  # the parked unit, adopted
        assert not is_device(k2) and torch.equal(k2, pk) and torch.equal(v2, pv)

"""Worker side of the parked tier on fake decoder layers and real paged caches.

KVPageIO: slot reads/writes through the backend's own writer, including vLLM's CPU
kernel (which packs keys inside a block). ParkingTier: what lands in the pool at prefill
(deferred units as their stage-entry state, one key projection), what a decode-time swap
moves between pages and pool (K/V projected from a restored state exactly as the layer
would, evicted K/V bit-exact, bounded error int8), drops when the pool is full, and
nothing left after forget.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import vllm_recroute.worker.projections as projections
from vllm_recroute.config import RoutingConfig
from vllm_recroute.kv.pages import KVPageIO
from vllm_recroute.kv.parked_pool import ParkedKey, ParkedKV, ParkedState
from vllm_recroute.routing.rerouting import Swap
from vllm_recroute.worker.parking import ParkingTier
from vllm_recroute.worker.projections import Projections
from vllm_recroute.worker.stage_pages import PageRow, page_io

pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.fixture
def no_grad():
    with torch.no_grad():
        yield


HEADS, KV_HEADS, DIM, HIDDEN, BLOCK = 2, 2, 32, 16, 32


# ------------------------------------------------------------------ fake vLLM pieces


class PlainImpl:
    """FlashAttention-like layout [2, blocks, block_size, heads, dim]."""

    def do_kv_cache_update(self, layer, k, v, cache, slots):
        b = cache.shape[2]
        cache[0, slots // b, slots % b] = k
        cache[1, slots // b, slots % b] = v


class CpuImpl:
    """vLLM's CPU kernel ([blocks, heads, block_size, 2 * dim], keys packed)."""

    def do_kv_cache_update(self, layer, k, v, cache, slots):
        import vllm._custom_ops as ops

        nb, h, b, _ = cache.shape
        kc, vc = cache.view(nb, h, b * 2, -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, "vec")


class ScaledImpl(PlainImpl):
    """Not a permutation of the written values (like a quantized cache)."""

    def do_kv_cache_update(self, layer, k, v, cache, slots):
        super().do_kv_cache_update(layer, k * 0.5, v, cache, slots)


def make_attn(impl, num_blocks: int = 4, dtype=torch.float32, layout: str = "plain"):
    if layout == "plain":
        cache = torch.zeros(2, num_blocks, BLOCK, KV_HEADS, DIM, dtype=dtype)
    else:
        cache = torch.zeros(num_blocks, KV_HEADS, BLOCK, 2 * DIM, dtype=dtype)
    return SimpleNamespace(impl=impl, kv_cache=cache)


class Rotary:
    def __call__(self, positions, q, k):
        return q, k * (1.0 + 0.01 * positions.float()[:, None])


class FusedQKV(torch.nn.Linear):
    """vLLM's QKVParallelLinear as routing sees it: ``(out, None)``, an unquantized
    method, its weight."""

    def __init__(self, weight: torch.Tensor) -> None:
        from vllm.model_executor.layers.linear import UnquantizedLinearMethod

        super().__init__(weight.shape[1], weight.shape[0], bias=False)
        self.quant_method = UnquantizedLinearMethod()
        with torch.no_grad():
            self.weight.copy_(weight)

    def forward(self, x):
        return super().forward(x), None


def make_layer(seed: int, layout: str = "plain"):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn((HEADS + 2 * KV_HEADS) * DIM, HIDDEN, generator=g) * 0.3
    impl = CpuImpl() if layout == "cpu" else PlainImpl()
    self_attn = SimpleNamespace(
        qkv_proj=FusedQKV(weight),
        rotary_emb=Rotary(),
        q_size=HEADS * DIM,
        kv_size=KV_HEADS * DIM,
        head_dim=DIM,
        num_kv_heads=KV_HEADS,
        scaling=DIM**-0.5,
        attn=make_attn(impl, layout=layout),
    )
    return SimpleNamespace(self_attn=self_attn, input_layernorm=lambda x: x)


# ------------------------------------------------------------------ KVPageIO


@pytest.mark.parametrize(
    ("layout", "dtype"),
    [("plain", torch.float16), ("cpu", torch.float32), ("cpu", torch.bfloat16)],
)
def test_page_io_reads_back_exactly_what_the_backend_wrote(layout, dtype):
    impl = CpuImpl() if layout == "cpu" else PlainImpl()
    attn = make_attn(impl, dtype=dtype, layout=layout)
    io = KVPageIO(attn, KV_HEADS, DIM)
    slots = torch.tensor([33, 34, 70, 0, 95, 127])
    g = torch.Generator().manual_seed(0)
    k = torch.randn(6, KV_HEADS, DIM, generator=g).to(dtype)
    v = torch.randn(6, KV_HEADS, DIM, generator=g).to(dtype)
    io.write(k, v, slots)
    rk, rv = io.read(slots, BLOCK)
    assert torch.equal(rk, k) and torch.equal(rv, v)
    if layout == "cpu":  # the CPU kernel packs keys: a naive view would not read them back
        naive = attn.kv_cache.view(4, KV_HEADS, 2 * BLOCK, DIM)[:, :, :BLOCK]
        assert not torch.equal(naive[slots // BLOCK, :, slots % BLOCK], k)


def test_page_io_refuses_a_layout_it_cannot_map():
    io = KVPageIO(make_attn(ScaledImpl()), KV_HEADS, DIM)
    with pytest.raises(RuntimeError, match="not a plain permutation"):
        io.read(torch.tensor([0]), BLOCK)


# ------------------------------------------------------------------ ParkingTier

V = 12  # visual tokens; units of 2 tokens; stage = layers [1, 3) of a 3-layer model


def tier_setup(fmt: str = "none", parked_bytes: int = 1 << 20, layout: str = "plain"):
    cfg = RoutingConfig(
        mode="reroute",
        parked_bytes=parked_bytes,
        park_format=fmt,
        park_block_tokens=2,
        reroute_every=1,
    )
    layers = [make_layer(i, layout) for i in range(3)]
    tier = ParkingTier(cfg, Projections(layers), page_io(layers))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(V, HIDDEN, generator=g)
    positions = torch.arange(5, 5 + V)
    mask = torch.zeros(V, dtype=torch.bool)
    mask[[0, 1, 6, 7]] = True  # active units: tokens (0,1) and (6,7)
    cpos = torch.cumsum(mask.long(), 0) - 1 + 5  # 5 text rows come first
    scores = torch.arange(V, dtype=torch.float32)
    # what the stage's attention wrote for the active tokens (their "processed" K/V)
    pages = PageRow(torch.tensor([2, 0]), BLOCK)
    for layer in layers[1:]:
        k, v = torch.randn(2, 4, KV_HEADS, DIM, generator=g)
        KVPageIO(layer.self_attn.attn, KV_HEADS, DIM).write(k, v, pages.slots(cpos[mask]))
    return tier, layers, x, positions, mask, cpos, scores, pages


DEFERRED = torch.tensor([2, 3, 4, 5, 8, 9, 10, 11])  # ~mask of tier_setup


@torch.no_grad()
def parked_truth(layers, positions, x, idx):
    """K/V the stage's layers cache for visual rows ``idx``, projected over those rows
    alone, as a re-route restoring them does (a matmul over another set of rows may
    round differently)."""
    kv = [Projections(layers).key_values(i, positions[idx], x[idx]) for i in (1, 2)]
    return torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])


def query_towards(tier, req, uid) -> torch.Tensor:
    """A query whose best unit is ``uid`` (its digest, scaled up)."""
    units = tier.units[(req, 0)]
    d = units.digests[uid] if uid in units.active else tier.pool.digest(ParkedKey(req, 0, uid))[0]
    return d.repeat_interleave(HEADS // KV_HEADS, 0) * 50


def test_prefill_parks_deferred_units_as_their_stage_entry_state():
    tier, layers, x, positions, mask, cpos, scores, _ = tier_setup()
    delta = tier.park_prefill("r", 0, 1, 3, positions, x, mask, cpos, scores)
    units = tier.units[("r", 0)]
    assert sorted(units.active) == [0, 1] and sorted(units.parked) == [2, 3, 4, 5]
    assert delta == {"parked_blocks": 4, "parked_blocks_dropped": 0}
    # digests: mean key at the stage's first layer, projected once over every visual row
    keys = Projections(layers).keys(1, positions, x)
    for uid, idx in zip([0, 1], [[0, 1], [6, 7]], strict=True):
        assert torch.equal(units.digests[uid], keys[idx].mean(0))
    for uid, idx in zip([2, 3, 4, 5], DEFERRED.split(2), strict=True):
        key = ParkedKey("r", 0, uid)
        assert torch.equal(tier.pool.digest(key), keys[idx].mean(0)[None])
        parked = tier.pool.restore(key)
        assert isinstance(parked, ParkedState)  # the state, bit for bit; no K/V
        assert torch.equal(parked.x, x[idx]) and torch.equal(parked.positions, positions[idx])
    assert torch.equal(units.active[1], cpos[[6, 7]])


def test_parking_projects_one_layer_and_a_state_is_smaller_than_its_kv(monkeypatch):
    """Prefill projects keys alone at the stage's first layer (the digests); a re-route
    projects K and V alone at every stage layer for the restored units only, no query
    (the fused layer never runs). The guards: the old design projected K/V at both stage
    layers for all 8 deferred rows, and the fused qkv (queries included) every time."""
    calls, fused = [], []
    real_project, real_fused = projections.KVRows.project, projections.project_qkv

    def counting(rows, normed, kv_size, values):
        calls.append((int(normed.shape[0]), values))
        return real_project(rows, normed, kv_size, values)

    def counting_fused(layer, positions, x):
        fused.append(int(x.shape[0]))
        return real_fused(layer, positions, x)

    monkeypatch.setattr(projections.KVRows, "project", counting)
    monkeypatch.setattr(projections, "project_qkv", counting_fused)
    tier, layers, x, positions, mask, cpos, scores, pages = tier_setup()
    tier.park_prefill("r", 0, 1, 3, positions, x, mask, cpos, scores)
    assert calls == [(V, False)]
    calls.clear()
    delta = tier.reroute("r", 0, query_towards(tier, "r", 4), 1.0, [pages, pages])
    n = 2 * delta["restored_blocks"]  # the restored units' rows, at each stage layer
    assert n and calls == [(n, True), (n, True)] and fused == []
    state = ParkedState(x[[10, 11]], positions[[10, 11]])  # one unit, both forms
    k, v = parked_truth(layers, positions, x, torch.tensor([10, 11]))
    digest = torch.zeros(KV_HEADS, DIM)
    assert tier.pool.state_bytes(state, digest) * 4 < tier.pool.entry_bytes(k, v)


@pytest.mark.parametrize("layout", ["plain", "cpu"])
def test_swap_moves_bytes_exactly_and_back(layout):
    tier, layers, x, positions, mask, cpos, scores, pages = tier_setup(layout=layout)
    tier.park_prefill("r", 0, 1, 3, positions, x, mask, cpos, scores)
    ios = tier.io[1:3]
    before = {
        u: [io.read(pages.slots(cpos[i]), BLOCK) for io in ios]
        for u, i in ((0, [0, 1]), (1, [6, 7]))
    }
    # parked unit 4 (tokens 8, 9) takes the slots of active unit 0 (one swap, so the
    # restore projects exactly the rows parked_truth does)
    units = tier.units[("r", 0)]
    weaker = 0
    slots, active_digest = pages.slots(units.active[weaker]), units.digests[weaker]
    delta = _delta()
    tier._swap_all("r", 0, units, [Swap(weaker, 4)], {0: 0.0, 4: 1.0}, [pages, pages], delta)
    assert delta["restored_blocks"] == 1 and 4 in units.active and weaker in units.parked
    tk, tv = parked_truth(layers, positions, x, torch.tensor([8, 9]))
    target = pages.slots(units.active[4])
    assert torch.equal(target, slots)
    for i, io in enumerate(ios):
        k, v = io.read(target, BLOCK)
        assert torch.equal(k, tk[i]) and torch.equal(v, tv[i])
    # the evicted unit parks as the K/V it had in the pages, bit for bit
    key = ParkedKey("r", 0, weaker)
    digest, parked = tier.pool.digest(key), tier.pool.restore(key)
    assert isinstance(parked, ParkedKV)
    for i in range(2):
        assert torch.equal(parked.k[i], before[weaker][i][0])
        assert torch.equal(parked.v[i], before[weaker][i][1])
    # it keeps the digest it was scored by while active (a unit's digest never changes)
    assert torch.equal(digest[0], active_digest)
    tier.pool.park(key, *parked, 0.0, digest[0])
    assert torch.equal(tier.pool.digest(key), digest)
    # and a query favouring it brings exactly those bytes back
    tier.reroute("r", 0, query_towards(tier, "r", weaker), 1.0, [pages, pages])
    assert weaker in units.active
    for i, io in enumerate(ios):
        k, v = io.read(pages.slots(units.active[weaker]), BLOCK)
        assert torch.equal(k, before[weaker][i][0]) and torch.equal(v, before[weaker][i][1])


def test_one_reroute_restores_a_state_and_a_kv_unit_into_the_right_slots():
    """A plan mixing both forms: the K/V unit listed first, the state second. Whatever
    slots each restored unit gets, its K/V must be its own at every stage layer."""
    tier, layers, x, positions, mask, cpos, scores, pages = tier_setup()
    tier.park_prefill("r", 0, 1, 3, positions, x, mask, cpos, scores)
    units = tier.units[("r", 0)]
    ios = tier.io[1:3]
    kv0 = [io.read(pages.slots(units.active[0]), BLOCK) for io in ios]
    tier._swap_all("r", 0, units, [Swap(0, 2)], {0: 0.0, 2: 1.0}, [pages, pages], _delta())
    assert isinstance(tier.pool._entries[ParkedKey("r", 0, 0)].kind(1, 2), ParkedKV)
    delta = _delta()
    tier._swap_all(
        "r",
        0,
        units,
        [Swap(1, 0), Swap(2, 5)],
        {0: 1.0, 1: 0.0, 2: 0.0, 5: 1.0},
        [pages, pages],
        delta,
    )
    assert sorted(units.active) == [0, 5] and delta["restored_blocks"] == 2
    tk, tv = parked_truth(layers, positions, x, torch.tensor([10, 11]))
    for i, io in enumerate(ios):
        k, v = io.read(pages.slots(units.active[0]), BLOCK)
        assert torch.equal(k, kv0[i][0]) and torch.equal(v, kv0[i][1])
        k, v = io.read(pages.slots(units.active[5]), BLOCK)
        assert torch.equal(k, tk[i]) and torch.equal(v, tv[i])
    assert sorted(units.parked) == [1, 2, 3, 4]


def _delta() -> dict[str, int]:
    return {"restored_blocks": 0, "parked_blocks": 0, "parked_blocks_dropped": 0}


def test_int8_swap_is_within_half_a_step():
    """int8 quantizes the state (per hidden channel over the unit's tokens): the state comes
    back within half a step, and the pages hold exactly the layer's K/V of that
    dequantized state."""
    tier, layers, x, positions, mask, cpos, scores, pages = tier_setup("int8")
    tier.park_prefill("r", 0, 1, 3, positions, x, mask, cpos, scores)
    key = ParkedKey("r", 0, 3)
    digest, state = tier.pool.digest(key), tier.pool.restore(key)
    rows = torch.tensor([4, 5])
    step = x[rows].abs().amax(0, keepdim=True) / 127
    assert bool(((state.x - x[rows]).abs() <= step / 2 + 1e-6).all())
    assert not torch.equal(state.x, x[rows])  # really compressed
    assert torch.equal(state.positions, positions[rows])  # positions never are
    tier.pool.park_state(key, state, digest[0], 1.0)
    units = tier.units[("r", 0)]
    tier._swap_all("r", 0, units, [Swap(1, 3)], {1: 0.0, 3: 1.0}, [pages, pages], _delta())
    assert 3 in units.active
    for i, io in enumerate(tier.io[1:3]):
        k, v = io.read(pages.slots(units.active[3]), BLOCK)
        tk, tv = Projections(layers).key_values(1 + i, state.positions, state.x)
        assert torch.equal(k, tk) and torch.equal(v, tv)


def test_full_pool_drops_least_useful_units_and_never_restores_them():
    tier, _layers, x, positions, mask, cpos, scores, pages = tier_setup()
    state = ParkedState(x[[2, 3]], positions[[2, 3]])
    unit_bytes = tier.pool.state_bytes(state, torch.zeros(KV_HEADS, DIM))
    tier.pool.capacity_bytes = 2 * unit_bytes  # room for two units
    delta = tier.park_prefill("r", 0, 1, 3, positions, x, mask, cpos, scores)
    assert delta == {"parked_blocks": 4, "parked_blocks_dropped": 2}
    assert tier.pool.used_bytes == 2 * unit_bytes
    units = tier.units[("r", 0)]
    # scores rise with the token index: units 2 (tokens 2,3) and 3 (4,5) were the weakest
    assert sorted(units.parked) == [4, 5]
    assert tier.pool.keys("r") == [ParkedKey("r", 0, 4), ParkedKey("r", 0, 5)]
    tier.reroute("r", 0, query_towards(tier, "r", 4) * 0, 1.0, [pages, pages])
    assert 2 not in units.active and 3 not in units.active


def test_forget_empties_the_pool():
    tier, _, x, positions, mask, cpos, scores, pages = tier_setup()
    tier.park_prefill("r", 0, 1, 3, positions, x, mask, cpos, scores)
    tier.park_prefill("s", 0, 1, 3, positions, x, mask, cpos, scores)
    tier.reroute("r", 0, query_towards(tier, "r", 5), 1.0, [pages, pages])
    assert tier.gauges()["parked_pool_blocks"] == 8
    assert tier.forget(["r", "s"]) == {"parked_blocks_freed": 8}
    assert len(tier.pool) == 0 and tier.pool.used_bytes == 0 and not tier.units
    assert tier.gauges() == {"parked_pool_blocks": 0, "parked_pool_bytes": 0}
    assert tier.forget(["r"]) == {}


@pytest.mark.parametrize("active", [V, 0])
def test_a_stage_with_nothing_deferred_or_nothing_active(active):
    tier, _, x, positions, _, _, scores, pages = tier_setup()
    mask = torch.zeros(V, dtype=torch.bool)
    mask[:active] = True
    cpos = torch.cumsum(mask.long(), 0) - 1
    delta = tier.park_prefill("r", 0, 1, 3, positions, x, mask, cpos, scores)
    units = tier.units[("r", 0)]
    assert delta["parked_blocks"] == (0 if active else V // 2)
    assert len(units.active) == (V // 2 if active else 0)
    # re-routing has nothing to swap either way, and says so without error
    q = torch.ones(HEADS, DIM)
    assert tier.reroute("r", 0, q, 1.0, [pages, pages])["restored_blocks"] == 0


# ------------------------------------------------------------------ later turns (TurnStore)


def _turn_store(tier):
    """A TurnStore on its narrow collaborators: the tier's page I/O and the tier, a store
    holding finished requests, a ledger; and ``apply`` for one step's jobs, given with
    them: one KV group of BLOCK-token pages, a fixed decode pace."""
    from vllm_recroute.metrics.accounting import Ledger
    from vllm_recroute.worker.state import RouteStore
    from vllm_recroute.worker.turns import TurnStore

    store = RouteStore(hold_finished=True)
    store.on_forget(lambda gone: tier.forget(sorted(gone)))

    def pages(layer_idx, block_ids):
        return PageRow(torch.tensor(block_ids[0], dtype=torch.long), BLOCK)

    turns = TurnStore(tier.io, store, Ledger(), tier)

    def apply(evicted, saves, loads):
        turns.apply(evicted, saves, loads, pages, lambda req_id: tier.cfg.reroute_every)

    return turns, apply


@pytest.mark.parametrize(("layout", "fmt"), [("plain", "none"), ("cpu", "none"), ("plain", "int8")])
def test_a_kept_turn_comes_back_bit_exact_in_another_requests_pages(layout, fmt):
    """(int8: the units come back as the pool gave them out; re-quantizing a dequantized
    unit is exact, so a kept turn loses nothing more than parking did.)"""
    from vllm_recroute.messages import TurnLoad, TurnSave
    from vllm_recroute.routing import Stage
    from vllm_recroute.worker.state import RouteState

    tier, _, x, positions, mask, cpos, scores, _ = tier_setup(fmt, layout=layout)
    turns, apply = _turn_store(tier)
    store = turns.store
    tier.park_prefill("t1", 0, 1, 3, positions, x, mask, cpos, scores)
    keys = {uid: ParkedKey("t1", 0, uid) for uid in (2, 3, 4, 5)}
    digests = {uid: tier.pool.digest(key) for uid, key in keys.items()}
    parked = {uid: tier.pool.restore(key) for uid, key in keys.items()}
    for uid, state in parked.items():  # (restore took them out; put them back)
        tier.pool.park_state(keys[uid], state, digests[uid][0], 1.0)
    store.put("t1", RouteState((Stage(1, 3, 0.5),), (8,), 1))
    n = 5 + V  # tokens with KV: 5 text rows and the image; 8 visual tokens are deferred
    g = torch.Generator().manual_seed(3)
    for io in tier.io[:1]:  # stage 0 holds every token
        io.write(*torch.randn(2, n, KV_HEADS, DIM, generator=g), torch.arange(n) + 2 * BLOCK)
    rows = [io.read(torch.arange(n) + 2 * BLOCK, BLOCK) for io in tier.io]

    store.finish(["t1"])  # vLLM says t1 finished: held until the turn jobs ran
    assert store.get("t1") is not None and len(tier.pool) == 4
    save = TurnSave("t1", 7, n, ((2,),))
    apply([], [save], [])
    assert turns.take_sent() == {"t1"}
    assert store.get("t1") is None and len(tier.pool) == 0 and not tier.units
    record = turns.records[7]
    assert [k.shape[0] for k, _ in record.kv] == [n, n - 8, n - 8]  # compacted at the stage

    apply([], [], [TurnLoad("t2", 7, 0, n, ((3,),))])
    for i, io in enumerate(tier.io):
        got = io.read(torch.arange(record.kv[i][0].shape[0]) + 3 * BLOCK, BLOCK)
        want = (rows[i][0][: got[0].shape[0]], rows[i][1][: got[0].shape[0]])
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert store.get("t2").deferred == (8,) and store.wants_reroute("t2")
    assert sorted(tier.units[("t2", 0)].parked) == [2, 3, 4, 5]
    for uid, state in parked.items():  # the states, as the pool gave them out
        key = ParkedKey("t2", 0, uid)
        assert torch.equal(tier.pool.digest(key), digests[uid])
        again = tier.pool.restore(key)
        assert isinstance(again, ParkedState)
        assert torch.equal(again.x, state.x) and torch.equal(again.positions, state.positions)
    apply([7], [], [])
    assert turns.records == {}


def _two_requests(tier, x, positions, mask, cpos, scores, pages):
    """ "r" as tier_setup made it, and "s" (the same prompt, other blocks: its own active
    K/V written there) parked beside it."""
    tier.park_prefill("r", 0, 1, 3, positions, x, mask, cpos, scores)
    other = PageRow(torch.tensor([1, 3]), BLOCK)
    g = torch.Generator().manual_seed(11)
    for io in tier.io[1:3]:
        k, v = torch.randn(2, 4, KV_HEADS, DIM, generator=g)
        io.write(k, v, other.slots(cpos[mask]))
    tier.park_prefill("s", 0, 1, 3, positions, x * -1.0, mask, cpos, scores)
    return {"r": pages, "s": other}


def _cache_state(tier):
    return [io.cache.clone() for io in tier.io]


def test_reroute_all_projects_once_per_layer_and_leaves_what_one_by_one_leaves(monkeypatch):
    """Two requests due at one layer: the pool ends as if each re-routed alone, in order
    (same active / parked units, same pool entries); the pages hold the same K/V (within
    rounding: one projection over both requests' rows, not one each). The guard: one K/V
    projection per stage layer for both, where one by one makes one per request."""
    from vllm_recroute.worker.parking import DueReroute

    results = []
    for batched in (False, True):
        tier, _, x, positions, mask, cpos, scores, pages = tier_setup()
        rows = _two_requests(tier, x, positions, mask, cpos, scores, pages)
        calls = []
        real = projections.KVRows.project

        def counting(self, normed, kv_size, values, _calls=calls, _real=real):
            _calls.append(int(normed.shape[0]))
            return _real(self, normed, kv_size, values)

        monkeypatch.setattr(projections.KVRows, "project", counting)
        due = [
            DueReroute(r, 0, query_towards(tier, r, 4 + i), 1.0, [rows[r], rows[r]])
            for i, r in enumerate("rs")
        ]
        if batched:
            delta = tier.reroute_all(due)
        else:
            delta = _delta()
            for d in due:
                for key, n in tier.reroute_all([d]).items():
                    delta[key] += n
        monkeypatch.setattr(projections.KVRows, "project", real)
        units = {r: tier.units[(r, 0)] for r in "rs"}
        state = {r: (sorted(u.active), sorted(u.parked)) for r, u in units.items()}
        results.append((delta, state, sorted(tier.pool.keys()), _cache_state(tier), calls))
    (d1, s1, p1, c1, calls1), (d2, s2, p2, c2, calls2) = results
    assert d1 == d2 and d1["restored_blocks"] >= 2  # both requests swapped: not vacuous
    assert s1 == s2 and p1 == p2
    for a, b in zip(c1, c2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(calls1) == 4 and len(calls2) == 2  # 2 stage layers x (2 requests | once)
    assert sum(calls2) == sum(calls1)  # the same rows, projected together

"""ParkedPool: roundtrip exactness, int8 error bound, capacity/drop order, counters."""

from __future__ import annotations

import pytest
import torch

from vllm_recroute.kv.parked_pool import (
    ParkedKey,
    ParkedKV,
    ParkedPool,
    ParkedPoolStats,
    ParkedState,
)

LAYERS, TOKENS, HEADS, DIM = 3, 16, 2, 8


def block(seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(LAYERS, TOKENS, HEADS, DIM, generator=g) * 3
    v = torch.randn(LAYERS, TOKENS, HEADS, DIM, generator=g)
    return k.to(dtype), v.to(dtype)


def key(req: str, i: int, stage: int = 1) -> ParkedKey:
    return ParkedKey(req, stage, i)


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[x.element_size()])


# ------------------------------------------------------------------ contract (both formats)


@pytest.mark.parametrize("compress", ["none", "int8"])
def test_pool_contract(compress):
    pool = ParkedPool(capacity_bytes=1 << 20, compress=compress)
    k, v = block(0)
    size = pool.entry_bytes(k, v)
    assert pool.park(key("a", 0), k, v, score=1.0) == []
    assert key("a", 0) in pool and len(pool) == 1
    assert pool.used_bytes == size
    torch.testing.assert_close(pool.digest(key("a", 0)), k[:1].float().mean(dim=1))

    rk, rv = pool.restore(key("a", 0))
    assert rk.dtype == k.dtype and rk.shape == k.shape and rv.shape == v.shape
    tol = 0.0 if compress == "none" else 0.1
    torch.testing.assert_close(rk, k, atol=tol, rtol=0)
    torch.testing.assert_close(rv, v, atol=tol, rtol=0)
    assert key("a", 0) not in pool and pool.used_bytes == 0
    with pytest.raises(KeyError):
        pool.restore(key("a", 0))

    for i in range(3):
        pool.park(key("a", i), *block(i), score=i)
    pool.park(key("b", 0), *block(9), score=0.5)
    assert pool.free_request("a") == [key("a", 0), key("a", 1), key("a", 2)]
    assert pool.keys() == [key("b", 0)]
    assert pool.free_request("a") == []
    assert pool.stats() == ParkedPoolStats(
        capacity_bytes=1 << 20,
        used_bytes=size,
        num_blocks=1,
        parks=5,
        restores=1,
        drops=0,
        discards=3,
    )
    pool.free_request("b")
    assert pool.used_bytes == 0 and len(pool) == 0


# ------------------------------------------------------------------ uncompressed: bit-exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_uncompressed_roundtrip_is_bit_exact(dtype):
    k, v = block(1, dtype)
    k[0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, -float("inf")])
    pool = ParkedPool(capacity_bytes=1 << 20)
    pool.park(key("a", 0), k, v, score=0.0)
    rk, rv = pool.restore(key("a", 0))
    assert torch.equal(bits(rk), bits(k)) and torch.equal(bits(rv), bits(v))


def test_park_copies_its_input():
    k, v = block(2)
    pool = ParkedPool(capacity_bytes=1 << 20)
    pool.park(key("a", 0), k, v, score=0.0)
    k_before = k.clone()
    k.zero_()  # the device page is reused after parking
    rk, _ = pool.restore(key("a", 0))
    assert torch.equal(rk, k_before)


# ------------------------------------------------------------------ int8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_error_is_within_half_a_step_per_channel(dtype):
    k, v = block(3, dtype)
    v[1, :, 0, 3] = 0.0  # an all-zero channel restores exactly
    pool = ParkedPool(capacity_bytes=1 << 20, compress="int8")
    pool.park(key("a", 0), k, v, score=0.0)
    rk, rv = pool.restore(key("a", 0))
    for x, r in ((k, rk), (v, rv)):
        xf = x.float()
        step = xf.abs().amax(dim=1, keepdim=True) / 127  # per layer, head, channel
        cast = 0.0 if dtype == torch.float32 else xf.abs().amax() * 2**-8  # bf16 rounding
        assert bool(((xf - r.float()).abs() <= step / 2 + cast + 1e-6).all())
    assert bool((rv[1, :, 0, 3] == 0).all())


def test_int8_entries_are_smaller():
    k, v = block(4)
    none = ParkedPool(1 << 20).entry_bytes(k, v)
    int8 = ParkedPool(1 << 20, compress="int8").entry_bytes(k, v)
    digest = HEADS * DIM * 4  # the stage's first layer's mean key
    assert none == 2 * k.numel() * 4 + digest
    assert int8 == 2 * k.numel() + 2 * LAYERS * HEADS * DIM * 4 + digest
    assert int8 < none / 2


# ------------------------------------------------------------------ capacity and drops


def test_full_pool_drops_the_least_useful_blocks_first():
    k, v = block(5)
    size = ParkedPool(0).entry_bytes(k, v)
    pool = ParkedPool(capacity_bytes=3 * size)
    for i, score in enumerate([0.5, 0.1, 0.9]):
        assert pool.park(key("a", i), *block(i), score=score) == []
    # full: a more useful block evicts the lowest score
    assert pool.park(key("b", 0), k, v, score=0.7) == [key("a", 1)]
    # equal scores: the older one goes first
    assert pool.park(key("b", 1), k, v, score=0.5) == [key("a", 0)]
    assert pool.keys() == [key("a", 2), key("b", 0), key("b", 1)]
    # the incoming block is the least useful: it is the one dropped, nothing evicted
    assert pool.park(key("c", 0), k, v, score=0.2) == [key("c", 0)]
    assert pool.keys() == [key("a", 2), key("b", 0), key("b", 1)]
    assert pool.used_bytes == 3 * size
    s = pool.stats()
    assert (s.parks, s.drops, s.restores, s.discards) == (5, 3, 0, 0)


def test_a_block_larger_than_the_pool_is_dropped_not_an_error():
    k, v = block(6)
    pool = ParkedPool(capacity_bytes=pool_bytes(k, v) - 1)
    assert pool.park(key("a", 0), k, v, score=1e9) == [key("a", 0)]
    assert len(pool) == 0 and pool.stats().drops == 1
    assert ParkedPool(0).park(key("a", 0), k, v, score=0) == [key("a", 0)]


def pool_bytes(k: torch.Tensor, v: torch.Tensor) -> int:
    return ParkedPool(0).entry_bytes(k, v)


def test_eviction_frees_several_small_blocks_for_one_large():
    small = block(7)
    k = torch.randn(LAYERS, 2 * TOKENS, HEADS, DIM)
    large = (k, k.clone())
    pool = ParkedPool(capacity_bytes=pool_bytes(*large) + pool_bytes(*small) // 2)
    pool.park(key("a", 0), *small, score=0.1)
    pool.park(key("a", 1), *small, score=0.2)
    assert pool.park(key("b", 0), *large, score=1.0) == [key("a", 0), key("a", 1)]
    assert pool.keys() == [key("b", 0)]


def test_re_parking_a_key_replaces_it_without_double_counting():
    pool = ParkedPool(capacity_bytes=1 << 20)
    k, v = block(8)
    pool.park(key("a", 0), k, v, score=0.1)
    pool.park(key("a", 0), v, k, score=0.3)
    assert len(pool) == 1 and pool.used_bytes == pool.entry_bytes(k, v)
    assert pool.score(key("a", 0)) == 0.3
    rk, _ = pool.restore(key("a", 0))
    assert torch.equal(rk, v)


def test_free_request_releases_everything_of_that_request_only():
    pool = ParkedPool(capacity_bytes=1 << 20, compress="int8")
    for i in range(4):
        pool.park(key("a", i, stage=1 + i % 2), *block(i), score=i)
    pool.park(key("b", 0), *block(10), score=0)
    b_bytes = pool.entry_bytes(*block(10))
    freed = pool.free_request("a")
    assert freed == sorted(freed) and len(freed) == 4
    assert pool.keys() == [key("b", 0)] and pool.keys("a") == []
    assert pool.used_bytes == b_bytes
    assert pool.free_request("b") == [key("b", 0)]
    assert pool.used_bytes == 0


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError):
        ParkedPool(-1)
    with pytest.raises(ValueError):
        ParkedPool(10, compress="fp8")  # type: ignore[arg-type]
    pool = ParkedPool(1 << 20)
    k, v = block(0)
    with pytest.raises(ValueError):
        pool.park(key("a", 0), k[0], v[0], score=0)
    with pytest.raises(ValueError):
        pool.park(key("a", 0), k, v.half(), score=0)


# ------------------------------------------------------------------ stage-entry states

HIDDEN = 24


def state(seed: int, dtype: torch.dtype = torch.float32, mrope: bool = False) -> ParkedState:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(TOKENS, HIDDEN, generator=g) * 2).to(dtype)
    pos = torch.arange(TOKENS) + 40
    return ParkedState(x, torch.stack([pos, pos // 4, pos % 4]) if mrope else pos)


@pytest.mark.parametrize("mrope", [False, True])
def test_a_state_comes_back_bit_exact_with_its_positions_and_digest(mrope):
    pool = ParkedPool(1 << 20)
    s, digest = state(0, torch.bfloat16, mrope), torch.randn(HEADS, DIM)
    size = pool.state_bytes(s, digest)
    assert size == s.x.nbytes + s.positions.nbytes + HEADS * DIM * 4
    assert pool.park_state(key("a", 0), s, digest, score=1.0) == []
    assert pool.used_bytes == size and torch.equal(pool.digest(key("a", 0)), digest[None])
    s.x.zero_()  # the caller's rows are reused after parking: the pool holds a copy
    back = pool.restore(key("a", 0))
    assert isinstance(back, ParkedState) and back.x.dtype == torch.bfloat16
    assert torch.equal(bits(back.x), bits(state(0, torch.bfloat16, mrope).x))
    assert torch.equal(back.positions, state(0, mrope=mrope).positions)
    assert pool.used_bytes == 0 and back.nbytes == size - HEADS * DIM * 4


def test_int8_state_is_per_hidden_channel_within_half_a_step():
    pool = ParkedPool(1 << 20, compress="int8")
    s, digest = state(1), torch.zeros(HEADS, DIM)
    s.x[:, 5] = 0.0  # an all-zero channel restores exactly
    size = pool.state_bytes(s, digest)
    assert size == s.x.numel() + HIDDEN * 4 + s.positions.nbytes + HEADS * DIM * 4
    pool.park_state(key("a", 0), s, digest, score=0.0)
    back = pool.restore(key("a", 0))
    step = s.x.abs().amax(0, keepdim=True) / 127
    assert bool(((back.x - s.x).abs() <= step / 2 + 1e-6).all())
    assert not torch.equal(back.x, s.x) and torch.equal(back.x[:, 5], s.x[:, 5])
    assert torch.equal(back.positions, s.positions)


def test_states_and_kv_share_one_budget_and_one_drop_order():
    k, v = block(0)
    s, digest = state(0), torch.zeros(HEADS, DIM)
    probe = ParkedPool(1 << 20)
    pool = ParkedPool(probe.entry_bytes(k, v) + probe.state_bytes(s, digest))
    assert pool.park(key("a", 0), k, v, score=0.2) == []
    assert pool.park_state(key("a", 1), s, digest, score=0.1) == []
    # no room for another state: the least useful entry (the state at 0.1) goes
    assert pool.park_state(key("b", 0), s, digest, score=0.5) == [key("a", 1)]
    assert isinstance(pool.restore(key("a", 0)), ParkedKV)


def test_bad_states_are_rejected():
    pool = ParkedPool(1 << 20)
    s = state(0)
    with pytest.raises(ValueError, match="positions"):
        pool.park_state(key("a", 0), ParkedState(s.x, s.positions[:3]), torch.zeros(2, 8), 0)
    with pytest.raises(ValueError, match="digest"):
        pool.park_state(key("a", 0), s, torch.zeros(8), 0)

"""RoutedStageManager: exact block IDs for allocate / defer (release) / free, on a
BlockPool shared by several stage groups (style of vLLM's tests/v1/core)."""

from __future__ import annotations

import pytest
import torch
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import BlockHash
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

from vllm_recroute.kv.manager import ReleasedBlocks, RoutedStageManager
from vllm_recroute.kv.spec import register_stage_spec, stage_spec_from
from vllm_recroute.kv.table_view import CompactedRow

BLOCK = 4
BASE = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=1, dtype=torch.float32)


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_stage_spec()


def make_pool(num_blocks: int = 20, enable_caching: bool = False) -> BlockPool:
    return BlockPool(
        num_gpu_blocks=num_blocks, enable_caching=enable_caching, hash_block_size=BLOCK
    )


def make_manager(
    pool: BlockPool, stage: int = 1, group_id: int = 1, enable_caching: bool = False
) -> RoutedStageManager:
    return RoutedStageManager(
        stage_spec_from(BASE, stage),
        block_pool=pool,
        enable_caching=enable_caching,
        kv_cache_group_id=group_id,
        scheduler_block_size=BLOCK,
    )


def row_ids(manager: RoutedStageManager, req: str) -> list[int]:
    return [b.block_id for b in manager.req_to_blocks[req]]


def test_allocates_like_full_attention_before_routing():
    pool = make_pool()
    m = make_manager(pool)
    assert pool.get_num_free_blocks() == 19  # block 0 is the null block
    assert m.get_num_blocks_to_allocate("a", 18, [], 0, 0, 18) == 5
    blocks = m.allocate_new_blocks("a", 18, 18)
    assert [b.block_id for b in blocks] == [1, 2, 3, 4, 5]
    assert pool.get_num_free_blocks() == 14
    assert m.can_release("a") == 0
    assert m.release("a") == []


def test_defer_releases_tail_blocks_to_the_shared_pool():
    pool = make_pool()
    m = make_manager(pool)
    m.allocate_new_blocks("a", 18, 18)  # 18 tokens -> blocks 1..5
    assert m.set_deferred("a", 9)  # 9 compacted-away tokens -> 9 active -> 3 blocks
    assert m.get_deferred("a") == 9
    assert m.can_release("a") == 2
    assert m.release("a") == [5, 4]  # tail first
    assert row_ids(m, "a") == [1, 2, 3, 0, 0]  # null in place, row stays worker-aligned
    assert m.live_block_ids("a") == [1, 2, 3]
    assert pool.get_num_free_blocks() == 16
    assert m.take_released() == [
        ReleasedBlocks("a", kv_cache_group_id=1, stage=1, row_indices=(4, 3), block_ids=(5, 4))
    ]
    assert m.take_released() == []
    assert m.num_released_blocks == 2

    # freed pages are free for every group on the pool (LIFO reuse)
    other = make_manager(pool, stage=2, group_id=2)
    assert [b.block_id for b in other.allocate_new_blocks("b", 8, 8)] == [5, 4]

    # decode continues on the compacted sequence: 9 -> 12 compacted tokens fit in 3 blocks
    assert m.get_num_blocks_to_allocate("a", 21, [], 20, 0, 21) == 0
    assert m.allocate_new_blocks("a", 21, 21) == []
    # the 13th compacted token needs a 4th live block, appended after the holes
    assert m.get_num_blocks_to_allocate("a", 22, [], 21, 0, 22) == 1
    assert [b.block_id for b in m.allocate_new_blocks("a", 22, 22)] == [6]
    assert row_ids(m, "a") == [1, 2, 3, 0, 0, 6]
    assert m.live_block_ids("a") == [1, 2, 3, 6]

    m.free("a")
    other.free("b")
    assert pool.get_num_free_blocks() == 19


def test_release_keeps_slots_of_in_flight_tokens():
    """The scheduler already gave slots for 18 + 4 lookahead tokens of a step that may
    still run: only blocks beyond cdiv(22 - deferred, B) may go."""
    pool = make_pool()
    m = make_manager(pool)
    m.allocate_new_blocks("a", 22, 18)  # blocks 1..6
    m.set_deferred("a", 9)  # 22 - 9 = 13 -> keep 4
    assert m.release("a") == [6, 5]
    assert m.live_block_ids("a") == [1, 2, 3, 4]


def test_release_runs_from_remove_skipped_blocks():
    """KVCacheManager.allocate_slots calls remove_skipped_blocks before each allocation."""
    pool = make_pool()
    m = make_manager(pool)
    m.allocate_new_blocks("a", 16, 16)
    m.set_deferred("a", 8)
    m.remove_skipped_blocks("a", 16)
    assert row_ids(m, "a") == [1, 2, 0, 0]
    m.remove_skipped_blocks("unknown", 0)  # no-op, creates nothing
    assert "unknown" not in m.req_to_blocks


def test_smaller_deferred_count_grows_again_on_next_allocation():
    """A restore lowers the deferred count; the next allocation appends live blocks."""
    pool = make_pool()
    m = make_manager(pool)
    m.allocate_new_blocks("a", 16, 16)
    m.set_deferred("a", 12)
    assert m.release("a") == [4, 3, 2]
    m.set_deferred("a", 4)  # 8 tokens restored
    assert m.can_release("a") == 0
    assert m.get_num_blocks_to_allocate("a", 17, [], 16, 0, 17) == 3
    assert [b.block_id for b in m.allocate_new_blocks("a", 17, 17)] == [4, 3, 2]  # LIFO
    assert row_ids(m, "a") == [1, 0, 0, 0, 4, 3, 2]
    assert m.live_block_ids("a") == [1, 4, 3, 2]


def test_stale_reports_are_ignored():
    pool = make_pool()
    m = make_manager(pool)
    assert not m.set_deferred("never-allocated", 3)
    m.allocate_new_blocks("a", 8, 8)
    m.free("a")  # abort / preemption
    assert not m.set_deferred("a", 4)  # report of a step that ran before the free
    assert m.get_deferred("a") == 0
    assert [b.block_id for b in m.allocate_new_blocks("a", 8, 8)] == [2, 1]  # LIFO reuse
    with pytest.raises(ValueError):
        m.set_deferred("a", -1)


def test_free_returns_every_live_block_and_never_the_null_block():
    pool = make_pool()
    m = make_manager(pool)
    m.allocate_new_blocks("a", 20, 20)
    m.set_deferred("a", 11)
    m.release("a")
    null_ref = pool.null_block.ref_cnt
    popped = m.pop_blocks_for_free("a")
    assert [b.block_id for b in popped] == [1, 2, 3]
    pool.free_blocks(reversed(popped))
    assert pool.null_block.ref_cnt == null_ref
    assert pool.get_num_free_blocks() == 19
    assert m.get_deferred("a") == 0


def test_never_caches_and_never_hits():
    pool = make_pool(enable_caching=True)
    m = make_manager(pool, enable_caching=True)
    m.allocate_new_blocks("a", 16, 16)
    m.cache_blocks(object(), 16, replay_boundaries=[])
    assert all(b.block_hash is None for b in m.req_to_blocks["a"])
    hashes = [BlockHash(str(i).encode()) for i in range(4)]
    blocks, hit = RoutedStageManager.find_longest_cache_hit(
        block_hashes=hashes,
        max_length=16,
        kv_cache_group_ids=[1, 2],
        block_pool=pool,
        kv_cache_spec=m.kv_cache_spec,
        drop_eagle_block=False,
        alignment_tokens=BLOCK,
    )
    assert blocks == ([], []) and hit == 0


def test_external_kv_is_refused():
    m = make_manager(make_pool())
    m.allocate_external_computed_blocks("a", 0, 0)  # nothing external: fine
    with pytest.raises(RuntimeError, match="cannot be imported"):
        m.allocate_external_computed_blocks("a", 0, 8)


def test_manager_requires_stage_spec():
    with pytest.raises(TypeError):
        RoutedStageManager(
            BASE,
            block_pool=make_pool(),
            enable_caching=False,
            kv_cache_group_id=0,
            scheduler_block_size=BLOCK,
        )


# ------------------------------------------------------------------ through the coordinator


def stage_config(num_blocks: int) -> KVCacheConfig:
    groups = [
        KVCacheGroupSpec([f"model.layers.{s}.self_attn.attn"], stage_spec_from(BASE, s))
        for s in range(3)
    ]
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=groups)


def make_coordinator(enable_caching: bool):
    from vllm.v1.core.kv_cache_coordinator import get_kv_cache_coordinator

    return get_kv_cache_coordinator(
        stage_config(40),
        max_model_len=256,
        max_in_flight_tokens=256,
        use_eagle=False,
        enable_caching=enable_caching,
        enable_kv_cache_events=False,
        dcp_world_size=1,
        pcp_world_size=1,
        scheduler_block_size=BLOCK,
        hash_block_size=BLOCK,
    )


def allocate(coord, req: str, num_tokens: int) -> list[list[int]]:
    n = coord.get_num_blocks_to_allocate(req, num_tokens, ([], [], []), 0, 0, 0, num_tokens)
    assert n <= coord.block_pool.get_num_free_blocks()
    new = coord.allocate_new_blocks(req, num_tokens, num_tokens)
    return [[b.block_id for b in blocks] for blocks in new]


@pytest.mark.parametrize("enable_caching", [False, True])
def test_coordinator_builds_our_managers_on_one_pool(enable_caching):
    coord = make_coordinator(enable_caching)
    managers = coord.single_type_managers
    assert [type(m) for m in managers] == [RoutedStageManager] * 3
    assert [m.stage for m in managers] == [0, 1, 2]
    assert all(m.block_pool is coord.block_pool for m in managers)
    start = coord.block_pool.get_num_free_blocks()

    if enable_caching:  # hybrid coordinator: zero hits for routed models, never garbage
        hashes = [BlockHash(str(i).encode()) for i in range(4)]
        blocks, hit, _ = coord.find_longest_cache_hit(hashes, 16)
        assert hit == 0 and blocks == ([], [], [])
        coord.allocate_new_computed_blocks("a", ([], [], []), 0, 0)

    assert allocate(coord, "a", 10) == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    managers[1].set_deferred("a", 6)  # stage 1: 4 active
    managers[2].set_deferred("a", 9)  # stage 2: 1 active
    coord.remove_skipped_blocks("a", 10)
    assert coord.block_pool.get_num_free_blocks() == start - 9 + 2 + 2
    assert [m.live_block_ids("a") for m in managers] == [[1, 2, 3], [4], [7]]
    # the next request gets the released pages (LIFO)
    assert allocate(coord, "b", 4) == [[9], [8], [6]]
    coord.free("a")
    coord.free("b")
    assert coord.block_pool.get_num_free_blocks() == start


# ------------------------------------------------------------------ mixed sequence


def test_mixed_sequence_returns_the_pool_to_its_start_and_mirrors_the_worker():
    """Prefill, route, decode, restore, abort, preempt + resume, finish, across three stage
    groups sharing one pool; the worker's mirror (append-only row + release events) always
    equals the manager's compacted table, and the free-block count ends where it began."""
    pool = make_pool(num_blocks=96)
    managers = [make_manager(pool, stage=s, group_id=s) for s in range(3)]
    start = pool.get_num_free_blocks()
    rows: dict[tuple[int, str], CompactedRow] = {}
    tokens: dict[str, int] = {}

    def step(req: str, num_tokens: int) -> None:
        """One scheduler step of one request (release, then allocate), then the worker."""
        tokens[req] = num_tokens
        for m in managers:
            m.remove_skipped_blocks(req, num_tokens)
        need = sum(
            m.get_num_blocks_to_allocate(req, num_tokens, [], 0, 0, num_tokens) for m in managers
        )
        assert need <= pool.get_num_free_blocks()
        for m in managers:
            new = m.allocate_new_blocks(req, num_tokens, num_tokens)
            rows.setdefault((m.stage, req), CompactedRow()).append(b.block_id for b in new)
        sync()
        for m in managers:  # the stepped request holds exactly its compacted length
            expect = m.kv_cache_spec.live_blocks_for(num_tokens, m.get_deferred(req))
            assert len(m.live_block_ids(req)) == expect, (m.stage, req)

    def sync() -> None:
        for m in managers:
            for ev in m.take_released():
                rows[(ev.stage, ev.request_id)].release(ev.row_indices, ev.block_ids)
        for (stage, req), row in rows.items():
            assert row.compacted() == managers[stage].live_block_ids(req), (stage, req)

    def route(req: str, deferred: tuple[int, int]) -> None:
        managers[1].set_deferred(req, deferred[0])
        managers[2].set_deferred(req, deferred[1])

    def drop(req: str) -> None:
        for m in managers:
            m.free(req)
            rows.pop((m.stage, req), None)
        tokens.pop(req, None)

    step("a", 37)  # prefill: every stage holds 10 blocks
    step("b", 21)
    assert pool.get_num_free_blocks() == start - 3 * 10 - 3 * 6
    route("a", (16, 28))
    route("b", (8, 16))
    for n in range(38, 46):  # decode a
        step("a", n)
    step("b", 22)
    assert pool.get_num_free_blocks() == start - (12 + 8 + 5) - (6 + 4 + 2)  # a: 45, b: 22
    route("a", (4, 28))  # decode-time restore of 12 tokens at stage 1
    step("a", 46)
    step("c", 30)  # new request: gets pages released by a and b
    drop("b")  # abort mid-decode
    route("c", (20, 24))
    step("c", 31)
    drop("c")  # preemption ...
    step("c", 31)  # ... and resume: full allocation again, no holes
    assert all(0 not in [b.block_id for b in m.req_to_blocks["c"]] for m in managers)
    route("c", (20, 24))
    step("c", 32)
    drop("a")  # finish
    drop("c")
    assert pool.get_num_free_blocks() == start
    assert all(not m.req_to_blocks for m in managers)

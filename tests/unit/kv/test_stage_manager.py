"""RoutedStageManager: exact block IDs for allocate / defer (release) / free, on a
BlockPool shared by several stage groups (style of vLLM's tests/v1/core)."""

from __future__ import annotations

import pytest
import torch
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import BlockHash
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

from vllm_recroute.kv.manager import DeferralPlan, RoutedStageManager, register_stage_spec
from vllm_recroute.kv.spec import stage_spec_from
from vllm_recroute.kv.table_view import ReleasedRows, compact_row
from vllm_recroute.messages import ReleasedBlocks

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


def test_external_kv_is_refused_unless_a_kept_turn_was_offered():
    m = make_manager(make_pool())
    m.allocate_external_computed_blocks("a", 0, 0)  # nothing external: fine
    with pytest.raises(RuntimeError, match="cannot be imported"):
        m.allocate_external_computed_blocks("a", 0, 8)
    m.expect_deferred("a", 3)
    m.expect_deferred("a", None)  # offer withdrawn (the request was not scheduled)
    with pytest.raises(RuntimeError, match="cannot be imported"):
        m.allocate_external_computed_blocks("a", 0, 8)


def test_a_loaded_turn_gets_compacted_blocks_and_frees_them_all():
    """Later-turn restore: 4 text tokens hit vLLM's cache (block 1, computed by "t1"), a
    kept turn supplies tokens 4..21, 9 of them deferred at this stage: 13 compacted rows
    need 4 live blocks, so 3 new ones; decoding continues on the compacted sequence."""
    pool = make_pool(enable_caching=True)
    m = make_manager(pool, enable_caching=True)
    m.allocate_new_blocks("t1", 4, 4)  # block 1: the cached text block
    hit = list(m.req_to_blocks["t1"])
    m.expect_deferred("t2", 9)
    m.add_local_computed_blocks("t2", hit, 4, 18)
    m.allocate_external_computed_blocks("t2", 4, 18)
    assert row_ids(m, "t2") == [1, 2, 3, 4]
    assert m.get_deferred("t2") == 9 and m.can_release("t2") == 0
    assert m.allocate_new_blocks("t2", 23, 23) == []  # 14 compacted rows: still 4 blocks
    assert [b.block_id for b in m.allocate_new_blocks("t2", 26, 26)] == [5]  # 17 rows
    assert m.release("t2") == []
    m.free("t2")
    m.free("t1")
    assert pool.get_num_free_blocks() == 19  # every block back, the null block never out
    assert m.get_deferred("t2") == 0


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

    if enable_caching:  # hybrid coordinator, empty cache: no hit
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
    rows: dict[tuple[int, str], list[int]] = {}  # the worker's append-only rows
    released = ReleasedRows()  # the worker's record of released entries (production model)
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
            rows.setdefault((m.stage, req), []).extend(b.block_id for b in new)
        sync()
        for m in managers:  # the stepped request holds exactly its compacted length
            expect = -(-max(num_tokens - m.get_deferred(req), 0) // m.block_size)
            assert len(m.live_block_ids(req)) == expect, (m.stage, req)

    def sync() -> None:
        for m in managers:
            for ev in m.take_released():
                row = rows[(ev.stage, ev.request_id)]
                assert [row[i] for i in ev.row_indices] == list(ev.block_ids)
                released.apply(ev.request_id, ev.kv_cache_group_id, ev.row_indices)
        for (stage, req), row in rows.items():
            live = compact_row(row, released.dead(req, stage))  # group id == stage here
            assert live == managers[stage].live_block_ids(req), (stage, req)

    def route(req: str, deferred: tuple[int, int]) -> None:
        managers[1].set_deferred(req, deferred[0])
        managers[2].set_deferred(req, deferred[1])

    def drop(req: str) -> None:
        for m in managers:
            m.free(req)
            rows.pop((m.stage, req), None)
        released.forget({req})
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


# ------------------------------------------------------------------ prefix caching


class FakeRequest:
    """What the managers read from a vLLM Request: id, block hashes, image offsets."""

    def __init__(self, rid: str, num_tokens: int, image_at: int | None, prefix: str = "p"):
        from types import SimpleNamespace

        self.request_id = rid
        self.num_prompt_tokens = num_tokens
        self.shared_prefix_boundary = 0
        # the same hashes for the same prefix string: block i of "p" matches across requests
        self.block_hashes = [BlockHash(f"{prefix}{i}".encode()) for i in range(num_tokens // BLOCK)]
        pos = SimpleNamespace(offset=image_at)
        self.mm_features = [] if image_at is None else [SimpleNamespace(mm_position=pos)]


def run_prompt(coord, req: FakeRequest) -> tuple[int, list[list[int]]]:
    """Schedule a whole prompt like the scheduler: lookup, hits, allocate, cache."""
    n = req.num_prompt_tokens
    hit_blocks, hit, _ = coord.find_longest_cache_hit(req.block_hashes, n - 1)
    assert (
        coord.get_num_blocks_to_allocate(req.request_id, n, hit_blocks, hit, hit, 0, n)
        <= coord.block_pool.get_num_free_blocks()
    )
    coord.allocate_new_computed_blocks(req.request_id, hit_blocks, hit, 0)
    coord.allocate_new_blocks(req.request_id, n, n)
    coord.cache_blocks(req, n)
    rows = [
        [b.block_id for b in m.req_to_blocks[req.request_id]] for m in coord.single_type_managers
    ]
    return hit, rows


def test_routed_stages_cache_only_before_the_first_image():
    coord = make_coordinator(enable_caching=True)
    start = coord.block_pool.get_num_free_blocks()
    # 17 tokens: blocks 0-3 full; the image starts at token 9 (inside block 2)
    hit, rows = run_prompt(coord, FakeRequest("a", 17, image_at=9))
    assert hit == 0
    assert rows == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15]]
    cached = [[b.block_id for b in m.req_to_blocks["a"] if b.block_hash is not None]
              for m in coord.single_type_managers]  # fmt: skip
    # stage 0: every full block; routed stages: the two blocks before the image only
    assert cached == [[1, 2, 3, 4], [6, 7], [11, 12]]
    # same text prefix, same image, another question: hits the text blocks in every group
    hit, rows = run_prompt(coord, FakeRequest("b", 17, image_at=9))
    assert hit == 2 * BLOCK
    assert [r[:2] for r in rows] == [[1, 2], [6, 7], [11, 12]]
    assert all(r[2] not in (3, 8, 13) for r in rows)  # image blocks are never shared
    coord.free("a")
    coord.free("b")
    assert coord.block_pool.get_num_free_blocks() == start


def test_text_only_prompts_cache_every_block_in_every_stage():
    coord = make_coordinator(enable_caching=True)
    run_prompt(coord, FakeRequest("a", 16, image_at=None))
    hit, rows = run_prompt(coord, FakeRequest("b", 16, image_at=None))
    assert hit == 12  # the last token is always recomputed: 3 of 4 blocks
    assert [r[:3] for r in rows] == [[1, 2, 3], [5, 6, 7], [9, 10, 11]]


def test_a_hit_then_routing_releases_only_uncached_tail_blocks():
    coord = make_coordinator(enable_caching=True)
    run_prompt(coord, FakeRequest("a", 17, image_at=9))
    coord.free("a")
    hit, rows = run_prompt(coord, FakeRequest("b", 17, image_at=9))
    assert hit == 8 and [len(r) for r in rows] == [5, 5, 5]
    managers = coord.single_type_managers
    managers[1].set_deferred("b", 6)  # 11 active at stage 1 -> 3 blocks
    managers[2].set_deferred("b", 8)  # 9 active at stage 2 -> 3 blocks
    coord.remove_skipped_blocks("b", 17)
    events = [e for m in managers for e in m.take_released()]
    assert [(e.stage, e.row_indices) for e in events] == [(1, (4, 3)), (2, (4, 3))]
    # the cached text blocks (rows 0, 1) stay, still cached for the next request
    assert [m.live_block_ids("b")[:2] for m in managers] == [rows[0][:2], rows[1][:2], rows[2][:2]]
    assert all(b.block_hash is not None for m in managers[1:] for b in m.req_to_blocks["b"][:2])


# ---------------------------------------------------------------- plans (no transient)


def test_a_planned_prefill_takes_only_its_compacted_pages():
    """18-token prompt, image at 2, 9 tokens deferred at this stage: 3 pages from the first
    step (not 5 and a release of 2); decode, finish back to an empty pool."""
    pool = make_pool()
    m = make_manager(pool)
    m.plan("a", DeferralPlan(deferred=9, first_image=2, prompt_len=18))
    assert m.get_num_blocks_to_allocate("a", 18, [], 0, 0, 18) == 3
    assert [b.block_id for b in m.allocate_new_blocks("a", 18, 18)] == [1, 2, 3]
    assert pool.get_num_free_blocks() == 16
    assert m.get_deferred("a") == 9 and m.planned("a") == 9
    assert m.take_never_allocated() == 2
    # the worker's report equals the plan: a consistency check, nothing to release
    assert m.set_deferred("a", 9)
    assert m.release("a") == [] and m.take_released() == []
    # decode: 12 compacted tokens fit, the 13th gets block 4
    assert m.allocate_new_blocks("a", 21, 21) == []
    assert [b.block_id for b in m.allocate_new_blocks("a", 22, 22)] == [4]
    assert row_ids(m, "a") == [1, 2, 3, 4]
    m.free("a")
    assert pool.get_num_free_blocks() == 19
    assert m.planned("a") is None


def test_a_plan_waits_through_chunks_before_the_image():
    """Chunked before the first image: the text chunk is uncompacted, the chunk holding
    the rest of the prompt is compacted."""
    pool = make_pool()
    m = make_manager(pool)
    m.plan("a", DeferralPlan(deferred=8, first_image=8, prompt_len=20))
    assert [b.block_id for b in m.allocate_new_blocks("a", 8, 8)] == [1, 2]  # text
    assert m.planned("a") is None  # still pending
    assert m.get_num_blocks_to_allocate("a", 20, [], 8, 0, 20) == 1  # 12 compacted -> 3
    assert [b.block_id for b in m.allocate_new_blocks("a", 20, 20)] == [3]
    assert m.planned("a") == 8 and m.take_never_allocated() == 2
    m.free("a")
    assert pool.get_num_free_blocks() == 19


def test_a_prompt_split_inside_the_routed_span_drops_its_plan():
    """The worker runs such a prompt unrouted: every token needs its page."""
    pool = make_pool()
    m = make_manager(pool)
    m.plan("a", DeferralPlan(deferred=8, first_image=4, prompt_len=20))
    m.allocate_new_blocks("a", 12, 12)  # ends inside the image span
    assert [b.block_id for b in m.allocate_new_blocks("a", 20, 20)] == [4, 5]
    assert row_ids(m, "a") == [1, 2, 3, 4, 5]
    assert m.planned("a") is None and m.take_never_allocated() == 0
    m.free("a")


def test_a_block_granularity_plan_is_a_floor_the_report_settles():
    """Block granularity plans the fewest deferred tokens; a larger report releases the
    surplus tail at once (the only remaining release)."""
    pool = make_pool()
    m = make_manager(pool)
    m.plan("a", DeferralPlan(deferred=4, first_image=2, prompt_len=18))
    assert [b.block_id for b in m.allocate_new_blocks("a", 18, 18)] == [1, 2, 3, 4]
    assert m.set_deferred("a", 9)  # 9 active -> 3 blocks
    assert m.release("a") == [4]
    assert m.take_released() == [
        ReleasedBlocks("a", kv_cache_group_id=1, stage=1, row_indices=(3,), block_ids=(4,))
    ]
    m.free("a")
    assert pool.get_num_free_blocks() == 19


def test_a_report_below_the_plan_is_an_error():
    pool = make_pool()
    m = make_manager(pool)
    m.plan("a", DeferralPlan(deferred=9, first_image=2, prompt_len=18))
    m.allocate_new_blocks("a", 18, 18)
    with pytest.raises(RuntimeError, match="fewer than the 9 planned"):
        m.set_deferred("a", 8)
    m.free("a")


def test_plans_of_aborted_and_preempted_requests_are_dropped():
    pool = make_pool()
    m = make_manager(pool)
    m.plan("waiting", DeferralPlan(deferred=9, first_image=2, prompt_len=18))
    m.free("waiting")  # aborted before any allocation
    assert m._plans == {} and m._planned == {}
    m.plan("p", DeferralPlan(deferred=9, first_image=2, prompt_len=18))
    m.allocate_new_blocks("p", 18, 18)
    m.free("p")  # preempted: re-planned when it is scheduled again
    assert m.get_deferred("p") == 0 and m.planned("p") is None
    # a re-plan of None withdraws
    m.plan("q", DeferralPlan(deferred=9, first_image=2, prompt_len=18))
    m.plan("q", None)
    assert len(m.allocate_new_blocks("q", 18, 18)) == 5  # uncompacted: no plan
    m.free("q")
    assert pool.get_num_free_blocks() == 19

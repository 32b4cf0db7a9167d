"""Scheduler-side block manager of one routing-stage KV-cache group.

A request's active tokens at a stage are written *compacted*: compacted position ``c``
lives in slot ``c % block_size`` of the request's ``c // block_size``-th *live* block.
This manager allocates live blocks for ``num_tokens - deferred`` tokens (like full
attention, just shorter).

Compacted from the first step. Before a routed prompt's prefill is scheduled, the
scheduler-side connector plans the stage's deferred count (`DeferralPlan`, from
``routing/deferral.py``: the budget fixes the count, not the scores). The allocation that
covers the whole prompt takes only the compacted pages; no full-length transient. An
allocation that ends past the first image but short of the prompt's end means the prompt
was split there: the worker runs it unrouted, so the plan is dropped. The worker's
reported count then becomes a consistency check: equal (token granularity), or larger
(block granularity, where the plan is a lower bound), in which case the surplus tail
blocks go back to the shared ``BlockPool`` at once (a release event, as before plans).

Row alignment with the worker. vLLM's worker block table is append-only for a running
request (`vllm/v1/core/sched/output.py:CachedRequestData.new_block_ids`: appended unless
the request is resumed). So a released block is replaced by ``null_block`` *in place*
(as `SlidingWindowManager` does, `single_type_kv_cache_manager.py:_remove_blocks_in_range`)
and later blocks are appended after it: ``req_to_blocks[r][i]`` is always the block the
worker holds at row index ``i``. The live (non-null) entries in row order are the
compacted table. Each release is recorded as a :class:`ReleasedBlocks` event; the
scheduler-side connector forwards the events to the worker, which drops the same row
indices from its compacted view (:class:`~vllm_recroute.kv.table_view.ReleasedRows`).

In-flight safety. A release never touches a block an already-scheduled step may write:
the manager keeps ``cdiv(max_tokens - deferred, block_size)`` live blocks where
``max_tokens`` is the largest ``num_tokens`` it was asked to give slots for (that bound
includes every scheduled, possibly still running, step and its lookahead tokens).

Prefix caching, by routing context. Stage 0 holds every token's KV computed from the
prefix alone, so it caches like full attention. A routed stage's KV after a request's first
image depends on the routing decision, which depends on the question (and mode, budget):
a routed stage caches only the whole blocks *before the request's first image*, which no
routing decision touches (text-only requests: every block). So a routed-stage block
computed under one routing context is never served to another, and a later request
sharing a text prefix (system prompt, earlier text) hits it in every group. vLLM keeps
one hit length per request (the minimum over groups,
`kv_cache_coordinator.py:HybridKVCacheCoordinator.find_longest_cache_hit`), so stage 0's
image blocks are cached but cannot be hit while the routed stages miss them. The spec
stays ``prefix_cacheable``: a non-cacheable group would be *skipped* by that minimum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

from vllm_recroute import vllm_view
from vllm_recroute.kv.spec import RoutedStageSpec
from vllm_recroute.messages import ReleasedBlocks

__all__ = ["DeferralPlan", "RoutedStageManager", "register_stage_spec"]


@dataclass(frozen=True)
class DeferralPlan:
    """A routed prompt's deferred count at one stage, known before its prefill.

    It applies to the allocation that gives slots up to ``prompt_len`` (the step that
    computes the prompt from ``first_image`` on); one ending in ``(first_image,
    prompt_len)`` splits the routed span, which the worker runs unrouted."""

    deferred: int
    first_image: int
    prompt_len: int

    def __post_init__(self) -> None:
        if self.deferred < 0 or not 0 <= self.first_image < self.prompt_len:
            raise ValueError(f"invalid DeferralPlan {self}")


class RoutedStageManager(FullAttentionManager):
    """Full attention over the compacted sequence; tail pages of deferred tokens freed."""

    supports_fine_grained_hash_lookup: ClassVar[bool] = False

    def __init__(self, kv_cache_spec: RoutedStageSpec, **kwargs: Any) -> None:
        if not isinstance(kv_cache_spec, RoutedStageSpec):
            raise TypeError(f"RoutedStageManager needs a RoutedStageSpec, got {kv_cache_spec}")
        super().__init__(kv_cache_spec, **kwargs)
        self.stage = kv_cache_spec.stage
        self._deferred: dict[str, int] = {}
        self._max_tokens: dict[str, int] = {}
        self._released: list[ReleasedBlocks] = []
        # later-turn restore: deferred counts of kept turns offered to waiting requests
        self._expected: dict[str, int] = {}
        self._plans: dict[str, DeferralPlan] = {}  # planned, not yet allocated
        self._planned: dict[str, int] = {}  # the committed plan (the consistency check)
        self._never_allocated = 0  # pages a plan saved (take_never_allocated)

    # ------------------------------------------------------------------ deferred counts

    def set_deferred(self, request_id: str, num_deferred: int) -> bool:
        """Record how many of the request's tokens have no KV at this stage.

        Comes from the worker's routing decision. Ignored (returns False) for a request
        that holds no blocks here (finished, aborted or preempted since the report was
        produced): a recomputed prefill reports again. A decrease (restored blocks) is
        allowed; blocks for it are allocated by the next ``allocate_new_blocks``.
        """
        if num_deferred < 0:
            raise ValueError(f"num_deferred must be >= 0, got {num_deferred}")
        if request_id not in self.req_to_blocks:
            return False
        planned = self._planned.get(request_id)
        if planned is not None and num_deferred < planned:
            # The worker wrote more tokens than the plan gave pages for: a bug in the
            # plan (routing/deferral.py), never expected; the worker refuses to write
            # past its live blocks (worker/compaction.py), so this only reports it.
            raise RuntimeError(
                f"vllm-recroute: request {request_id} stage {self.stage}: the worker "
                f"deferred {num_deferred} tokens, fewer than the {planned} planned"
            )
        self._deferred[request_id] = num_deferred
        return True

    def get_deferred(self, request_id: str) -> int:
        return self._deferred.get(request_id, 0)

    def num_live_blocks(self, request_id: str) -> int:
        return sum(not b.is_null for b in self.req_to_blocks.get(request_id, ()))

    def live_block_ids(self, request_id: str) -> list[int]:
        """The compacted block table of the request (row order, holes removed)."""
        return [b.block_id for b in self.req_to_blocks.get(request_id, ()) if not b.is_null]

    def _compacted(self, request_id: str, num_tokens: int) -> int:
        return max(num_tokens - self._deferred.get(request_id, 0), 0)

    # ------------------------------------------------------------------ plans (pair)

    def plan(self, request_id: str, plan: DeferralPlan | None) -> None:
        """The scheduler's plan for a waiting request (None: nothing routed, or withdrawn).
        Re-planned each time the request is considered (a preempted one starts afresh)."""
        if plan is None or plan.deferred == 0:
            self._plans.pop(request_id, None)
        else:
            self._plans[request_id] = plan

    def _plan_for(self, request_id: str, num_tokens: int) -> int:
        """Deferred tokens an allocation up to ``num_tokens`` slots should leave out."""
        if request_id in self._deferred:
            return self._deferred[request_id]
        plan = self._plans.get(request_id)
        return plan.deferred if plan is not None and num_tokens >= plan.prompt_len else 0

    def _commit_plan(self, request_id: str, num_tokens: int) -> None:
        plan = self._plans.get(request_id)
        if plan is None or request_id in self._deferred:
            return
        if num_tokens >= plan.prompt_len:
            del self._plans[request_id]
            self._deferred[request_id] = self._planned[request_id] = plan.deferred
            full = cdiv(num_tokens, self.block_size)
            self._never_allocated += full - cdiv(num_tokens - plan.deferred, self.block_size)
        elif num_tokens > plan.first_image:
            del self._plans[request_id]  # split inside the routed span: runs unrouted

    def take_never_allocated(self) -> int:
        """Pages plans saved (never taken from the pool) since the last call, drained by
        the scheduler-side connector for ``kv_blocks_released``."""
        n, self._never_allocated = self._never_allocated, 0
        return n

    def planned(self, request_id: str) -> int | None:
        """The committed plan of a running request (None: it had none)."""
        return self._planned.get(request_id)

    # ------------------------------------------------------------------ release (pair)

    def _keep(self, request_id: str) -> int:
        max_tokens = self._max_tokens.get(request_id, 0)
        return cdiv(self._compacted(request_id, max_tokens), self.block_size)

    def can_release(self, request_id: str) -> int:
        """Number of live blocks ``release`` would return to the pool now."""
        if request_id not in self._max_tokens:  # nothing allocated through us yet
            return 0
        return max(self.num_live_blocks(request_id) - self._keep(request_id), 0)

    def release(self, request_id: str) -> list[int]:
        """Free the live blocks beyond what the request's compacted length (including
        in-flight tokens) needs; they become ``null_block`` in the row. Returns their IDs
        (tail first: the order they were handed to ``BlockPool.free_blocks``)."""
        if self.can_release(request_id) == 0:
            return []
        blocks = self.req_to_blocks[request_id]
        keep = self._keep(request_id)
        live_rows = [i for i, b in enumerate(blocks) if not b.is_null]
        rows = live_rows[keep:][::-1]
        freed = [blocks[i] for i in rows]
        for i in rows:
            blocks[i] = self._null_block
        self.block_pool.free_blocks(freed)
        self._released.append(
            ReleasedBlocks(
                request_id=request_id,
                kv_cache_group_id=self.kv_cache_group_id,
                stage=self.stage,
                row_indices=tuple(rows),
                block_ids=tuple(b.block_id for b in freed),
            )
        )
        return [b.block_id for b in freed]

    def take_released(self) -> list[ReleasedBlocks]:
        """Drain release events (for the scheduler -> worker connector metadata)."""
        out, self._released = self._released, []
        return out

    # ------------------------------------------------------------------ vLLM hooks

    def remove_skipped_blocks(
        self,
        request_id: str,
        processed_computed_tokens: int,
        num_prompt_tokens: int | None = None,
    ) -> None:
        """Called by `KVCacheManager.allocate_slots` before every allocation of a
        scheduled request: the natural place to release (like sliding window)."""
        del processed_computed_tokens, num_prompt_tokens
        if request_id in self.req_to_blocks:
            self.release(request_id)

    def get_num_blocks_to_allocate(
        self,
        request_id: str,
        num_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock],
        total_computed_tokens: int,
        num_local_computed_tokens: int,
        num_tokens_main_model: int,
        apply_admission_cap: bool = False,
        prefill_end: int = 0,
    ) -> int:
        blocks = self.req_to_blocks.get(request_id, ())
        deferred = self._plan_for(request_id, num_tokens)
        if not any(b.is_null for b in blocks):
            # No hole yet: full attention over the compacted length (deferred tokens all
            # lie after the first image, so prefix-cache hits are compacted positions too),
            # including vLLM's accounting of hit and evictable blocks.
            return super().get_num_blocks_to_allocate(
                request_id,
                max(num_tokens - deferred, 0),
                new_computed_blocks,
                total_computed_tokens,
                num_local_computed_tokens,
                num_tokens_main_model,
                apply_admission_cap,
                prefill_end,
            )
        assert not new_computed_blocks, "a running request gets no new prefix-cache hits"
        required = cdiv(max(num_tokens - deferred, 0), self.block_size)
        return max(required - self.num_live_blocks(request_id), 0)

    def allocate_new_blocks(
        self, request_id: str, num_tokens: int, num_tokens_main_model: int
    ) -> list[KVCacheBlock]:
        if self._partial_hit_reqs:
            raise RuntimeError(
                "vllm-recroute: partial-block prefix hits are not supported by routed stages"
            )
        self._commit_plan(request_id, num_tokens)
        self._max_tokens[request_id] = max(self._max_tokens.get(request_id, 0), num_tokens)
        req_blocks = self.req_to_blocks[request_id]
        required = cdiv(self._compacted(request_id, num_tokens), self.block_size)
        num_new = required - self.num_live_blocks(request_id)
        if num_new <= 0:
            return []
        new_blocks = self.block_pool.get_new_blocks(num_new)
        req_blocks.extend(new_blocks)
        if self._record_new_block_ids:
            self.new_block_ids.extend(b.block_id for b in new_blocks)
        return new_blocks

    def expect_deferred(self, request_id: str, num_deferred: int | None) -> None:
        """Later-turn restore: the request will load a kept turn whose tokens include
        ``num_deferred`` deferred ones at this stage (None: the offer is withdrawn)."""
        if num_deferred is None:
            self._expected.pop(request_id, None)
        else:
            self._expected[request_id] = num_deferred

    def allocate_external_computed_blocks(
        self,
        request_id: str,
        num_local_computed_tokens: int,
        num_external_computed_tokens: int,
        record_for_zeroing: bool = True,
    ) -> None:
        """Live blocks for a loaded turn's compacted rows (it arrives routed). Only the
        recroute connector offers external tokens; any other source is refused, because
        stage KV depends on a routing decision it cannot know."""
        expected = self._expected.pop(request_id, None)
        if num_external_computed_tokens <= 0:
            return
        if expected is None:
            raise RuntimeError(
                "vllm-recroute: a KV connector offered external KV for a routed stage "
                "group; stage KV depends on the routing decision and cannot be imported"
            )
        total = num_local_computed_tokens + num_external_computed_tokens
        self._deferred[request_id] = expected
        self._max_tokens[request_id] = max(self._max_tokens.get(request_id, 0), total)
        req_blocks = self.req_to_blocks[request_id]
        required = cdiv(self._compacted(request_id, total), self.block_size)
        new_blocks = self.block_pool.get_new_blocks(max(required - len(req_blocks), 0))
        req_blocks.extend(new_blocks)
        if self._record_new_block_ids and record_for_zeroing:
            self.new_block_ids.extend(b.block_id for b in new_blocks)

    def pop_blocks_for_free(self, request_id: str) -> list[KVCacheBlock]:
        """Finish / abort / preemption: every live block, no ``null_block`` entries."""
        self._deferred.pop(request_id, None)
        self._max_tokens.pop(request_id, None)
        self._expected.pop(request_id, None)
        self._plans.pop(request_id, None)
        self._planned.pop(request_id, None)
        blocks = super().pop_blocks_for_free(request_id)
        return [b for b in blocks if not b.is_null]

    def cache_blocks(self, request: Any, num_tokens: int, *args: Any, **kwargs: Any) -> None:
        """Stage 0: as full attention. Routed stages: only whole blocks before the first
        image (their content does not depend on any routing decision); the lookup
        (`FullAttentionManager.find_longest_cache_hit`) then stops there by itself."""
        if self.stage > 0:
            num_tokens = vllm_view.routing_free_prefix(request, num_tokens)
        super().cache_blocks(request, num_tokens, *args, **kwargs)


def register_stage_spec() -> None:
    """Register ``RoutedStageSpec`` -> ``RoutedStageManager`` with vLLM's registry.

    Idempotent (the registry accepts an identical re-registration). The built-in specs are
    registered first: `kv_cache_spec_registry.py:KVCacheSpecRegistry._ensure_registered`
    only runs the built-in registration while the registry is *empty*, so registering a
    plugin spec first would leave ``FullAttentionSpec`` unregistered.
    """
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()  # patch record P6
    KVCacheSpecRegistry.register(
        RoutedStageSpec, RoutedStageManager, uniform_type_base_spec=RoutedStageSpec
    )

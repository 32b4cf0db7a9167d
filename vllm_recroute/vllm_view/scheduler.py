"""Scheduler-side reads: the KV-cache manager's stage managers and null block, the
scheduler's KV connector, and the step budgets vLLM's scheduler applies to one request."""

from __future__ import annotations

from typing import Any


def routed_stage_managers(kv_cache_manager: Any, manager_cls: type) -> dict[int, list[Any]]:
    """stage -> the ``manager_cls`` managers of its KV groups (empty without them)."""
    out: dict[int, list[Any]] = {}
    if kv_cache_manager is None:
        return out
    for m in kv_cache_manager.coordinator.single_type_managers:
        if isinstance(m, manager_cls):
            out.setdefault(m.stage, []).append(m)
    return out


def kv_connector(scheduler: Any) -> Any | None:
    """Scheduler side: the engine's KV connector (built inside vLLM's
    ``Scheduler.__init__``), or None."""
    return scheduler.connector


def null_block_id(kv_cache_manager: Any) -> int:
    """The id of the block pool's ``null_block`` (what a released row entry holds)."""
    return int(kv_cache_manager.block_pool.null_block.block_id)


def step_token_limit(scheduler: Any) -> int:
    """Scheduler side: the most prompt tokens one step can give one request: the token
    budget, the input budget less draft slots, and ``long_prefill_token_threshold`` (which
    vLLM applies whenever another request is waiting or running)."""
    cfg = scheduler.scheduler_config
    spec = scheduler.vllm_config.speculative_config
    drafts = spec.max_num_new_slots_for_drafting if spec is not None else 0
    limit = min(scheduler.max_num_scheduled_tokens, cfg.max_num_batched_tokens - drafts)
    if cfg.long_prefill_token_threshold > 0:
        limit = min(limit, cfg.long_prefill_token_threshold)
    return limit


def step_embed_limit(scheduler: Any) -> int:
    """Scheduler side: the most encoder embeddings one step can compute and hold."""
    return min(scheduler.max_num_encoder_input_tokens, scheduler.encoder_cache_manager.cache_size)

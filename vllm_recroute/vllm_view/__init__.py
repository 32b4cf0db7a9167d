"""The one place that reads vLLM's request, runner and scheduler internals.

Everything the plugin needs to know about a step, a request or a KV-cache group is read
in this package, from vLLM 0.32's V1 model runner (`vllm/v1/worker/gpu_model_runner.py`,
inherited by `cpu_model_runner.py`), its scheduler-side `Request` and `KVCacheManager`:
``step`` (the step and the forward), ``requests``, ``kv`` (groups, block tables, attention
metadata), ``scheduler`` (stage managers, step budgets), ``engine`` (depth, TP). Every
attribute read in it is listed in patches.py's record (R1) and checked by
``tests/unit/test_patches.py``, so a vLLM upgrade that moves one fails a unit test, not a
request. Other modules get frozen values (``StepBatch``, ``GroupInfo``) or small functions.
"""

from __future__ import annotations

from vllm_recroute.vllm_view.engine import (
    fused_kv_rows,
    num_decoder_layers,
    piece_compiler,
    tensor_parallel_rank,
    tensor_parallel_size,
    tp_all_gather,
    tp_all_reduce_sum,
    tp_device,
)
from vllm_recroute.vllm_view.kv import (
    CompactedIndices,
    GroupInfo,
    SegmentBuffers,
    SegmentIO,
    block_table,
    common_attention_metadata,
    install_layer_attention,
    kv_cache_groups,
    kv_groups_of_layers,
    live_block_table,
    table_device,
)
from vllm_recroute.vllm_view.requests import (
    cache_salt,
    embed_positions_in,
    first_image_offset,
    image_embeds_from,
    image_spans,
    is_finished_normally,
    is_waiting,
    prompt_length,
    routing_free_prefix,
    scheduler_extra_args,
    scheduler_request_options,
    worker_request,
    worker_request_options,
)
from vllm_recroute.vllm_view.scheduler import (
    kv_connector,
    null_block_id,
    routed_stage_managers,
    step_embed_limit,
    step_token_limit,
)
from vllm_recroute.vllm_view.step import (
    StepBatch,
    StepContext,
    attention_query_hookable,
    current_step,
    gone_request_ids,
    has_prompt_rows,
    hook_attention_query,
    native_custom_ops,
    run_eager_this_forward,
    runtime_of,
    step_scope,
    use_forwards,
)

__all__ = [
    "CompactedIndices",
    "GroupInfo",
    "SegmentBuffers",
    "SegmentIO",
    "StepBatch",
    "StepContext",
    "attention_query_hookable",
    "block_table",
    "cache_salt",
    "common_attention_metadata",
    "current_step",
    "embed_positions_in",
    "first_image_offset",
    "fused_kv_rows",
    "gone_request_ids",
    "has_prompt_rows",
    "hook_attention_query",
    "image_embeds_from",
    "image_spans",
    "install_layer_attention",
    "is_finished_normally",
    "is_waiting",
    "kv_cache_groups",
    "kv_connector",
    "kv_groups_of_layers",
    "live_block_table",
    "native_custom_ops",
    "null_block_id",
    "num_decoder_layers",
    "piece_compiler",
    "prompt_length",
    "routed_stage_managers",
    "routing_free_prefix",
    "run_eager_this_forward",
    "runtime_of",
    "scheduler_extra_args",
    "scheduler_request_options",
    "step_embed_limit",
    "step_scope",
    "step_token_limit",
    "table_device",
    "tensor_parallel_rank",
    "tensor_parallel_size",
    "tp_all_gather",
    "tp_all_reduce_sum",
    "tp_device",
    "use_forwards",
    "worker_request",
    "worker_request_options",
]

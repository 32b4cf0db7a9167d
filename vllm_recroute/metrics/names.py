"""Metric names, types, labels and help: the one list docs/metrics.md and deploy/ follow.

Every metric also carries vLLM's own labels `model_name` and `engine`. Names use the
`recroute:` namespace next to vLLM's `vllm:` (Prometheus allows ':' in metric names).
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "recroute:"


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # "counter" | "gauge"
    help: str
    labels: tuple[str, ...] = ()


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "recroute:routed_requests",
        "counter",
        "Prompts routed (whole prompt in one step, routing on), by mode and schedule.",
        ("mode", "schedule"),
    ),
    MetricSpec(
        "recroute:chunked_fallbacks",
        "counter",
        "Prompts with images split by chunked prefill and run unrouted (their span from "
        "the first image to the prompt's end exceeds a step).",
    ),
    MetricSpec(
        "recroute:visual_tokens",
        "counter",
        "Visual tokens received in routed prompts.",
    ),
    MetricSpec(
        "recroute:stage_visual_tokens",
        "counter",
        "Visual tokens entering a routing stage (routed prompts), by stage index (1 = first "
        "router point).",
        ("stage",),
    ),
    MetricSpec(
        "recroute:stage_active_visual_tokens",
        "counter",
        "Visual tokens active in a routing stage, by stage index; active ratio = this / "
        "recroute:stage_visual_tokens.",
        ("stage",),
    ),
    MetricSpec(
        "recroute:stage_returned_visual_tokens",
        "counter",
        "Visual tokens active in a routing stage that the previous stage deferred (they came "
        "back: reroute), by stage index.",
        ("stage",),
    ),
    MetricSpec(
        "recroute:routing_extra_flops",
        "counter",
        "Estimated prefill FLOPs the routing options add (the re-entry update of returning "
        "tokens), so that a row's budget counts them.",
    ),
    MetricSpec(
        "recroute:visual_token_layers",
        "counter",
        "Visual-token x decoder-layer pairs of routed prompts (what an unrouted model runs).",
    ),
    MetricSpec(
        "recroute:deferred_visual_token_layers",
        "counter",
        "Visual-token x decoder-layer pairs skipped because the token was deferred.",
    ),
    MetricSpec(
        "recroute:decoder_flops_saved",
        "counter",
        "Estimated prefill decoder FLOPs not spent: 2 x (decoder-layer weights) per deferred "
        "token-layer (attention-score FLOPs not included).",
    ),
    MetricSpec(
        "recroute:kv_bytes_saved",
        "counter",
        "Bytes of K/V not written to routed stages' active KV (deferred token-layers x K/V "
        "bytes per token-layer at the model dtype, all tensor-parallel ranks). Their pages "
        "stay allocated unless recroute.kv_release returns them (recroute:kv_blocks_released).",
    ),
    MetricSpec(
        "recroute:kv_blocks_released",
        "counter",
        "KV-cache blocks of deferred tokens a routed-stage group does not hold "
        "(recroute.kv_release): never allocated (the plan's compacted allocation) or returned "
        "to vLLM's block pool after the forward; free for any request.",
    ),
    MetricSpec(
        "recroute:kv_blocks_released_after_forward",
        "counter",
        "The part of recroute:kv_blocks_released that was allocated first and returned after "
        "the routed forward (the plan was a floor: granularity 'block'; 0 for 'token').",
    ),
    MetricSpec(
        "recroute:parked_blocks",
        "counter",
        "Units of deferred visual K/V (recroute.park_block_tokens tokens, all layers of a "
        "routing stage) stored in the parked host pool (recroute.parked_bytes).",
    ),
    MetricSpec(
        "recroute:restored_blocks",
        "counter",
        "Parked units brought back into active KV pages by decode-time re-routing.",
    ),
    MetricSpec(
        "recroute:parked_blocks_dropped",
        "counter",
        "Parked units lost because the pool was full (least useful first); they become "
        "removed tokens. Not an error.",
    ),
    MetricSpec(
        "recroute:parked_blocks_freed",
        "counter",
        "Parked units discarded with their request (finished, aborted or preempted).",
    ),
    MetricSpec(
        "recroute:parked_pool_blocks",
        "gauge",
        "Units currently held in the parked host pools, summed over the engine's tensor-parallel "
        "ranks (each rank keeps its own pool; parked_bytes is per rank).",
    ),
    MetricSpec(
        "recroute:parked_pool_bytes",
        "gauge",
        "Bytes currently held in the parked host pools (payload, int8 scales and digests), "
        "summed over the engine's tensor-parallel ranks (parked_bytes bounds each rank).",
    ),
    MetricSpec(
        "recroute:turn_saves",
        "counter",
        "Finished requests whose stage KV was kept for a later turn (recroute.turn_cache_bytes).",
    ),
    MetricSpec(
        "recroute:turn_loads",
        "counter",
        "Requests that loaded a kept turn's stage KV instead of recomputing it.",
    ),
    MetricSpec(
        "recroute:turn_loaded_tokens",
        "counter",
        "Prompt tokens whose KV was loaded from kept turns (not recomputed).",
    ),
    MetricSpec(
        "recroute:turn_store_entries",
        "gauge",
        "Turns currently kept in the workers' host turn stores, summed over tensor-parallel "
        "ranks (each rank keeps its own shard of a turn).",
    ),
    MetricSpec(
        "recroute:turn_store_bytes",
        "gauge",
        "Bytes currently kept in the workers' host turn stores (pages and parked units), summed "
        "over tensor-parallel ranks (turn_cache_bytes bounds each rank).",
    ),
)

BY_NAME = {m.name: m for m in METRICS}

"""Endpoint plugin (`vllm.endpoint_plugins`): routing settings and savings over HTTP.

    GET /v1/recroute/config   effective routing config, stages for this model, options
    GET /v1/recroute/stats    savings so far (from the same accounting as /metrics)

Both live under /v1, so vLLM's `--api-key` middleware guards them like the OpenAI routes.
Attaching the plugin also installs patch P8 (server/media.py): media vLLM cannot load is
an HTTP 400 naming the input, not a 500.
vLLM loads endpoint plugins only when named in VLLM_PLUGINS; `vllm-recroute serve` does
that (the name is `recroute`, the same as the engine plugin's).
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from fastapi import APIRouter, FastAPI, Request

from vllm_recroute.requests.options import PREFIX, REQUEST_FIELDS

router = APIRouter()


class RecrouteEndpoints:
    name = "recroute"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        from vllm_recroute.server.media import apply_media_patch

        apply_media_patch()  # the API server process renders requests: bad media is a 400
        app.include_router(router)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        state.recroute_vllm_config = getattr(engine_client, "vllm_config", None)


def _config_payload(vllm_config: Any) -> dict[str, Any]:
    from vllm_recroute.config import RoutingConfig
    from vllm_recroute.routing import resolve_stages

    model = vllm_config.model_config if vllm_config is not None else None
    cfg = RoutingConfig.from_additional_config(
        vllm_config.additional_config if vllm_config is not None else None
    )
    out: dict[str, Any] = {
        "routing": cfg.model_dump(mode="json"),
        "per_request_options": [PREFIX + f for f in REQUEST_FIELDS],
    }
    if model is not None:
        layers = model.hf_text_config.num_hidden_layers
        out["model"] = model.served_model_name
        out["architecture"] = (model.architectures or [None])[0]
        out["num_layers"] = layers
        # Router points are request-independent; keeps may depend on the visual-token count
        # only with avg_visual_tokens (then shown for 576 tokens, the papers' reference).
        stages = resolve_stages(cfg, layers, 576) if cfg.enabled else ()
        out["stages"] = [{"start": s.start, "end": s.end, "keep": s.keep} for s in stages]
    return out


def _stats_payload() -> dict[str, Any]:
    from vllm_recroute.metrics.accounting import add_into, empty_data
    from vllm_recroute.metrics.prom import observed_totals

    per_engine = observed_totals()
    total = empty_data()
    for data in per_engine.values():
        add_into(total, data)
    layers = total["visual_token_layers"]
    stage_ratio = {
        stage: total["stage_active_visual_tokens"].get(stage, 0) / n
        for stage, n in sorted(total["stage_visual_tokens"].items())
        if n
    }
    return {
        "routed_requests": sum(total["routed_requests"].values()),
        "routed_requests_by_mode_schedule": total["routed_requests"],
        "chunked_fallbacks": total["chunked_fallbacks"],
        "visual_tokens": total["visual_tokens"],
        "visual_token_retention": (1 - total["deferred_visual_token_layers"] / layers)
        if layers
        else None,
        "stage_active_ratio": stage_ratio,
        "decoder_flops_saved": total["decoder_flops_saved"],
        "kv_bytes_saved": total["kv_bytes_saved"],
        "kv_blocks_released": total["kv_blocks_released"],
        "parked": _parked_payload(total, per_engine),
        "turns": _turns_payload(total, per_engine),
        "per_engine": per_engine,
    }


def _parked_payload(total: dict[str, Any], per_engine: dict[int, dict[str, Any]]) -> dict:
    """Parked tier: counters summed; pool fill summed over engines' latest levels."""
    out = {
        "parked_blocks": total["parked_blocks"],
        "restored_blocks": total["restored_blocks"],
        "dropped_blocks": total["parked_blocks_dropped"],
        "freed_blocks": total["parked_blocks_freed"],
    }
    out["pool_blocks"] = sum(d.get("parked_pool_blocks", 0) for d in per_engine.values())
    out["pool_bytes"] = sum(d.get("parked_pool_bytes", 0) for d in per_engine.values())
    return out


def _turns_payload(total: dict[str, Any], per_engine: dict[int, dict[str, Any]]) -> dict:
    """Later-turn restore: counters summed; store fill summed over engines' latest levels."""
    return {
        "saved": total["turn_saves"],
        "loaded": total["turn_loads"],
        "loaded_tokens": total["turn_loaded_tokens"],
        "store_entries": sum(d.get("turn_store_entries", 0) for d in per_engine.values()),
        "store_bytes": sum(d.get("turn_store_bytes", 0) for d in per_engine.values()),
    }


# Documented in the OpenAPI document, so clients (and tests/e2e/test_fuzz.py's
# schemathesis run) know a keyed server answers 401 without the key.
_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "the server runs with --api-key and the request has no or a wrong key"}
}


@router.get("/v1/recroute/config", responses=_RESPONSES)
async def recroute_config(request: Request) -> dict[str, Any]:
    return _config_payload(getattr(request.app.state, "recroute_vllm_config", None))


@router.get("/v1/recroute/stats", responses=_RESPONSES)
async def recroute_stats() -> dict[str, Any]:
    return _stats_payload()

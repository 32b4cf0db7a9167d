"""Engine-wide settings a routed architecture needs, applied before the engine is built.

Registered in vLLM's per-architecture config hook table (MODELS_CONFIG_MAP, patch record
P2), so it runs in every process that builds a VllmConfig, including `vllm serve` and
`LLM(...)`. It also validates `--additional-config '{"recroute": ...}'` there, so a bad
routing config is a startup error naming the field, never a crash in a worker.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

from vllm_recroute.config import RoutingConfig
from vllm_recroute.errors import RoutingConfigError

logger = logging.getLogger("vllm_recroute")

# The plugin's KV connector (connector/connector.py), installed by name: vLLM imports it in
# each process from this dotted path.
CONNECTOR_NAME = "RecrouteConnector"
MODULE_PATH = "vllm_recroute.connector.connector"


def apply_routing_requirements(vllm_config: Any) -> RoutingConfig:
    """Validate the routing config and adapt the engine config to what routing needs."""
    cfg = RoutingConfig.from_additional_config(vllm_config.additional_config)
    _refuse_unsupported(vllm_config, cfg)
    if cfg.enabled:
        _refuse_graph_and_parallel_settings(vllm_config)
    _refuse_expandable_segments(vllm_config)
    _refuse_sleep_mode(vllm_config)
    _install_request_validator(vllm_config, cfg)
    _install_stats_connector(vllm_config)
    cache = vllm_config.cache_config
    if cache.enable_prefix_caching and not cfg.kv_release:
        # Routed-stage KV depends on the question (docs/architecture.md, "Contract
        # hazards"): a cached block from one routing context must not serve another.
        # Only the per-stage groups of kv_release
        # can tell stage blocks apart (kv/manager.py caches routed stages before the first
        # image only); with a single KV group, prefix caching is off.
        logger.warning(
            "vllm-recroute: prefix caching disabled for routed architectures (it stays on "
            "with recroute.kv_release: routed stages then cache text before the first image)"
        )
        cache.enable_prefix_caching = False
    _keep_graphs_piecewise(vllm_config)
    sched = vllm_config.scheduler_config
    if cfg.chunked_prefill == "off" and sched.enable_chunked_prefill:
        # A question-conditioned score needs the whole prompt in one step; keeping prompts
        # whole is cheaper than falling back to unrouted for split ones.
        sched.enable_chunked_prefill = False
        max_len = vllm_config.model_config.max_model_len if vllm_config.model_config else 0
        sched.max_num_batched_tokens = max(sched.max_num_batched_tokens, max_len)
        if sched.max_num_scheduled_tokens is not None:
            sched.max_num_scheduled_tokens = max(sched.max_num_scheduled_tokens, max_len)
    elif cfg.chunked_prefill == "routed":
        _install_chunk_scheduler(sched)
    return cfg


def _keep_graphs_piecewise(vllm_config: Any) -> None:
    """Routed models compile like any vLLM model (worker/decoder.py: a step that gathers
    rows runs eager, every other step is the compiled one). Full CUDA graphs would replay
    attention metadata baked into their buffers, where a routed stage installs its own per
    layer; piecewise graphs run attention outside the graph, so they are kept."""
    from vllm.config.compilation import CUDAGraphMode

    comp = vllm_config.compilation_config
    mode = comp.cudagraph_mode
    if mode is None:
        # Unset: vLLM would later default to FULL_AND_PIECEWISE (a set value is kept; on
        # hosts without static graphs vLLM turns it into NONE).
        comp.cudagraph_mode = CUDAGraphMode.PIECEWISE
    elif mode.has_full_cudagraphs():
        piecewise = (
            CUDAGraphMode.PIECEWISE if mode.has_piecewise_cudagraphs() else CUDAGraphMode.NONE
        )
        logger.warning(
            "vllm-recroute: cudagraph_mode %s -> %s for routed architectures (routed stages "
            "install per-layer attention metadata, which full CUDA graphs would not read)",
            mode.name,
            piecewise.name,
        )
        comp.cudagraph_mode = piecewise


def _install_chunk_scheduler(sched: Any) -> None:
    """Routed prompts take their span from the first image in one step (sched/)."""
    from vllm_recroute.sched import SCHEDULER_PATH

    if sched.scheduler_cls is None or sched.scheduler_cls == SCHEDULER_PATH:
        sched.scheduler_cls = SCHEDULER_PATH
        return
    # Kept, not refused: the worker still never routes a split prompt (it runs unrouted,
    # counted in recroute:chunked_fallbacks), so a custom scheduler costs savings only.
    logger.warning(
        "vllm-recroute: scheduler_cls %s is configured; routed prompts split by chunked "
        "prefill run unrouted (recroute.chunked_prefill 'routed' needs %s, or use 'off')",
        sched.scheduler_cls,
        SCHEDULER_PATH,
    )


def _install_request_validator(vllm_config: Any, cfg: RoutingConfig) -> None:
    from vllm_recroute.requests.validation import is_validator, validator_for

    model = vllm_config.model_config
    if model is not None:
        others = [p for p in (model.logits_processors or []) if not is_validator(p)]
        model.logits_processors = [*others, validator_for(cfg)]


def _install_stats_connector(vllm_config: Any) -> None:
    """Routing metrics, page releases and kept turns travel through the plugin's KV
    connector (connector/connector.py)."""
    from vllm.config import KVTransferConfig

    kv = vllm_config.kv_transfer_config
    if kv is None or kv.kv_connector is None:
        vllm_config.kv_transfer_config = KVTransferConfig(
            kv_connector=CONNECTOR_NAME, kv_connector_module_path=MODULE_PATH, kv_role="kv_both"
        )
    elif kv.kv_connector != CONNECTOR_NAME:
        logger.warning(
            "vllm-recroute: KV connector %s is configured; routing metrics (recroute:*) "
            "are not exported (they travel through the plugin's own stats connector)",
            kv.kv_connector,
        )


def _refuse_unsupported(vllm_config: Any, cfg: RoutingConfig) -> None:
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        # A request's routing state (active masks, compacted positions) would have to
        # travel with the intermediate tensors between pipeline stages, and each PP rank
        # would route its own layers; vLLM 0.32's CPU backend cannot run PP here to test
        # it, so it is refused rather than shipped untested (docs/deploy.md).
        raise ValueError(
            "vllm-recroute: pipeline parallelism is not supported with routed architectures "
            "(--pipeline-parallel-size must be 1; use tensor or data parallelism)"
        )
    if cfg.enabled and vllm_config.speculative_config is not None:
        # Draft tokens would need routing decisions replayed by the drafter and the
        # verifier; untested, so refused rather than silently wrong.
        raise RoutingConfigError(
            "recroute.mode",
            "routing is not supported with speculative decoding; use mode 'off' or drop "
            "--speculative-config",
        )
    if cfg.parked_bytes > 0:
        _refuse_unsupported_parking(vllm_config)
    model = vllm_config.model_config
    if cfg.enabled and model is not None and model.is_mm_prefix_lm:
        # Bidirectional attention over the image prefix (PaliGemma, Gemma 3) needs per-request
        # prefix ranges in the attention metadata; the routed stages' compacted metadata does
        # not carry them yet, so routing would silently change the model's attention.
        raise RoutingConfigError(
            "recroute.mode",
            f"routing is not supported for models with bidirectional multimodal-prefix "
            f"attention (model_type {model.hf_config.model_type!r}); use mode 'off', or a "
            "checkpoint with is_mm_prefix_lm=false",
        )


# vLLM's fusion passes that write the KV cache inside the compiled graph (the rope + KV
# update fusions; config/compilation.py PassConfig), in the order of its field list.
KV_WRITE_FUSIONS = ("fuse_rope_kvcache", "fuse_qk_norm_rope_kvcache", "fuse_rope_kvcache_cat_mla")
_EXPANDABLE = "expandable_segments:True"


class RefusedSettingError(ValueError):
    """An engine setting routing cannot run under; ``setting`` names it as the user sets it."""

    def __init__(self, setting: str, message: str) -> None:
        self.setting = setting
        super().__init__(f"vllm-recroute: {setting}: {message}")


def _refuse_graph_and_parallel_settings(vllm_config: Any) -> None:
    """Settings under which a routed stage's installed attention metadata, compacted slots
    or step context would be ignored (wrong tokens, or KV written into other requests'
    blocks with kv_release); refused while routing is on (docs/deploy.md, "GPU hosts:
    refused settings")."""
    _refuse_breakable_cudagraph(vllm_config)
    _refuse_kv_write_in_graph(vllm_config.compilation_config)
    _refuse_parallel_modes(vllm_config.parallel_config)


def _refuse_breakable_cudagraph(vllm_config: Any) -> None:
    # The env var is read here as vLLM reads it (envs.py: exactly "1"); vLLM's own
    # auto-enable (VllmConfig._maybe_enable_breakable_cudagraph) runs after this hook.
    if os.environ.get("VLLM_USE_BREAKABLE_CUDAGRAPH", "0") != "1":
        return
    model = vllm_config.model_config
    mode = vllm_config.compilation_config.cudagraph_mode
    if (model is not None and model.enforce_eager) or (mode is not None and mode.name == "NONE"):
        return  # no graphs are captured, so nothing is replayed
    raise RefusedSettingError(
        "VLLM_USE_BREAKABLE_CUDAGRAPH",
        "breakable CUDA graphs replay the whole model without calling its modules, so "
        "routing's layer hooks, per-layer attention metadata and eager bypass never run; "
        "unset it or set VLLM_USE_BREAKABLE_CUDAGRAPH=0 (piecewise graphs are kept)",
    )


def _refuse_kv_write_in_graph(comp: Any) -> None:
    """A KV-cache write captured in a graph replays vLLM's own slot-mapping buffer, not the
    compacted slots a routed stage installs (with kv_release: other requests' blocks)."""
    if comp.use_inductor_graph_partition:
        raise RefusedSettingError(
            "compilation_config.use_inductor_graph_partition",
            "Inductor graph partition captures the KV-cache update inside the CUDA graph, "
            "which ignores routed stages' compacted slot mappings; leave it False",
        )
    comp.use_inductor_graph_partition = False  # unset: vLLM's defaults also say False
    passes = comp.pass_config
    for name in KV_WRITE_FUSIONS:
        if getattr(passes, name, None):
            raise RefusedSettingError(
                f"compilation_config.pass_config.{name}",
                "this fusion writes the KV cache inside the compiled graph with vLLM's "
                "slot mapping, not routed stages' compacted slots; set it to false",
            )
        if hasattr(passes, name):
            # Unset: vLLM's O2/O3 defaults may turn it on later (ROCm AITER); keep it off.
            setattr(passes, name, False)


def _refuse_parallel_modes(par: Any) -> None:
    if par.use_ubatching:
        # Micro-batches run in their own threads (gpu_ubatch_wrapper.py), without the
        # step context P1 publishes, and per-layer metadata become one dict per ubatch.
        raise RefusedSettingError(
            "parallel_config.enable_dbo",
            "dual batch overlap / micro-batching (--enable-dbo, --ubatch-size > 1) is not "
            "supported with routing; drop --enable-dbo and leave ubatch_size at 0 or 1",
        )
    for name, flag in (
        ("decode_context_parallel_size", "--decode-context-parallel-size"),
        ("prefill_context_parallel_size", "--prefill-context-parallel-size"),
    ):
        if getattr(par, name) > 1:
            # Context parallelism interleaves a request's KV slots over ranks
            # (block_table.py, cp_kv_cache_interleave_size); compaction writes dense slots.
            raise RefusedSettingError(
                f"parallel_config.{name}",
                f"context parallelism is not supported with routing; set {flag} to 1 "
                "(use tensor or data parallelism)",
            )


def _refuse_expandable_segments(vllm_config: Any) -> None:
    """vLLM 0.32 refuses every KV connector with expandable segments (config/vllm.py,
    VllmConfig._verify_kv_transfer_compat, after this hook) and the plugin always installs
    its own, so say so here, in the plugin's words, rather than blame the connector."""
    kv = vllm_config.kv_transfer_config
    if kv is not None and kv.kv_connector not in (None, CONNECTOR_NAME):
        return  # the user's own connector: vLLM's message names it rightly
    if _EXPANDABLE not in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        return
    model = vllm_config.model_config
    if model is not None and model.enable_cumem_allocator:
        return  # vLLM's exemption: its pool turns expandable segments off
    raise RefusedSettingError(
        "PYTORCH_CUDA_ALLOC_CONF",
        f"{_EXPANDABLE} is refused by vLLM for any KV connector, and vllm-recroute always "
        f"installs one ({CONNECTOR_NAME}: routing metrics, page releases, kept turns); "
        "remove expandable_segments:True from PYTORCH_CUDA_ALLOC_CONF",
    )


def _refuse_sleep_mode(vllm_config: Any) -> None:
    """Sleep mode discards (level 2) or offloads and remaps (level 1) the KV cache behind
    the engine's back, while the worker and scheduler hold routing state that points into
    it: released pages, compacted stage tables, parked units, kept turns. Any request may
    turn routing on (per-request options), so it is refused for every routed architecture,
    whatever the server's mode. On vLLM 0.33 the connector's ``supports_sleep_mode`` says
    the same (connector/connector.py)."""
    model = vllm_config.model_config
    if model is None or not getattr(model, "enable_sleep_mode", False):
        return
    raise RefusedSettingError(
        "enable_sleep_mode",
        "sleep mode is not supported with routed architectures (it discards or remaps the "
        "KV cache while routing state points into it); drop --enable-sleep-mode, or serve "
        "the base architecture (without the Recroute* --hf-overrides) to use it",
    )


def _refuse_unsupported_parking(vllm_config: Any) -> None:
    # Tensor parallelism is supported: every rank parks the replicated states and projects
    # its own KV-head shard at restore, unit scores are averaged over the ranks
    # (worker/tp.py), so all ranks swap the same units;
    # ``parked_bytes`` is per rank (each worker process's host pool).
    dtype = vllm_config.cache_config.cache_dtype
    if dtype not in ("auto", None):
        # Quantized KV pages would need their scales parked with the payload.
        raise RoutingConfigError(
            "recroute.parked_bytes",
            f"the parked tier needs an unquantized KV cache (--kv-cache-dtype auto), got {dtype!r}",
        )


def register_config_hooks(architectures: Iterable[str]) -> None:
    """Patch record P2: the config hook for each routed architecture (idempotent)."""
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    class RecrouteConfigHook(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config: Any) -> None:
            apply_routing_requirements(vllm_config)

    for arch in architectures:
        MODELS_CONFIG_MAP.setdefault(arch, RecrouteConfigHook)


def check_routing_requirements(vllm_config: Any) -> RoutingConfig:
    """Worker-side check that the config hook ran (it cannot be applied this late)."""
    cfg = RoutingConfig.from_additional_config(vllm_config.additional_config)
    mode = vllm_config.compilation_config.cudagraph_mode
    if mode is not None and mode.has_full_cudagraphs():
        raise RuntimeError(
            "vllm-recroute: routed architectures cannot run full CUDA graphs; the config "
            "hook did not run (is the plugin installed in the engine's environment?)"
        )
    if vllm_config.cache_config.enable_prefix_caching and not cfg.kv_release:
        raise RuntimeError(
            "vllm-recroute: prefix caching must be off for routed models without kv_release"
        )
    return cfg

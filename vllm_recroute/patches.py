"""Every place this plugin changes or reaches into vLLM's own code, in one record.

After vllm-ascend's patch record: each entry says what it does, why, its upstream status
and when to remove it, and names the vLLM attributes it depends on (``targets``, dotted
``module:attr.attr``). ``tests/unit/test_patches.py`` resolves every target against the
installed vLLM, so an upgrade that renames one fails a unit test instead of a request;
the version gate (`_compat.check_vllm_version`) runs before any patch is applied.

P* entries change vLLM behaviour (wrap, override, write); R* entries only read internals
(all reads go through the `vllm_recroute/vllm_view/` package).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from vllm_recroute import vllm_view
from vllm_recroute._compat import check_vllm_version

__all__ = [
    "PATCHES",
    "PUBLIC_APIS",
    "Patch",
    "apply_patches",
    "apply_runner_selection",
    "check_runner_patched",
]


@dataclass(frozen=True)
class Patch:
    id: str
    what: str
    why: str
    upstream: str
    remove_when: str
    targets: tuple[str, ...]  # "module:attr[.attr]" that must exist in vLLM 0.32
    where: str  # the plugin module that applies it


PATCHES: tuple[Patch, ...] = (
    Patch(
        "P1",
        what="Wraps GPUModelRunner.execute_model (inherited by CPUModelRunner): for the "
        "duration of the call vllm_view.current_step() returns the runner and the scheduler "
        "output, and the model's routed worker runtime is told which requests finished or "
        "were preempted.",
        why="A model's forward receives only flattened tokens and positions; routing keeps "
        "per-request state across steps and honours per-request options, which need request "
        "identity in batch order (input_batch.req_ids).",
        upstream="No equivalent API in vLLM 0.32 (CommonAttentionMetadata.req_idx is set only "
        "for prefill context parallelism and carries no request id).",
        remove_when="vLLM exposes per-request ids / extra_args to model forward (e.g. "
        "ForwardContext.additional_kwargs). A runner that overrides execute_model is refused "
        "at load (check_runner_patched).",
        targets=(
            "vllm.v1.worker.gpu_model_runner:GPUModelRunner.execute_model",
            "vllm.v1.worker.gpu_model_runner:GPUModelRunner.get_model",
            "vllm.v1.worker.cpu_model_runner:CPUModelRunner",  # check_runner_patched
        ),
        where="vllm_recroute/patches.py",
    ),
    Patch(
        "P2",
        what="Adds an entry per routed architecture to "
        "vllm.model_executor.models.config.MODELS_CONFIG_MAP.",
        why="Routed models must keep CUDA graphs piecewise, keep prefix caching only with "
        "kv_release, keep prompts whole, install the plugin's connector and validate "
        "per-request options at admission; the hook runs in every process that builds a "
        "VllmConfig and raises a startup error naming the field on a bad config. It also "
        "refuses (RefusedSettingError, naming the setting) what would bypass a routed "
        "stage's installed metadata: VLLM_USE_BREAKABLE_CUDAGRAPH=1, Inductor graph "
        "partition and the rope+KV-cache fusion passes (pinned off when unset, since "
        "vLLM's O2/O3 defaults are applied after the hook), micro-batching (DBO), context "
        "parallelism; and PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, which "
        "VllmConfig._verify_kv_transfer_compat refuses later for any connector, the "
        "plugin's included; and sleep mode (enable_sleep_mode), which discards or remaps "
        "the KV cache that routing state points into (0.33 asks the connector too: "
        "RecrouteConnector.supports_sleep_mode is False).",
        upstream="MODELS_CONFIG_MAP is vLLM's per-architecture config hook table; there is no "
        "public registration API.",
        remove_when="vLLM grows a public registration API for config hooks.",
        targets=(
            "vllm.model_executor.models.config:MODELS_CONFIG_MAP",
            "vllm.model_executor.models.config:VerifyAndUpdateConfig",
            "vllm.config.vllm:VllmConfig.try_verify_and_update_config",
            "vllm.config.vllm:VllmConfig._verify_kv_transfer_compat",
            "vllm.config.vllm:VllmConfig._apply_optimization_level_defaults",
            # use_inductor_graph_partition and PassConfig.fuse_rope_kvcache /
            # fuse_qk_norm_rope_kvcache / fuse_rope_kvcache_cat_mla are pydantic fields (no
            # class attribute to resolve); the methods that read them stand in for them
            "vllm.config.compilation:CompilationConfig.set_splitting_ops_for_v1",
            "vllm.config.compilation:CompilationConfig.splitting_ops_contain_kv_cache_update",
            "vllm.config.compilation:PassConfig",
            "vllm.config.parallel:ParallelConfig.use_ubatching",
            "vllm.config.parallel:ParallelConfig.decode_context_parallel_size",
            "vllm.config.parallel:ParallelConfig.prefill_context_parallel_size",
            "vllm.config.model:ModelConfig.enable_cumem_allocator",
            "vllm.config.model:ModelConfig.enable_sleep_mode",
            "vllm.envs:VLLM_USE_BREAKABLE_CUDAGRAPH",
        ),
        where="vllm_recroute/engine_setup.py",
    ),
    Patch(
        "P3",
        what="Replaces each decoder layer's forward on the instance with a wrapper: on a "
        "forward whose routing moves rows, the wrapper of a segment's first layer installs "
        "the segment's compacted attention and runs the segment's layers (their own "
        "forwards, called directly) as one piece on its active rows, gathered once and "
        "scattered back once; the wrappers of its later layers return the stream they get. "
        "When those pieces run eager under compilation (prefill_path: eager), sets the text "
        "model's native CustomOps' _forward_method to their platform kernel (forward_cpu / "
        "forward_hip / forward_cuda) and back afterwards, only for ops whose class "
        "overrides it (the base CustomOp.forward_cuda raises NotImplementedError).",
        why="Deferred tokens must skip a stage's layers; wrapping instances leaves module "
        "names (and so weight loading) untouched and works for any decoder layer with the "
        "(positions, hidden_states, residual) signature.",
        upstream="Not a vLLM API; token pruning is wanted out of tree.",
        remove_when="vLLM offers a per-layer token-selection hook.",
        targets=(
            "vllm.model_executor.models.llama:LlamaDecoderLayer.forward",
            "vllm.model_executor.custom_op:CustomOp.forward_native",
            "vllm.model_executor.custom_op:CustomOp.forward_cpu",
            "vllm.model_executor.custom_op:CustomOp.forward_cuda",
            "vllm.model_executor.custom_op:CustomOp.forward_hip",
        ),
        where="vllm_recroute/worker/decoder.py, vllm_view.native_custom_ops",
    ),
    Patch(
        "P4",
        what="kv_release: overrides get_kv_cache_spec of each routed layer's Attention "
        "instance to report a RoutedStageSpec carrying its routing stage.",
        why="vLLM forms KV-cache groups from per-layer specs; a spec per stage gives every "
        "stage its own group, block table and RoutedStageManager.",
        upstream="Specs are registered through the public KVCacheSpecRegistry; the per-layer "
        "report has no hook. vLLM 0.33 adds SupportsKVCacheGrouping (experimental: a model "
        "defines its own KV-cache grouping, v1/core/kv_cache_config_builder.py). Considered "
        "and not adopted: it does not exist in 0.32, which this plugin still supports on "
        "CPU and CUDA (two grouping paths to keep equal), it is marked experimental, and "
        "grouping is only half of what P4 gives: the per-stage RoutedStageManager still "
        "needs the registered spec (P6). Revisit when 0.32 leaves the supported range.",
        remove_when="vLLM lets a model choose a layer's KV-cache spec class (0.33's "
        "SupportsKVCacheGrouping, once 0.32 is dropped and it is no longer experimental).",
        targets=("vllm.model_executor.layers.attention.attention:Attention.get_kv_cache_spec",),
        where="vllm_recroute/worker/decoder.py",
    ),
    Patch(
        "P5",
        what="Writes a routed layer's entries of forward_context.attn_metadata and "
        "forward_context.slot_mapping for the current forward, and sets "
        "forward_context.skip_compiled for a forward whose routing moves rows.",
        why="Inside a routed stage attention must see the active set only; vLLM's attention "
        "reads its metadata from the forward context by layer name. A forward that gathers "
        "rows has data-dependent shapes and Python control flow, which the compiled graph "
        "must not contain: skip_compiled is vLLM's per-forward bypass of "
        "@support_torch_compile (used for encoder-decoder models).",
        upstream="Documented data flow, not an extension API.",
        remove_when="vLLM supports per-layer metadata overrides.",
        targets=(
            "vllm.forward_context:get_forward_context",
            "vllm.forward_context:ForwardContext",
            "vllm.forward_context:ForwardContext.skip_compiled",
            "vllm.v1.attention.backend:CommonAttentionMetadata",
            "vllm.v1.worker.utils:AttentionGroup.build_metadata",
        ),
        where="vllm_recroute/vllm_view/kv.py, vllm_view/step.py",
    ),
    Patch(
        "P6",
        what="Calls KVCacheSpecRegistry._ensure_registered() before registering RoutedStageSpec.",
        why="The registry runs its built-in registration only while empty; registering a "
        "plugin spec first would leave FullAttentionSpec unregistered.",
        upstream="Private method; an upstream fix would register built-ins at import.",
        remove_when="KVCacheSpecRegistry registers its built-ins eagerly.",
        targets=(
            "vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry._ensure_registered",
            "vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry.register",
        ),
        where="vllm_recroute/kv/manager.py (register_stage_spec)",
    ),
    Patch(
        "P7",
        what="Reuses an already registered Prometheus collector through "
        "prometheus_client.REGISTRY._names_to_collectors.",
        why="A process that builds a second engine (tests, LLM re-creation) would otherwise "
        "fail registering recroute:* metrics twice.",
        upstream="prometheus_client has no public lookup by name.",
        remove_when="vLLM's KVConnectorPromMetrics handles re-registration.",
        targets=(
            "prometheus_client:REGISTRY._names_to_collectors",
            "vllm.distributed.kv_transfer.kv_connector.v1.metrics:KVConnectorPromMetrics._gauge_cls",
            "vllm.distributed.kv_transfer.kv_connector.v1.metrics:KVConnectorPromMetrics._counter_cls",
        ),
        where="vllm_recroute/metrics/prom.py",
    ),
    Patch(
        "R1",
        what="Reads V1 runner and scheduler internals: input_batch (req_ids, "
        "num_computed_tokens_cpu, num_prompt_tokens, block_table), query_start_loc, "
        "input_ids, requests, attn_groups, kv_cache_config, vllm_config, device; an "
        "AttentionGroup's kernel_block_size, and a copy of it (dataclasses.replace) given "
        "builders of its own through create_metadata_builders, one per routed segment and "
        "KV group (vllm_view.SegmentIO; FlashInfer's builders share the float workspace "
        "through _get_workspace_buffer / set_workspace_buffer, duck-typed, as the V2 runner "
        "does); the scheduler's Request (mm_features, sampling_params, block_hashes, "
        "cache_salt, num_computed_tokens less num_output_placeholders: the KV written under "
        "async scheduling) and KVCacheManager (coordinator.single_type_managers, "
        "block_pool.null_block); the Scheduler's connector (the engine core's shared "
        "routing resolver); a CachedRequestState's req_id and sampling_params.",
        why="Request identity, image spans, block tables and stage managers are not exposed "
        "through a public API.",
        upstream="Internal; Model Runner V2 exposes different structures.",
        remove_when="A V2 adapter exists and vLLM exposes per-request context to models.",
        targets=(
            "vllm.v1.worker.gpu_input_batch:InputBatch",
            "vllm.v1.worker.block_table:BlockTable.get_cpu_tensor",
            "vllm.v1.worker.block_table:BlockTable.get_device_tensor",
            "vllm.v1.worker.utils:AttentionGroup.create_metadata_builders",
            "vllm.v1.worker.utils:AttentionGroup.build_metadata",
            "vllm.v1.worker.utils:AttentionGroup.get_metadata_builder",
            "vllm.v1.worker.utils:AttentionGroup.map_to_kernel_block_table",
            "vllm.v1.worker.utils:AttentionGroup.__dataclass_fields__",
            "vllm.v1.worker.gpu_model_runner:GPUModelRunner.synchronize_input_prep",
            "vllm.v1.core.sched.async_scheduler:AsyncScheduler._update_request_with_output",
            "vllm.v1.core.kv_cache_manager:KVCacheManager",
            "vllm.v1.core.block_pool:BlockPool",
            "vllm.v1.request:RequestStatus.FINISHED_STOPPED",
            "vllm.v1.request:RequestStatus.WAITING",
            "vllm.v1.request:RequestStatus.PREEMPTED",
            "vllm.distributed.parallel_state:get_tensor_model_parallel_rank",
            "vllm.distributed.parallel_state:get_tp_group",
            "vllm.v1.request:Request.all_token_ids",
            "vllm.v1.request:Request.num_computed_tokens",
            "vllm.v1.request:Request.block_hashes",
            "vllm.v1.core.sched.output:SchedulerOutput.finished_req_ids",
            "vllm.v1.core.sched.output:SchedulerOutput.preempted_req_ids",
            "vllm.v1.core.kv_cache_manager:KVCacheBlocks.get_block_ids",
            "vllm.v1.core.sched.scheduler:Scheduler.connector",
            "vllm.v1.worker.gpu_input_batch:CachedRequestState.req_id",
            "vllm.v1.worker.gpu_input_batch:CachedRequestState.sampling_params",
        ),
        where="vllm_recroute/vllm_view/",
    ),
    Patch(
        "R3",
        what="prefill_path: compiled. Reads CompilationConfig.mode, backend and "
        "inductor_compile_config (vllm_view.piece_compiler, mirroring init_backend for "
        "DYNAMO_TRACE_ONCE) and torch.compile's each routed segment's run of decoder layers "
        "(their forwards called directly, CustomOps on the native forms vLLM's compiled "
        "mode set) with its own backend; relies on vLLM's attention being the opaque "
        "custom ops unified_kv_cache_update / unified_attention_with_output, which read "
        "the (installed, compacted) metadata from the forward context at run time.",
        why="A routed prefill's rows move between segments (data-dependent shapes), so it "
        "bypasses vLLM's compiled text model (P5); compiling each segment's layers over its "
        "active rows (row count dynamic) gives it compiled layers again.",
        upstream="torch.compile is public; the config fields are vLLM's documented "
        "compilation settings; the attention ops' run-time metadata read is internal.",
        remove_when="vLLM compiles a model whose row set changes between layers (a "
        "per-layer token-selection hook with compiled pieces).",
        targets=(
            "vllm.config:CompilationMode.NONE",
            "vllm.config:CompilationMode.VLLM_COMPILE",
            "vllm.config:CompilationMode.DYNAMO_TRACE_ONCE",
            "vllm.config.compilation:CompilationConfig.init_backend",
            "vllm.model_executor.layers.attention.attention:unified_kv_cache_update",
            "vllm.model_executor.layers.attention.attention:unified_attention_with_output",
        ),
        where="vllm_recroute/vllm_view/engine.py (piece_compiler), "
        "vllm_recroute/worker/layer_runs.py",
    ),
    Patch(
        "P8",
        what="Wraps MediaConnector._load_file_url (a file:// URL without "
        "--allowed-local-media-path is refused first), MediaConnector._load_data_url "
        "(NotImplementedError for a non-base64 data: URL), ImageMediaIO.load_bytes "
        "(PIL.Image.DecompressionBombError) and ImageEmbeddingMediaIO.load_bytes "
        "(torch.load's UnpicklingError / RuntimeError / EOFError) to raise "
        "VLLMValidationError naming image_url or image_embeds instead.",
        why="Those escape vLLM's 400 mapping (VLLMValidationError / ValueError) and reach the "
        "client as HTTP 500 or 501, though the client's input is at fault: a 30000x30000 PNG "
        "of a few hundred KB, a file:// URL on a server that serves no local files. The "
        "wrappers sit where the error is raised, in the API server while the request is "
        "rendered, so nothing reaches the engine.",
        upstream="vLLM 0.32 maps raw exceptions by type (serve/exception_handling/"
        "error_response.py, a TODO to migrate to VLLMError); these four raise sites are not "
        "migrated yet.",
        remove_when="vLLM raises VLLMValidationError (or ValueError) at these sites; "
        "tests/e2e/test_bad_inputs.py then passes without the patch.",
        targets=(
            "vllm.multimodal.media.connector:MediaConnector._load_file_url",
            "vllm.multimodal.media.connector:MediaConnector._load_data_url",
            "vllm.multimodal.media.image:ImageMediaIO.load_bytes",
            "vllm.multimodal.media.image:ImageEmbeddingMediaIO.load_bytes",
            "vllm.exceptions:VLLMValidationError",
            "PIL.Image:DecompressionBombError",
        ),
        where="vllm_recroute/server/media.py (applied by the endpoint plugin, server/endpoints.py)",
    ),
    Patch(
        "P9",
        what="Wraps VllmConfig._get_v2_model_runner_unsupported_features so that a config "
        "whose model is a routed architecture reports 'vllm-recroute routed architectures' "
        "as unsupported by Model Runner V2.",
        why="On any host with Triton (every CUDA host) vLLM 0.32 picks Model Runner V2 by "
        "default (VllmConfig.use_v2_model_runner); the routed decoder reads the V1 runner "
        "(P1, input_batch, block tables), which V2 does not have, so routing would silently "
        "not happen or crash. Through vLLM's own check, the V1 runner is selected with "
        "vLLM's log line, and VLLM_USE_V2_MODEL_RUNNER=1 becomes vLLM's startup error "
        "'Model Runner V2 does not yet support: vllm-recroute routed architectures ...'. "
        "V2 plan: V2 keeps per-request state in vllm/v1/worker/gpu/ (RequestState, "
        "InputBatch rebuilt per step, BlockTables per KV group); an adapter would read "
        "request ids, num_computed and block tables from those in vllm_view.StepBatch and "
        "hook V2's execute_model for P1.",
        upstream="No hook for plugins to veto V2; a model-class flag (like "
        "supports_v2_model_runner) would replace this.",
        remove_when="A V2 adapter exists in vllm_view/step.py, or vLLM exposes a per-model "
        "runner capability.",
        targets=(
            "vllm.config.vllm:VllmConfig._get_v2_model_runner_unsupported_features",
            "vllm.config.vllm:VllmConfig.use_v2_model_runner",
            "vllm.config.vllm:HAS_TRITON",
        ),
        where="vllm_recroute/patches.py (apply_runner_selection, from register())",
    ),
    Patch(
        "P10",
        what="Wraps OMPProcessManager.__init__ (vLLM's CPU thread binding) so that a config "
        "whose only KV connector is the plugin's own (RecrouteConnector) binds worker threads "
        "exactly as the same config without a connector would.",
        why="vLLM 0.32 reserves one more CPU per local worker whenever any KV connector is "
        "configured ('for nixl_connector under p/d case', utils/ompmultiprocessing.py). The "
        "plugin's connector moves no KV between processes and runs no threads, yet on a "
        "2-CPU host that reservation changed the worker from 1 bound thread to 2 and made "
        "every 'vs plain vLLM' figure compare two thread policies. With this patch a routed "
        "engine follows vLLM's own serving policy for its hardware.",
        upstream="vLLM reserves for any connector; a connector capability (e.g. "
        "'needs_cpu_reservation') would replace this.",
        remove_when="vLLM asks the connector whether it needs reserved CPUs, or stops "
        "reserving for connectors other than NIXL.",
        targets=(
            "vllm.utils.ompmultiprocessing:OMPProcessManager.__init__",
            "vllm.v1.executor.multiproc_executor:OMPProcessManager",
        ),
        where="vllm_recroute/platform_patches.py (apply_thread_policy, from register())",
    ),
    Patch(
        "P11",
        what="A subclass of vLLM's v1 Scheduler (and AsyncScheduler), installed as "
        "SchedulerConfig.scheduler_cls: overrides _try_schedule_encoder_inputs to cut a "
        "routed prompt's chunk back to its first image unless the chunk reaches the prompt's "
        "end, and schedule() to move a request so cut to the front of Scheduler.running "
        "for its next step (a waiting request whose remaining prompt fits one step is admitted "
        "whole, never with only the text before its image). Reads (vllm_view): "
        "Request.num_prompt_tokens, mm_features, status; "
        "Scheduler.max_num_scheduled_tokens, max_num_encoder_input_tokens, "
        "encoder_cache_manager.cache_size.",
        why="Question-conditioned scores need the span from the first image to the prompt's "
        "end in one forward; with chunked prefill on, vLLM would split it anywhere. "
        "_try_schedule_encoder_inputs is the one per-request point that both the running "
        "and the waiting path call for multimodal requests once their chunk is known.",
        upstream="scheduler_cls is a documented config field; the Scheduler's methods are "
        "internal (vLLM warns that the interface is not public). No chunk-boundary hook.",
        remove_when="vLLM exposes a per-request chunk-boundary hook (or a 'keep this range "
        "in one chunk' request attribute).",
        targets=(
            "vllm.config.scheduler:SchedulerConfig.get_scheduler_cls",
            "vllm.v1.core.sched.scheduler:Scheduler.schedule",
            "vllm.v1.core.sched.scheduler:Scheduler._try_schedule_encoder_inputs",
            "vllm.v1.core.sched.async_scheduler:AsyncScheduler",
            "vllm.multimodal.inputs:PlaceholderRange.get_num_embeds",
            "vllm.v1.core.encoder_cache_manager:EncoderCacheManager.cache_size",
            # written for the rest of a step by _hold_the_line (0.33 would admit behind a
            # held routed prompt); read by 0.32's and 0.33's admission loops
            "vllm.v1.core.sched.scheduler:Scheduler.max_num_active_reqs",
        ),
        where="vllm_recroute/sched/scheduler.py (installed by engine_setup.py)",
    ),
    Patch(
        "P12",
        what="On a torch built without CUDA (torch.version.cuda and .hip both None) only: "
        "replaces torch.cuda.is_current_stream_capturing with a function answering False.",
        why="vLLM 0.32's MiniCPM-V resampler (Resampler2_5.forward) calls "
        "torch.cuda.is_current_stream_capturing() unguarded; on a CPU-only torch that raises "
        "'Tried to instantiate dummy base class _cuda_isCurrentStreamCapturing', so MiniCPM-V "
        "cannot run there at all, plain or routed. No CUDA stream exists, so none captures.",
        upstream="vLLM bug: the call should go through current_platform (or be guarded by "
        "torch.cuda.is_available()).",
        remove_when="vLLM's minicpmv.py stops calling torch.cuda directly on CPU.",
        targets=(
            "torch.cuda:is_current_stream_capturing",
            "vllm.model_executor.models.minicpmv:Resampler2_5.forward",
        ),
        where="vllm_recroute/platform_patches.py (apply_cpu_torch_shims, from register())",
    ),
    Patch(
        "R2",
        what="Reads a decoder layer's structure to score and park tokens: the attention "
        "module's q_size, kv_size, num_kv_heads, head_dim, scaling, qkv_proj, rotary_emb "
        "(Qwen3: q_norm, k_norm), the layer's input_layernorm; the Attention layer's kv_cache "
        "and writes K/V pages through its impl's do_kv_cache_update (the op vLLM's own "
        "attention uses). Keys and K/V are projected from the K/V rows of qkv_proj's weight "
        "and bias (vllm_view.fused_kv_rows, only where its quant_method is "
        "UnquantizedLinearMethod): the routed decoder wraps its own model instance's "
        "load_weights, which BaseModelLoader.load_model calls before "
        "process_weights_after_loading, whose CPU dispatch (dispatch_cpu_unquantized_gemm, "
        "remove_weight=True) drops the fused weight after packing it; the rows are copied "
        "there (CPU) and are views of the kept weight elsewhere.",
        why="Scores need the layer's own q/k projection before attention runs; parked "
        "blocks are copied out of and back into vLLM's paged cache in its layout. Keys "
        "alone are a fifth of the fused projection's work (SmolVLM's 9:3 heads), K/V two "
        "fifths: the queries were discarded.",
        upstream="Module attributes of vLLM's model code (not an API); do_kv_cache_update is "
        "the attention backends' common interface.",
        remove_when="vLLM exposes a per-layer scoring hook and a KV page copy API.",
        targets=(
            "vllm.model_executor.models.llama:LlamaAttention.q_size",
            "vllm.model_executor.models.llama:LlamaAttention.kv_size",
            "vllm.model_executor.models.llama:LlamaAttention.num_kv_heads",
            "vllm.model_executor.models.llama:LlamaAttention.head_dim",
            "vllm.model_executor.models.llama:LlamaAttention.scaling",
            "vllm.model_executor.models.llama:LlamaAttention.qkv_proj",
            "vllm.model_executor.models.llama:LlamaAttention.rotary_emb",
            "vllm.model_executor.models.qwen3:Qwen3Attention.q_norm",
            "vllm.model_executor.models.qwen3:Qwen3Attention.k_norm",
            "vllm.model_executor.models.llama:LlamaDecoderLayer.input_layernorm",
            "vllm.model_executor.layers.attention.attention:Attention.kv_cache",
            "vllm.model_executor.layers.linear:UnquantizedLinearMethod",
            "vllm.model_executor.layers.linear:UnquantizedLinearMethod.process_weights_after_loading",
            "vllm.model_executor.layers.utils:dispatch_cpu_unquantized_gemm",
            "vllm.model_executor.model_loader.base_loader:BaseModelLoader.load_model",
            # AttentionImpl declares no do_kv_cache_update (only MLAAttentionImpl does):
            # each backend defines its own; these are the CPU and the CUDA defaults
            "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl.do_kv_cache_update",
            "vllm.v1.attention.backends.flash_attn:FlashAttentionImpl.do_kv_cache_update",
            "vllm.v1.attention.backends.triton_attn:TritonAttentionImpl.do_kv_cache_update",
        ),
        where="vllm_recroute/worker/projections.py, vllm_recroute/vllm_view/engine.py, "
        "vllm_recroute/worker/decoder.py, vllm_recroute/kv/pages.py",
    ),
    Patch(
        "P13",
        what="RoutedStageManager subclasses FullAttentionManager (registered for "
        "RoutedStageSpec through KVCacheSpecRegistry): overrides remove_skipped_blocks, "
        "get_num_blocks_to_allocate, allocate_new_blocks, allocate_external_computed_blocks, "
        "pop_blocks_for_free and cache_blocks, and reads the base class's req_to_blocks, "
        "_null_block, _partial_hit_reqs, _record_new_block_ids and new_block_ids.",
        why="A routed stage releases the blocks of deferred tokens and allocates only its "
        "compacted row; vLLM's manager has no hook for a per-request live length.",
        upstream="The manager class per spec is public (KVCacheSpecRegistry); its methods "
        "and state are internal.",
        remove_when="vLLM's managers accept a per-request live token count.",
        targets=(
            "vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager.remove_skipped_blocks",
            "vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager.get_num_blocks_to_allocate",
            "vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager.allocate_new_blocks",
            "vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager.allocate_external_computed_blocks",
            "vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager.pop_blocks_for_free",
            "vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager.cache_blocks",
            "vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager.req_to_blocks",
            "vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager._null_block",
            "vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager._partial_hit_reqs",
            "vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager._record_new_block_ids",
            "vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager.new_block_ids",
            "vllm.v1.core.kv_cache_utils:KVCacheBlock",
        ),
        where="vllm_recroute/kv/manager.py",
    ),
    Patch(
        "P14",
        what="Each routed architecture subclasses the vLLM model class it is named after "
        "(PaliGemma: also its processor, processing info and dummy inputs, registered with "
        "MULTIMODAL_REGISTRY) and installs the routed decoder on its text model.",
        why="Routing runs inside the text model's forward; subclassing keeps vLLM's weight "
        "loading, processors and multimodal merge.",
        upstream="ModelRegistry.register_model is public; the model classes are not an API.",
        remove_when="Never for the subclasses; the targets are what an upgrade must keep.",
        targets=(
            "vllm.model_executor.models.idefics3:Idefics3ForConditionalGeneration",
            "vllm.model_executor.models.keye:KeyeForConditionalGeneration",
            "vllm.model_executor.models.llava:LlavaForConditionalGeneration",
            "vllm.model_executor.models.minicpmv:MiniCPMV",
            "vllm.model_executor.models.paligemma:PaliGemmaForConditionalGeneration",
            "vllm.model_executor.models.paligemma:PaliGemmaMultiModalProcessor",
            "vllm.model_executor.models.paligemma:PaliGemmaProcessingInfo",
            "vllm.model_executor.models.paligemma:PaliGemmaDummyInputsBuilder",
            "vllm.model_executor.models.siglip:SiglipEncoderInfo",
            "vllm.model_executor.models.phi3v:Phi3VForCausalLM",
            "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLForConditionalGeneration",
            "vllm.model_executor.models.qwen3_vl:Qwen3VLForConditionalGeneration",
        ),
        where="vllm_recroute/models/",
    ),
    Patch(
        "P15",
        what="For one forward only (a pure-decode step where the parked tier re-routes), "
        "sets forward on the impl instance of each due stage-start layer's Attention "
        "(attn.impl.forward, called by the vllm::unified_attention_with_output op as "
        "self.impl.forward(self, query, ...)) to a wrapper that hands the query to the step "
        "router, then calls the impl; removed after the forward (always_call forward hook), "
        "a raising one included. Reads Attention.use_direct_call (the op is opaque: CPU, "
        "CUDA, ROCm) and Attention.query_quant (no quantized query) to decide whether the "
        "hook can see the query; otherwise re-routes run eager.",
        why="A re-route scores units with the request's post-RoPE query at the stage's first "
        "layer and swaps K/V in the stage's pages before that layer's attention reads them. "
        "The attention op is the one point of a compiled forward that runs outside the "
        "graph (CPU: an opaque call inside the inductor graph; CUDA: a splitting op between "
        "piecewise graphs) and already receives that query, so the step stays compiled "
        "instead of running the whole text model eager (130-180 ms against 87 ms a step).",
        upstream="No per-layer pre-attention hook in vLLM 0.32 (the KV connector's "
        "wait_for_layer_load sees the layer name, not the query).",
        remove_when="vLLM offers a pre-attention hook with the layer's query, or the swap "
        "becomes a registered custom op of the routed layer.",
        targets=(
            "vllm.model_executor.layers.attention.attention:unified_attention_with_output",
            "vllm.model_executor.layers.attention.attention:get_attention_context",
            "vllm.model_executor.layers.attention.attention:Attention.impl",
            "vllm.model_executor.layers.attention.attention:Attention.use_direct_call",
            "vllm.model_executor.layers.attention.attention:Attention.query_quant",
            "vllm.v1.attention.backend:AttentionImpl.forward",
            "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl.forward",
        ),
        where="vllm_recroute/vllm_view/step.py (hook_attention_query), "
        "vllm_recroute/worker/decoder.py",
    ),
)

# Public vLLM APIs the plugin imports without a record entry (documented extension points
# and user-facing names). tests/unit/test_patches.py requires every `from vllm... import`
# in vllm_recroute/ (its server/ included) to be a record target (or an attribute of one) or listed
# here; tools/check_vllm.py resolves both against a candidate release.
PUBLIC_APIS: tuple[str, ...] = (
    "vllm",  # vllm.__version__ (the gate)
    "vllm:ModelRegistry",
    "vllm.config:KVTransferConfig",
    "vllm.config.compilation:CUDAGraphMode",
    "vllm.platforms:current_platform",
    "vllm.multimodal:MULTIMODAL_REGISTRY",
    "vllm.tokenizers:cached_tokenizer_from_config",
    "vllm.utils.math_utils:cdiv",
    "vllm.distributed:tensor_model_parallel_all_gather",
    "vllm.distributed:tensor_model_parallel_all_reduce",
    "vllm.distributed.parallel_state:get_tensor_model_parallel_world_size",
    # the KV connector API (KVTransferConfig.kv_connector_module_path)
    "vllm.distributed.kv_transfer.kv_connector.v1.base:KVConnectorBase_V1",
    "vllm.distributed.kv_transfer.kv_connector.v1.base:KVConnectorMetadata",
    "vllm.distributed.kv_transfer.kv_connector.v1.base:KVConnectorRole",
    "vllm.distributed.kv_transfer.kv_connector.v1.base:KVConnectorWorkerMetadata",
    "vllm.distributed.kv_transfer.kv_connector.v1.base:SupportsHMA",
    "vllm.distributed.kv_transfer.kv_connector.v1.metrics:KVConnectorStats",
    "vllm.v1.metrics.utils:create_metric_per_engine",
    # KV-cache specs (KVCacheSpecRegistry, P6)
    "vllm.v1.kv_cache_interface:FullAttentionSpec",
    "vllm.v1.kv_cache_interface:KVCacheGroupSpec",
    "vllm.v1.kv_cache_interface:KVCacheSpec",
    # custom logits processors (--logits-processors)
    "vllm.v1.sample.logits_processor:BatchUpdate",
    "vllm.v1.sample.logits_processor:LogitsProcessor",
)

V2_UNSUPPORTED = (
    "vllm-recroute routed architectures (V1 runner only; unset VLLM_USE_V2_MODEL_RUNNER)"
)

_lock = threading.Lock()
_applied = False


def apply_patches() -> None:
    """Apply P1 (idempotent, thread-safe). P2..P15 are applied where their entry says."""
    global _applied
    with _lock:
        if _applied:
            return
        check_vllm_version()
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        GPUModelRunner.execute_model = _wrap_execute_model(GPUModelRunner.execute_model)
        _applied = True
    for runner_cls in _known_runner_subclasses():
        check_runner_patched(runner_cls)


def apply_runner_selection(routed_architectures: Collection[str]) -> None:
    """Apply P9 (idempotent): routed architectures select the V1 model runner."""
    from vllm.config.vllm import VllmConfig

    original = VllmConfig._get_v2_model_runner_unsupported_features
    if getattr(original, "__recroute_patched__", False):
        return
    routed = frozenset(routed_architectures)

    @functools.wraps(original)
    def unsupported(self) -> list[str]:
        out = original(self)
        archs = getattr(self.model_config, "architectures", None) or ()
        if routed.intersection(archs):
            out.append(V2_UNSUPPORTED)
        return out

    unsupported.__recroute_patched__ = True  # type: ignore[attr-defined]
    VllmConfig._get_v2_model_runner_unsupported_features = unsupported


def _wrap_execute_model(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def execute_model(self, scheduler_output, *args, **kwargs):
        finished, preempted = vllm_view.gone_request_ids(scheduler_output)
        if finished or preempted:
            runtime = vllm_view.runtime_of(self)
            if runtime is not None:
                runtime.requests_gone(finished, preempted)
        with vllm_view.step_scope(self, scheduler_output):
            return original(self, scheduler_output, *args, **kwargs)

    execute_model.__recroute_patched__ = True  # type: ignore[attr-defined]
    return execute_model


def _known_runner_subclasses() -> list[type]:
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:  # GPU-only installs
        return []
    return [CPUModelRunner]


def check_runner_patched(runner_cls: type) -> None:
    """Refuse runners that override execute_model (P1 would not see their steps)."""
    fn = getattr(runner_cls, "execute_model", None)
    if not getattr(fn, "__recroute_patched__", False):
        raise RuntimeError(
            f"vllm-recroute: model runner {runner_cls.__name__} overrides execute_model; "
            "routing needs GPUModelRunner.execute_model (patch P1 in vllm_recroute/patches.py)."
        )

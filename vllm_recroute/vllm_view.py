"""The one place that reads vLLM's request, runner and scheduler internals.

Everything the plugin needs to know about a step, a request or a KV-cache group is read
here, from vLLM 0.32's V1 model runner (`vllm/v1/worker/gpu_model_runner.py`, inherited
by `cpu_model_runner.py`), its scheduler-side `Request` and `KVCacheManager`. Every
attribute read here is listed in patches.py's record (R1) and checked by
``tests/unit/test_patches.py``, so a vLLM upgrade that moves one fails a unit test, not a
request. Other modules get frozen values (``StepBatch``, ``GroupInfo``) or small functions.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "GroupInfo",
    "StepBatch",
    "StepContext",
    "cache_salt",
    "common_attention_metadata",
    "current_step",
    "decoder_of",
    "first_image_offset",
    "gone_request_ids",
    "image_embeds_from",
    "image_spans",
    "install_layer_attention",
    "kv_groups_of_layers",
    "live_block_table",
    "null_block_id",
    "prompt_length",
    "request_extra_args",
    "routed_stage_managers",
    "scheduler_extra_args",
    "step_embed_limit",
    "step_scope",
    "step_token_limit",
    "tensor_parallel_rank",
]


# --------------------------------------------------------------------------- the step


@dataclass(frozen=True)
class StepContext:
    """What the model may know about the step being executed (published by patch P1)."""

    runner: Any  # vllm.v1.worker.gpu_model_runner.GPUModelRunner
    scheduler_output: Any  # vllm.v1.core.sched.output.SchedulerOutput


_STEP: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar(
    "vllm_recroute_step", default=None
)


def current_step() -> StepContext | None:
    """The step being executed in this worker, or None (dummy/profile runs)."""
    return _STEP.get()


class step_scope:
    """Publish ``StepContext(runner, scheduler_output)`` for the duration of a step."""

    def __init__(self, runner: Any, scheduler_output: Any) -> None:
        self._ctx = StepContext(runner, scheduler_output)
        self._token: contextvars.Token | None = None

    def __enter__(self) -> StepContext:
        self._token = _STEP.set(self._ctx)
        return self._ctx

    def __exit__(self, *exc: Any) -> None:
        assert self._token is not None
        _STEP.reset(self._token)


def gone_request_ids(scheduler_output: Any) -> tuple[set[str], set[str]]:
    """(finished, preempted) requests as of this step (their worker state is stale)."""
    finished = set(getattr(scheduler_output, "finished_req_ids", None) or ())
    preempted = set(getattr(scheduler_output, "preempted_req_ids", None) or ())
    return finished, preempted


def decoder_of(runner: Any) -> Any | None:
    """The routed decoder of the runner's model (``model.recroute``), or None."""
    try:
        model = runner.get_model()
    except (AttributeError, ValueError):  # no model loaded yet
        return None
    return getattr(model, "recroute", None)


@dataclass(frozen=True)
class StepBatch:
    """The rows of one forward pass, in batch order (copies: vLLM reuses its buffers)."""

    req_ids: tuple[str, ...]
    qsl: torch.Tensor  # [n + 1] long: query_start_loc (rows of request i: qsl[i]:qsl[i+1])
    num_computed: torch.Tensor  # [n] long: tokens with KV before this step
    prompt_lens: tuple[int, ...]
    token_ids: torch.Tensor  # [rows] the step's input token ids

    @property
    def num_reqs(self) -> int:
        return len(self.req_ids)

    @property
    def num_rows(self) -> int:
        return int(self.qsl[-1])

    @classmethod
    def of(cls, runner: Any) -> StepBatch:
        batch = runner.input_batch
        n = batch.num_reqs
        qsl = runner.query_start_loc.cpu[: n + 1].to(torch.long)
        return cls(
            req_ids=tuple(batch.req_ids[:n]),
            qsl=qsl,
            num_computed=torch.as_tensor(batch.num_computed_tokens_cpu[:n], dtype=torch.long),
            prompt_lens=tuple(int(p) for p in batch.num_prompt_tokens[:n]),
            token_ids=runner.input_ids.cpu[: int(qsl[-1])].clone(),
        )


def has_prompt_rows(runner: Any) -> bool:
    """Whether any request of the step still computes prompt tokens (cheap: vLLM's numpy
    counters, no copies)."""
    batch = runner.input_batch
    n = batch.num_reqs
    return bool((batch.num_computed_tokens_cpu[:n] < batch.num_prompt_tokens[:n]).any())


# --------------------------------------------------------------------------- requests


def _mm_features(request: Any) -> Iterable[Any]:
    # Scheduler `Request` and worker `CachedRequestState` both carry `mm_features`.
    return getattr(request, "mm_features", None) or ()


def first_image_offset(request: Any) -> int | None:
    """Prompt position where the request's first multimodal item starts (None: none)."""
    offsets = [f.mm_position.offset for f in _mm_features(request)]
    return min(offsets) if offsets else None


def image_spans(request: Any) -> tuple[tuple[int, int, str], ...]:
    """``(offset, length, identifier)`` of each multimodal item, by offset."""
    return tuple(
        sorted(
            (f.mm_position.offset, f.mm_position.length, f.identifier)
            for f in _mm_features(request)
        )
    )


def embed_positions_in(request: Any, start: int, end: int) -> int:
    """How many prompt positions in ``[start, end)`` take a multimodal embedding (the image
    tokens the worker routes: vLLM marks them with ``PlaceholderRange.is_embed``)."""
    n = 0
    for f in _mm_features(request):
        pos, is_embed = f.mm_position.offset, f.mm_position.is_embed
        length = f.mm_position.length
        idx = torch.arange(pos, pos + length)
        if is_embed is not None:
            idx = idx[is_embed.bool().cpu()]
        n += int(((idx >= start) & (idx < end)).sum())
    return n


def num_decoder_layers(vllm_config: Any) -> int:
    """The text model's decoder layers (the routed decoder's ``len(layers)``)."""
    return int(vllm_config.model_config.get_num_layers(vllm_config.parallel_config))


def request_extra_args(runner: Any, req_id: str) -> Mapping[str, Any] | None:
    """Worker side: the request's ``SamplingParams.extra_args`` (per-request options)."""
    state = runner.requests.get(req_id)
    params = getattr(state, "sampling_params", None)
    return getattr(params, "extra_args", None)


def worker_request(runner: Any, req_id: str) -> Any | None:
    """Worker side: vLLM's cached state of a request (for ``first_image_offset``)."""
    return runner.requests.get(req_id)


def scheduler_extra_args(request: Any) -> Mapping[str, Any] | None:
    """Scheduler side: a `vllm.v1.request.Request`'s per-request options."""
    params = request.sampling_params
    return params.extra_args if params else None


def cache_salt(request: Any) -> str | None:
    """Scheduler side: the request's ``cache_salt`` (its tenant for prefix caching), or
    None. vLLM rejects an empty salt at the API; an empty one offline means none too."""
    return getattr(request, "cache_salt", None) or None


# --------------------------------------------------------------------------- KV groups


@dataclass(frozen=True)
class GroupInfo:
    """A KV-cache group as a routed layer sees it."""

    gid: int
    block_size: int
    attn_group: Any  # vLLM AttentionGroup (its metadata builder)


def kv_groups_of_layers(runner: Any, layer_names: Iterable[str]) -> dict[str, GroupInfo]:
    """KV-cache group of each named attention layer (missing: not in any group)."""
    wanted = set(layer_names)
    out: dict[str, GroupInfo] = {}
    for gid, attn_groups in enumerate(runner.attn_groups):
        spec = runner.kv_cache_config.kv_cache_groups[gid].kv_cache_spec
        for group in attn_groups:
            for name in wanted & set(group.layer_names):
                out[name] = GroupInfo(gid, spec.block_size, group)
    return out


def kv_cache_groups(runner: Any) -> list[Any]:
    return list(runner.kv_cache_config.kv_cache_groups)


def block_table(runner: Any, gid: int, num_reqs: int) -> tuple[torch.Tensor, list[int]]:
    """The group's CPU block table rows ``[:num_reqs]`` and each row's width."""
    bt = runner.input_batch.block_table[gid]
    widths = [int(w) for w in bt.num_blocks_per_row[:num_reqs]]
    return bt.get_cpu_tensor()[:num_reqs], widths


def live_block_table(
    runner: Any, gid: int, req_ids: tuple[str, ...], dead_rows: Any
) -> torch.Tensor:
    """The group's block table with released row entries removed (``dead_rows``:
    kv/table_view.ReleasedRows): row ``r``'s live entries, in order."""
    table, widths = block_table(runner, gid, len(req_ids))
    return dead_rows.compact_table(table, widths, req_ids, gid)


def table_device(runner: Any, gid: int, num_reqs: int) -> torch.device:
    return runner.input_batch.block_table[gid].get_device_tensor(num_reqs).device


# --------------------------------------------------------------------------- attention


def common_attention_metadata(
    *,
    qsl: torch.Tensor,
    seq_lens: torch.Tensor,
    num_computed: torch.Tensor,
    block_table_tensor: torch.Tensor,
    slot_mapping: torch.Tensor,
    device: torch.device,
) -> Any:
    """A `CommonAttentionMetadata` for a compacted view of the step (causal)."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    n = int(qsl.numel()) - 1
    counts = qsl.diff()
    return CommonAttentionMetadata(
        query_start_loc=qsl.to(device),
        query_start_loc_cpu=qsl,
        seq_lens=seq_lens.to(device),
        seq_lens_cpu_upper_bound=seq_lens,
        num_reqs=n,
        num_actual_tokens=int(qsl[-1]),
        max_query_len=int(counts.max()) if n else 0,
        max_seq_len=int(seq_lens.max()) if n else 0,
        block_table_tensor=block_table_tensor.to(device),
        slot_mapping=slot_mapping.to(device),
        causal=True,
        is_prefilling=num_computed == 0,
    )


def install_layer_attention(layer_name: str, metadata: Any, slot_mapping: torch.Tensor) -> None:
    """Make one attention layer use ``metadata`` / ``slot_mapping`` for this forward
    (vLLM's attention reads both from the forward context, keyed by layer name)."""
    from vllm.forward_context import get_forward_context

    ctx = get_forward_context()
    if not isinstance(ctx.attn_metadata, dict):
        raise RuntimeError("vllm-recroute: micro-batched attention metadata is not supported")
    ctx.attn_metadata[layer_name] = metadata
    ctx.slot_mapping[layer_name] = slot_mapping


def native_custom_ops(module: torch.nn.Module) -> list[tuple[Any, Any, Any]]:
    """``(op, native, kernel)`` for every vLLM ``CustomOp`` under ``module`` that dispatches
    to its PyTorch-native forward (what vLLM picks when inductor compiles the model: the
    graph fuses it), with the platform kernel vLLM runs in eager mode."""
    from vllm.model_executor.custom_op import CustomOp
    from vllm.platforms import current_platform

    out = []
    for op in module.modules():
        if not isinstance(op, CustomOp):
            continue
        native = op._forward_method
        if getattr(native, "__func__", None) is not type(op).forward_native:
            continue  # already a kernel (enabled op), or a compiled native
        if current_platform.is_cpu():
            kernel = op.forward_cpu
        elif current_platform.is_rocm():
            kernel = op.forward_hip
        else:
            kernel = op.forward_cuda
        out.append((op, native, kernel))
    return out


def use_forwards(ops: list[tuple[Any, Any, Any]], kernels: bool) -> None:
    """Switch ``native_custom_ops``' ops to their kernels (True) or back (False)."""
    for op, native, kernel in ops:
        op._forward_method = kernel if kernels else native


def run_eager_this_forward() -> None:
    """Run this forward's compiled modules eager (vLLM's own per-forward bypass,
    ``ForwardContext.skip_compiled``, read by ``@support_torch_compile``'s ``__call__``)."""
    from vllm.forward_context import get_forward_context

    get_forward_context().skip_compiled = True


# --------------------------------------------------------------------------- scheduler


def routed_stage_managers(kv_cache_manager: Any, manager_cls: type) -> dict[int, list[Any]]:
    """stage -> the ``manager_cls`` managers of its KV groups (empty without them)."""
    out: dict[int, list[Any]] = {}
    if kv_cache_manager is None:
        return out
    for m in kv_cache_manager.coordinator.single_type_managers:
        if isinstance(m, manager_cls):
            out.setdefault(m.stage, []).append(m)
    return out


def null_block_id(kv_cache_manager: Any) -> int:
    """The id of the block pool's ``null_block`` (what a released row entry holds)."""
    return int(kv_cache_manager.block_pool.null_block.block_id)


def is_finished_normally(request: Any) -> bool:
    """A request that stopped or hit its length (not aborted): its KV is complete."""
    from vllm.v1.request import RequestStatus

    done = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)
    return request.status in done


# --------------------------------------------------------------------------- parallelism


def tensor_parallel_rank() -> int:
    """This process's tensor-parallel rank (0 outside a distributed setup)."""
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    except (AssertionError, RuntimeError):
        return 0


def tensor_parallel_size() -> int:
    """Ranks in this process's tensor-parallel group (1 outside a distributed setup)."""
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_world_size

        return get_tensor_model_parallel_world_size()
    except (AssertionError, RuntimeError):
        return 1


def tp_all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over the tensor-parallel group (every rank calls it)."""
    from vllm.distributed import tensor_model_parallel_all_reduce

    return tensor_model_parallel_all_reduce(t)


def tp_all_gather(t: torch.Tensor) -> torch.Tensor:
    """``[world, *t.shape]``: every rank's ``t`` (every rank calls it)."""
    from vllm.distributed import tensor_model_parallel_all_gather

    return tensor_model_parallel_all_gather(t.unsqueeze(0), dim=0)


# --------------------------------------------------------------------------- scheduler


def prompt_length(request: Any) -> int:
    """Scheduler side: the request's number of prompt tokens."""
    return int(request.num_prompt_tokens)


def image_embeds_from(request: Any, start: int) -> int:
    """Scheduler side: encoder embeddings of the request's multimodal items starting at or
    after ``start``; a repeated item once (vLLM encodes it once per step)."""
    seen: dict[str, int] = {}
    for f in _mm_features(request):
        if f.mm_position.offset >= start:
            seen[f.identifier] = f.mm_position.get_num_embeds()
    return sum(seen.values())


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

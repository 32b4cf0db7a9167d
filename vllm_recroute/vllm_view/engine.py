"""The engine's shape: decoder depth and the tensor-parallel group."""

from __future__ import annotations

import sys
from typing import Any

import torch


def num_decoder_layers(vllm_config: Any) -> int:
    """The text model's decoder layers (the routed decoder's ``len(layers)``)."""
    return int(vllm_config.model_config.get_num_layers(vllm_config.parallel_config))


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


def tp_device() -> torch.device:
    """The device the tensor-parallel group communicates on (cuda:N under NCCL, cpu under
    gloo)."""
    from vllm.distributed.parallel_state import get_tp_group

    return get_tp_group().device


def tp_all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over the tensor-parallel group (every rank calls it)."""
    from vllm.distributed import tensor_model_parallel_all_reduce

    return tensor_model_parallel_all_reduce(t)


def tp_all_gather(t: torch.Tensor) -> torch.Tensor:
    """``[world, *t.shape]``: every rank's ``t`` (every rank calls it)."""
    from vllm.distributed import tensor_model_parallel_all_gather

    return tensor_model_parallel_all_gather(t.unsqueeze(0), dim=0)


def piece_compiler(vllm_config: Any) -> tuple[str, dict[str, Any]] | None:
    """``(backend, options)`` for compiling a routed segment's layers the way vLLM compiles
    this engine's text model, or None where vLLM does not compile it (``enforce_eager``,
    ``CompilationMode.NONE``). CPU (``DYNAMO_TRACE_ONCE``, as the CPU platform sets it):
    vLLM's own backend name (inductor, or eager in its CPU CI mode) with its
    ``inductor_compile_config``; ``VLLM_COMPILE`` (CUDA): plain inductor, not vLLM's
    piecewise backend, whose pieces are split at attention for CUDA graphs a routed
    prefill does not replay."""
    from vllm.config import CompilationMode

    cc = vllm_config.compilation_config
    if cc.mode in (None, CompilationMode.NONE):
        return None
    if cc.mode == CompilationMode.VLLM_COMPILE:
        return "inductor", {}
    backend = cc.backend or "inductor"
    options = dict(cc.inductor_compile_config) if backend == "inductor" else {}
    return backend, options


def fused_kv_rows(qkv_proj: Any, q_size: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The K and V rows of a fused ``QKVParallelLinear``'s weight ``[2 * kv_size, hidden]``
    (and of its bias), as views, for projecting keys and values without the queries; None
    where the weight is not a plain matrix this plugin can multiply by: a quantized layer
    (its ``quant_method`` is not ``UnquantizedLinearMethod``), or a weight vLLM's CPU
    gemm dispatch already dropped after packing it for oneDNN (``numel() == 0``)."""
    if not _unquantized(getattr(qkv_proj, "quant_method", None)):
        return None
    weight = getattr(qkv_proj, "weight", None)
    if weight is None or weight.dim() != 2 or weight.shape[0] <= q_size:
        return None
    bias = getattr(qkv_proj, "bias", None)
    return weight.data[q_size:], None if bias is None else bias.data[q_size:]


def _unquantized(method: Any) -> bool:
    """vLLM's plain method (or a subclass), or a fake of its name (the GPU check's
    vLLM-free micro phase). Never imports vLLM: a layer of vLLM's exists only where its
    linear module is loaded already."""
    if type(method).__name__ == "UnquantizedLinearMethod":
        return True
    linear = sys.modules.get("vllm.model_executor.layers.linear")
    return linear is not None and isinstance(method, linear.UnquantizedLinearMethod)

"""The step being executed: what P1 publishes, the batch's rows, and the per-forward
switches (eager bypass, CustomOp kernels) of vLLM 0.32's V1 model runner
(`vllm/v1/worker/gpu_model_runner.py`, inherited by `cpu_model_runner.py`)."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any

import torch


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


def runtime_of(runner: Any) -> Any | None:
    """The routed worker runtime of the runner's model (``model.recroute.runtime``: the
    routed decoder's, worker/runtime.py), or None."""
    try:
        model = runner.get_model()
    except (AttributeError, ValueError):  # no model loaded yet
        return None
    return getattr(getattr(model, "recroute", None), "runtime", None)


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


def native_custom_ops(module: torch.nn.Module) -> list[tuple[Any, Any, Any]]:
    """``(op, native, kernel)`` for every vLLM ``CustomOp`` under ``module`` that dispatches
    to its PyTorch-native forward (what vLLM picks when inductor compiles the model: the
    graph fuses it) and whose class has its own platform kernel, the one vLLM runs in eager
    mode. An op without one stays native: CustomOp.forward_cuda raises NotImplementedError."""
    from vllm.model_executor.custom_op import CustomOp
    from vllm.platforms import current_platform

    names = _kernel_names(current_platform)
    out = []
    for op in module.modules():
        if not isinstance(op, CustomOp):
            continue
        native = op._forward_method
        if getattr(native, "__func__", None) is not type(op).forward_native:
            continue  # already a kernel (enabled op), or a compiled native
        kernel = platform_kernel(op, names, CustomOp)
        if kernel is not None:
            out.append((op, native, kernel))
    return out


def _kernel_names(platform: Any) -> tuple[str, ...]:
    """The CustomOp methods that are this platform's kernel, in dispatch order (vLLM's
    CustomOp.dispatch_forward; forward_hip falls back to forward_cuda)."""
    if platform.is_cpu():
        return ("forward_cpu",)
    if platform.is_rocm():
        return ("forward_hip", "forward_cuda")
    if platform.is_cuda():
        return ("forward_cuda",)
    return ()  # XPU, TPU, out-of-tree: their base kernels are the native forward anyway


def platform_kernel(op: Any, names: tuple[str, ...], base: type) -> Any | None:
    """The bound kernel of the first of ``names`` that ``type(op)`` overrides (relative to
    ``base``, vLLM's CustomOp), or None: the base's kernels are the native forward or raise
    NotImplementedError, so switching to them gains nothing or crashes."""
    for name in names:
        if getattr(type(op), name) is not getattr(base, name):
            return getattr(op, name)
    return None


def use_forwards(ops: list[tuple[Any, Any, Any]], kernels: bool) -> None:
    """Switch ``native_custom_ops``' ops to their kernels (True) or back (False)."""
    for op, native, kernel in ops:
        op._forward_method = kernel if kernels else native


def run_eager_this_forward() -> None:
    """Run this forward's compiled modules eager (vLLM's own per-forward bypass,
    ``ForwardContext.skip_compiled``, read by ``@support_torch_compile``'s ``__call__``)."""
    from vllm.forward_context import get_forward_context

    get_forward_context().skip_compiled = True


def attention_query_hookable(attn: Any) -> tuple[bool, str]:
    """Whether ``hook_attention_query`` sees ``attn``'s query at run time, and why not.

    vLLM's ``Attention.forward`` calls its impl through the opaque custom op
    ``vllm::unified_attention_with_output`` (``use_direct_call`` False: CPU, CUDA, ROCm),
    which runs outside any compiled graph (CPU: an opaque call inside the inductor graph;
    CUDA: a splitting op between piecewise graphs) and reaches ``attn.impl.forward`` with the
    layer's post-RoPE query. With a direct call Dynamo would trace the impl into the graph,
    and a quantized query (``query_quant``) is not the query the scores need."""
    impl = getattr(attn, "impl", None)
    if impl is None or not callable(getattr(impl, "forward", None)):
        return False, "the attention layer has no impl.forward"
    if getattr(attn, "use_direct_call", True):
        return False, "attention is not vLLM's opaque custom op on this platform"
    if getattr(attn, "query_quant", None) is not None:
        return False, "the attention query is quantized"
    return True, ""


def hook_attention_query(attn: Any, fn: Any) -> Any:
    """Call ``fn(query)`` in ``attn``'s attention op before its kernel runs, on every call
    until the returned remover is called. ``query``: ``[tokens, heads, head_dim]``, the
    layer's post-RoPE query of the step's rows (padding rows included). ``fn`` runs before
    this layer's attention reads the cache; the step's own new K/V may already be written
    (CPU: ``unified_kv_cache_update`` runs before the op) or be written by the impl after
    ``fn``: what ``fn`` writes must not be the step's own slots.

    Installed on the impl instance (``attn.impl.forward``: the op calls
    ``self.impl.forward(self, query, ...)``, ``unified_attention_with_output``); the remover
    puts back exactly what was there (an instance attribute, or none)."""
    impl = attn.impl
    had = "forward" in vars(impl)
    previous = vars(impl).get("forward")
    inner = impl.forward

    def forward(layer: Any, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        fn(query)
        return inner(layer, query, *args, **kwargs)

    impl.forward = forward

    def remove() -> None:
        if vars(impl).get("forward") is not forward:
            return  # already removed
        if had:
            impl.forward = previous
        else:
            del impl.forward

    return remove

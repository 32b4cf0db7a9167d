"""Every change this plugin makes to vLLM's own code, in one place.

Each patch records what it does, why, its upstream status and when to remove it
(after vllm-ascend's patch record). Patches are applied lazily by the routed model
classes, inside the worker process that loads them, and only once.

P1  GPUModelRunner.execute_model -> publishes the running step
    What:   wraps `execute_model(scheduler_output)` so that, for the duration of the
            call, `current_step()` returns the runner and the scheduler output, and
            forgets routing state of finished/preempted requests.
    Why:    a vLLM model's forward() receives only flattened tokens and positions; it
            cannot tell which request a row belongs to. Routing keeps per-request state
            across steps (how many visual tokens each stage deferred, which compacts
            that stage's KV) and honours per-request options (SamplingParams.extra_args),
            both of which need request identity in batch order (input_batch.req_ids).
    Upstream: no equivalent API in vLLM 0.32 (CommonAttentionMetadata.req_idx is set
            only for prefill context parallelism and carries no request id).
    Remove: when vLLM exposes per-request ids/extra_args to model forward (e.g. through
            ForwardContext.additional_kwargs or attention metadata).
            CPUModelRunner inherits execute_model from GPUModelRunner, so one wrap
            covers both; a runner that overrides it is refused at load.

The routed architectures also add entries to vLLM's MODELS_CONFIG_MAP (see
models/config_hook.py); that is the documented per-architecture config hook, not a
patch of vLLM code, but it is a write into a vLLM module-level dict, so it is listed:
P2  vllm.model_executor.models.config.MODELS_CONFIG_MAP[<Recroute arch>]
    Why: routed models must run eager (data-dependent token gathers), without prefix
         caching unless kv_release (routed-stage KV depends on the question), keep prompts
         whole (chunked prefill off unless recroute.chunked_prefill='fallback'), and validate
         per-request options at admission (adds the no-op RequestOptionsValidator to
         ModelConfig.logits_processors, whose validate_params vLLM turns into HTTP 400);
         the hook sets that before the engine is built, in every process that builds a
         VllmConfig, and raises a startup error naming the field on a bad config.
    Remove: if vLLM grows a public registration API for config hooks.
"""

from __future__ import annotations

import contextvars
import functools
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from vllm_recroute._compat import check_vllm_version


@dataclass(frozen=True)
class StepContext:
    """What the model may know about the step being executed."""

    runner: Any  # vllm.v1.worker.gpu_model_runner.GPUModelRunner
    scheduler_output: Any  # vllm.v1.core.sched.output.SchedulerOutput


_STEP: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar(
    "vllm_recroute_step", default=None
)
_forget_listeners: list[Callable[[Iterable[str]], None]] = []
_lock = threading.Lock()
_applied = False


def current_step() -> StepContext | None:
    """The step being executed in this worker, or None (dummy/profile runs)."""
    return _STEP.get()


def on_requests_gone(listener: Callable[[Iterable[str]], None]) -> None:
    """Call `listener(req_ids)` for requests finished or preempted (state is stale)."""
    if listener not in _forget_listeners:
        _forget_listeners.append(listener)


def _notify_gone(scheduler_output: Any) -> None:
    gone = set(getattr(scheduler_output, "finished_req_ids", None) or ())
    gone |= set(getattr(scheduler_output, "preempted_req_ids", None) or ())
    if gone:
        for listener in _forget_listeners:
            listener(gone)


def apply_patches() -> None:
    """Apply P1 (idempotent, thread-safe)."""
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


def _wrap_execute_model(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def execute_model(self, scheduler_output, *args, **kwargs):
        _notify_gone(scheduler_output)
        token = _STEP.set(StepContext(runner=self, scheduler_output=scheduler_output))
        try:
            return original(self, scheduler_output, *args, **kwargs)
        finally:
            _STEP.reset(token)

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

"""Where a test engine's engine core and worker run: in the test process, one engine at a
time, or in vLLM's own processes.

An engine started the usual way spawns an engine-core process that spawns a worker
process, and each imports vLLM and torch again: about 16 s of an engine's 20 s start on
this CPU, paid by every engine fixture of the suite. In-process (vLLM's InprocClient over
its UniProcExecutor, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``) the start is the model's own
(about 4 s). vLLM keeps per-process state for the engine it runs in-process (the
distributed groups, the worker's KV-connector group, its env cache, the CPU worker's
``torch.set_num_threads`` shim; it binds no threads in-process: the process's CPUs stay
as they were), so:

- at most one in-process engine is alive at a time; any engine started while one is, a
  tensor- or data-parallel engine, or one asked for with ``in_process=False`` runs the
  usual way (the session-wide engines of tests/conftest.py do, so that the module engines
  started beside them can run here);
- it computes on one torch thread, as vLLM's worker process would;
- stopping an in-process engine gives that state back (``release``).

What in-process does not exercise, the tests that need it keep: scheduler output and
connector metadata crossing a process boundary (the TP engines' workers and every
`vllm-recroute serve` process of tests/e2e run in processes of their own).
"""

from __future__ import annotations

import contextlib
import os

import torch

ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"

# This process's torch threads and thread setter before any in-process engine changed them.
_THREADS = torch.get_num_threads()
_SET_NUM_THREADS = torch.set_num_threads
# An in-process engine computes on this process's torch threads. vLLM's worker process
# serves on one ("Reducing Torch threads ... for serving"; its CPU worker's shim keeps that
# from taking effect in-process), so one here too: with two, every OpenMP region of the
# engine waits on whatever else runs on the second core (the unit tests, beside the rest).
ENGINE_THREADS = 1
# The live in-process engine (at most one), held until its shutdown: an id() could be
# reused by a later engine after a collection.
_live: set[object] = set()


def wanted(in_process: bool | None, engine_args: dict) -> bool:
    """Whether the next engine runs in this process: ``in_process`` True demands it (an
    error while another in-process engine is alive), None takes it when it is allowed."""
    parallel = any(
        engine_args.get(k, 1) > 1 for k in ("tensor_parallel_size", "data_parallel_size")
    )
    if in_process and parallel:
        raise RuntimeError("in_process=True: a parallel engine has worker processes")
    if in_process and _live:
        raise RuntimeError("in_process=True: another in-process engine is alive")
    return (not parallel and not _live) if in_process is None else in_process


@contextlib.contextmanager
def started(in_process: bool):
    """Around ``LLM(...)``: vLLM reads the mode from the environment at construction (its
    env cache dropped first: an in-process engine core turns it on for the process)."""
    import vllm.envs as envs

    envs.disable_envs_cache()
    if in_process:
        torch.set_num_threads(ENGINE_THREADS)  # before the worker's shim replaces the setter
    before = os.environ.get(ENV)
    os.environ[ENV] = "0" if in_process else "1"
    try:
        yield
    except BaseException:
        if in_process:  # no engine to release: the threads at least go back
            _restore_threads()
        raise
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def register(llm) -> None:
    _live.add(llm)


def is_in_process(llm) -> bool:
    return llm in _live


def release(llm) -> None:
    """After an in-process engine's shutdown: its distributed groups, KV-connector group,
    threads and thread setter go, so that the next engine starts as the first did."""
    from vllm.distributed import cleanup_dist_env_and_memory
    from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_shutdown

    _live.discard(llm)
    ensure_kv_transfer_shutdown()
    cleanup_dist_env_and_memory()
    _restore_threads()


def _restore_threads() -> None:
    torch.set_num_threads = _SET_NUM_THREADS
    torch.set_num_threads(_THREADS)

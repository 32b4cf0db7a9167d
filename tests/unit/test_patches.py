"""Patch P1: the runner publishes the step and reports requests that are gone."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_recroute import patches


def test_apply_patches_is_idempotent():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    patches.apply_patches()
    patches.apply_patches()
    fn = GPUModelRunner.execute_model
    assert fn.__recroute_patched__
    assert not getattr(fn.__wrapped__, "__recroute_patched__", False)  # wrapped once


def test_wrapper_publishes_step_and_notifies_gone_requests():
    gone: list[set] = []
    patches.on_requests_gone(gone.append)
    seen = {}

    def inner(runner, scheduler_output):
        seen["step"] = patches.current_step()
        return "out"

    execute_model = patches._wrap_execute_model(inner)
    runner, sched = object(), SimpleNamespace(finished_req_ids={"a"}, preempted_req_ids={"b"})
    assert execute_model(runner, sched) == "out"
    assert seen["step"].runner is runner and seen["step"].scheduler_output is sched
    assert patches.current_step() is None  # only during the step
    assert gone[-1] == {"a", "b"}


def test_runner_overriding_execute_model_is_refused():
    class Overrides:
        def execute_model(self, scheduler_output):
            return None

    with pytest.raises(RuntimeError, match="overrides execute_model"):
        patches.check_runner_patched(Overrides)

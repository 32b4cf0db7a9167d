"""The patch record: P1 publishes the step and reports requests that are gone; every vLLM
attribute any patch or read depends on exists in the installed vLLM."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest

from vllm_recroute import patches, vllm_view


def test_apply_patches_is_idempotent():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    patches.apply_patches()
    patches.apply_patches()
    fn = GPUModelRunner.execute_model
    assert fn.__recroute_patched__
    assert not getattr(fn.__wrapped__, "__recroute_patched__", False)  # wrapped once


def test_wrapper_publishes_step_and_notifies_gone_requests():
    gone: list[set] = []
    seen = {}

    class Runner:
        def get_model(self):
            decoder = SimpleNamespace(requests_gone=lambda f, p: gone.append((f, p)))
            return SimpleNamespace(recroute=decoder)

    def inner(runner, scheduler_output):
        seen["step"] = vllm_view.current_step()
        return "out"

    execute_model = patches._wrap_execute_model(inner)
    runner, sched = Runner(), SimpleNamespace(finished_req_ids={"a"}, preempted_req_ids={"b"})
    assert execute_model(runner, sched) == "out"
    assert seen["step"].runner is runner and seen["step"].scheduler_output is sched
    assert vllm_view.current_step() is None  # only during the step
    assert gone[-1] == ({"a"}, {"b"})


def test_runner_overriding_execute_model_is_refused():
    class Overrides:
        def execute_model(self, scheduler_output):
            return None

    with pytest.raises(RuntimeError, match="overrides execute_model"):
        patches.check_runner_patched(Overrides)


def _resolve(target: str):
    module, _, attrs = target.partition(":")
    obj = importlib.import_module(module)
    for name in attrs.split("."):
        obj = getattr(obj, name)
    return obj


@pytest.mark.parametrize("target", [t for p in patches.PATCHES for t in p.targets])
def test_every_patched_or_read_vllm_attribute_exists(target):
    assert _resolve(target) is not None


def test_the_record_is_complete_and_resolvable_fails_on_a_missing_attribute():
    ids = [p.id for p in patches.PATCHES]
    assert len(ids) == len(set(ids))
    for p in patches.PATCHES:
        assert p.what and p.why and p.upstream and p.remove_when and p.targets, p.id
    # guard: the resolver does fail when vLLM renames an attribute
    with pytest.raises(AttributeError):
        _resolve("vllm.v1.worker.gpu_model_runner:GPUModelRunner.execute_model_renamed")

"""Patch P10: the plugin's own KV connector does not change vLLM's CPU thread binding.

vLLM 0.32 reserves one more CPU per worker for any configured KV connector; the routed
engine always has one (the plugin's), so without P10 it would bind its worker to a
different set of CPUs than plain vLLM on the same host (docs/benchmarks.md, "Threads").
"""

from __future__ import annotations

from tests.helpers import ROUTED_IDEFICS3


def _config(model, arch: str | None, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    args = dict(model=str(model), max_model_len=1024, **kwargs)
    if arch:
        args["hf_overrides"] = {"architectures": [arch]}
        args["additional_config"] = {"recroute": {"schedule": "pdrop"}}
    return EngineArgs(**args).create_engine_config()


def _binding(manager) -> tuple:
    return manager.reserve_cpu_num, manager.cpu_lists, manager.reserved_cpu_list


def test_routed_engine_binds_threads_like_plain_vllm(tiny_idefics3, monkeypatch):
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
    plain = _config(tiny_idefics3, None)
    routed = _config(tiny_idefics3, ROUTED_IDEFICS3)
    assert plain.kv_transfer_config is None
    assert routed.kv_transfer_config.kv_connector == "RecrouteConnector"
    assert _binding(OMPProcessManager(routed)) == _binding(OMPProcessManager(plain))
    assert routed.kv_transfer_config.kv_connector == "RecrouteConnector"  # restored


def test_without_the_patch_the_connector_reserves_a_cpu(tiny_idefics3, monkeypatch):
    """Guard: the test above can fail; vLLM's own __init__ reserves more for a connector."""
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
    original = OMPProcessManager.__init__.__wrapped__
    plain, routed = OMPProcessManager.__new__(OMPProcessManager), None
    original(plain, _config(tiny_idefics3, None))
    routed = OMPProcessManager.__new__(OMPProcessManager)
    original(routed, _config(tiny_idefics3, ROUTED_IDEFICS3))
    assert routed.reserve_cpu_num == plain.reserve_cpu_num + 1


def test_other_connectors_keep_vllms_reservation(tiny_idefics3, monkeypatch):
    from vllm.config import KVTransferConfig
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
    plain = OMPProcessManager(_config(tiny_idefics3, None))
    other = _config(
        tiny_idefics3,
        None,
        kv_transfer_config=KVTransferConfig(
            kv_connector="ExampleConnector", kv_role="kv_both", kv_connector_extra_config={}
        ),
    )
    assert OMPProcessManager(other).reserve_cpu_num == plain.reserve_cpu_num + 1

"""On a host where vLLM would pick Model Runner V2 (Triton present: every CUDA host), a
routed architecture runs on the V1 runner (patch P9) and routes. The CPU build has no
Triton, so the Triton host is simulated in-process: engine core and worker in this
process (``make_llm(in_process=True)``: VLLM_ENABLE_V1_MULTIPROCESSING=0, one worker),
vLLM's HAS_TRITON set."""

from __future__ import annotations

import pytest

from tests.helpers import (
    CONFIGS,
    REQUESTS,
    ROUTED_IDEFICS3,
    generate,
    make_llm,
    oracle,
    runtime_of,
    shutdown,
)

pytestmark = pytest.mark.engine


def test_a_simulated_triton_host_runs_the_v1_runner_and_routes(tiny_idefics3, hf_eager):
    import vllm.config.vllm as vllm_config_module

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vllm_config_module, "HAS_TRITON", True)
        mp.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
        llm = make_llm(
            tiny_idefics3,
            routed_arch=ROUTED_IDEFICS3,
            recroute={"schedule": "pdrop"},
            in_process=True,
        )
        try:
            assert llm.llm_engine.vllm_config.use_v2_model_runner is False
            runner = llm.collective_rpc(lambda worker: type(worker.model_runner).__name__)
            assert runner == ["CPUModelRunner"]  # the V1 runner (V2's is GPUModelRunner in gpu/)
            outs = generate(llm, tiny_idefics3, [CONFIGS["pdrop-reroute"]] * len(REQUESTS))
            for spec, out in zip(REQUESTS, outs, strict=True):
                expected = oracle(hf_eager, tiny_idefics3, spec, CONFIGS["pdrop-reroute"])[1]
                assert list(out.outputs[0].token_ids) == expected
            routed = llm.collective_rpc(
                lambda w: sum(runtime_of(w).ledger.totals["routed_requests"].values())
            )
            assert routed == [len(REQUESTS)]
        finally:
            shutdown(llm)

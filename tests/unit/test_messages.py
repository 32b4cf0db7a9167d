"""The scheduler <-> worker messages: one pure module, vLLM's metadata types to vLLM."""

from __future__ import annotations

import pickle
import subprocess
import sys

from vllm_recroute.messages import (
    DeferredReport,
    RecrouteMetadata,
    ReleasedBlocks,
    TurnLoad,
    TurnSave,
)


def test_the_messages_module_imports_neither_vllm_nor_torch():
    code = (
        "import sys, vllm_recroute.messages\n"
        "print(sorted(m for m in ('vllm', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_messages_are_vllms_connector_metadata_and_travel_pickled():
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorMetadata,
        KVConnectorWorkerMetadata,
    )

    import vllm_recroute.connector.connector  # noqa: F401  (attaches vLLM's base types)

    meta = RecrouteMetadata(
        released=[ReleasedBlocks("a", 1, 1, (3,), (7,))],
        turn_evictions=[4],
        turn_saves=[TurnSave("a", 5, 12, ((1, 2),))],
        turn_loads=[TurnLoad("b", 5, 0, 12, ((3, 4),))],
    )
    assert isinstance(meta, KVConnectorMetadata)
    assert isinstance(DeferredReport(), KVConnectorWorkerMetadata)
    assert pickle.loads(pickle.dumps(meta)) == meta


def test_deferred_reports_of_tensor_parallel_ranks_aggregate_to_one():
    a = DeferredReport({"r": {1: 3}})
    b = DeferredReport({"r": {1: 3}, "s": {2: 1}})
    assert a.aggregate(b) is a
    assert a.deferred == {"r": {1: 3}, "s": {2: 1}}
    assert a.aggregate(None) is a

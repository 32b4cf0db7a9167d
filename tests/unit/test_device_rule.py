"""The device rule on CPU: the worker's routing pieces under CUDA's device rules.

`tests/device_checks.py` holds the checks (shared with `tools/gpu_check.py --phase micro`,
which runs them on real CUDA tensors on a GPU host); here they run under
`tests/devices.py`'s FakeCuda, where a host/device mix CUDA refuses raises.
"""

from __future__ import annotations

import pytest
import torch

from tests.device_checks import CHECKS, run_check
from tests.devices import DeviceMixError, FakeCuda
from vllm_recroute.routing.scorers import _attention_sums


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_device_rule_check_passes_under_fake_cuda(name):
    assert run_check(name, "fake") == "ok"


def test_the_harness_refuses_what_cuda_refuses():
    """Guard: the mode is not vacuous (the mixes of the issue's sites raise)."""
    with FakeCuda() as fc:
        d = torch.zeros(4, 3, device="cuda")
        host_idx = torch.arange(4)
        for op in (
            lambda: d.masked_fill(torch.ones(4, 3, dtype=torch.bool), 0.0),  # scorers.py
            lambda: host_idx[d[:, 0].long()],  # step.py: host tensor, device index
            lambda: d.index_copy(0, host_idx, d),  # decoder.py
            lambda: torch.isin(d, host_idx.float()),  # decision.py
            lambda: torch.stack([d[0], host_idx[:3].float()]),  # parking.py digests
        ):
            with pytest.raises(DeviceMixError):
                op()
        assert d[host_idx].device.type == "cuda"  # a host index into a device tensor: fine
        moved = host_idx.to(d.device)
        assert moved.device.type == "cuda" and fc.h2d == 1 and fc.h2d_bytes == 32


def test_a_future_mask_on_the_host_is_refused():
    """Site 1 of the issue, reproduced in isolation: the attention scorer's causal mask
    built on the host meets device logits."""
    with FakeCuda():
        logits = torch.zeros(2, 5, device="cuda")
        with pytest.raises(DeviceMixError, match="masked_fill"):
            logits.masked_fill(torch.arange(5)[None, :] > torch.arange(2)[:, None], 0.0)


def test_fake_tensor_mode_agrees_on_the_scorer_mask():
    """FakeTensorMode (fake CUDA tensors, no values) on the scorer's maths: the logits
    are fine on fake CUDA, and the causal mask built from host query indices is refused
    at ``masked_fill``, which is why ``AttentionScorer.score`` moves the indices to the
    keys' device first. (On this CPU-only build FakeTensorMode can neither create a
    tensor on cuda nor index one, so the passing side is FakeCuda's, above.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fake_cuda(shape, dtype=torch.float32):
        meta = torch.empty(shape, dtype=dtype, device="meta")
        return mode.fake_tensor_converter.from_meta_and_device(mode, meta, torch.device("cuda", 0))

    q, k = fake_cuda((3, 2, 2, 32)), fake_cuda((8, 2, 32))
    with mode:
        logits = torch.einsum("qhgd,thd->qhgt", q, k).softmax(-1)
        assert logits.device.type == "cuda" and logits.shape == (3, 2, 2, 8)
        with pytest.raises(RuntimeError, match="device"):
            _attention_sums(q, k, torch.tensor([5, 6, 7]), 0.1)

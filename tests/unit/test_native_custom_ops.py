"""vllm_view.native_custom_ops: the eager routed forward switches a native CustomOp to its
platform kernel only where the op's class has one (CustomOp.forward_cuda raises)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


def _platform(kind: str) -> SimpleNamespace:
    return SimpleNamespace(
        is_cpu=lambda: kind == "cpu",
        is_rocm=lambda: kind == "rocm",
        is_cuda=lambda: kind == "cuda",
    )


def _ops():
    """Two fake CustomOps, set to their native forward as vLLM does for a disabled op
    under inductor (built without CustomOp.__init__, which needs an engine config)."""
    from vllm.model_executor.custom_op import CustomOp

    class NativeOnly(CustomOp):  # e.g. an op with forward_native only
        def forward_native(self, x):
            return x + 1

    class WithKernels(CustomOp):
        def forward_native(self, x):
            return x + 1

        def forward_cuda(self, x):
            return x + 2

        def forward_cpu(self, x):
            return x + 3

    def build(cls):
        op = torch.nn.Module.__new__(cls)
        torch.nn.Module.__init__(op)
        op._forward_method = op.forward_native
        return op

    root = torch.nn.Module()
    root.plain, root.fast = build(NativeOnly), build(WithKernels)
    return root


@pytest.mark.parametrize(
    ("kind", "switched"),
    [("cuda", 2), ("rocm", 2), ("cpu", 3), ("xpu", None)],  # rocm: forward_hip -> forward_cuda
)
def test_only_ops_whose_class_has_the_platform_kernel_switch(monkeypatch, kind, switched):
    import vllm.platforms

    from vllm_recroute import vllm_view

    root = _ops()  # imports vLLM's custom ops with the real platform
    monkeypatch.setattr(vllm.platforms, "_current_platform", _platform(kind))
    ops = vllm_view.native_custom_ops(root)
    assert [op for op, _, _ in ops] == ([root.fast] if switched else [])
    vllm_view.use_forwards(ops, True)
    x = torch.zeros(1)
    assert float(root.plain(x)) == 1  # stays native: its forward_cuda would raise
    assert float(root.fast(x)) == (switched or 1)
    vllm_view.use_forwards(ops, False)
    assert float(root.fast(x)) == 1


def test_base_forward_cuda_raises_so_the_check_matters():
    from vllm.model_executor.custom_op import CustomOp

    with pytest.raises(NotImplementedError):
        CustomOp.forward_cuda(None)

"""The routed decoder's forward hooks are exception-safe: a routed forward that raises
leaves no step behind and puts vLLM's CustomOps back on their native forms."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from vllm_recroute import vllm_view
from vllm_recroute.worker.decoder import RoutedDecoder


class Exploding(torch.nn.Module):
    def forward(self, input_ids, positions):
        raise RuntimeError("kernel failure")


def test_a_failing_routed_forward_restores_ops_and_drops_the_step(monkeypatch):
    switched = []
    monkeypatch.setattr(vllm_view, "current_step", lambda: object())
    monkeypatch.setattr(vllm_view, "run_eager_this_forward", lambda: None)
    monkeypatch.setattr(vllm_view, "use_forwards", lambda ops, kernels: switched.append(kernels))
    dec = RoutedDecoder.__new__(RoutedDecoder)
    dec._step, dec._native_ops = None, ["rms_norm"]
    dec._unhooks, dec._hooked = [], {}
    dec.forwards = Counter()
    dec._begin_step = lambda num_rows: SimpleNamespace(needs_eager=True)
    model = Exploding()
    dec._install_hooks(model)
    with pytest.raises(RuntimeError, match="kernel failure"):
        model(torch.zeros(3, dtype=torch.long), positions=torch.arange(3))
    assert switched == [True, False]  # guard: the eager path was taken, then undone
    assert dec._step is None

"""LayerRuns (worker/layer_runs.py): a range of decoder layers as one piece, compiled or
eager. Compiled ranges equal the eager loop, take any row count with one graph, keep a
Dynamo cache each (more ranges than Dynamo's recompile limit stay compiled), and a range
that fails to compile runs eager instead, with a warning."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from vllm_recroute.worker.layer_runs import LayerRuns

HIDDEN = 8


class Layer(torch.nn.Module):
    """vLLM's fused-residual layer shape: (positions, hidden, residual) -> (hidden, residual)."""

    def __init__(self, seed: int, breaks_graph: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(HIDDEN, HIDDEN, generator=g) * 0.3)
        self.breaks_graph = breaks_graph

    def forward(self, positions, hidden, residual):
        residual = hidden if residual is None else hidden + residual
        if self.breaks_graph:
            torch._dynamo.graph_break()  # refused under fullgraph=True
        return torch.tanh(residual @ self.w) + 0.01 * positions[:, None], residual


def _stream(n: int):
    g = torch.Generator().manual_seed(n)
    return (
        torch.arange(n).float(),
        torch.randn(n, HIDDEN, generator=g),
        torch.randn(n, HIDDEN, generator=g),
    )


def _runs(layers, compiled: bool) -> LayerRuns:
    return LayerRuns([layer.forward for layer in layers], ("eager", {}) if compiled else None)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_ranges_equal_the_eager_loop_with_one_graph_each_for_any_row_count():
    layers = [Layer(i) for i in range(12)]
    compiled, eager = _runs(layers, True), _runs(layers, False)
    ranges = [(a, a + 1) for a in range(11)] + [(0, 12)]  # more ranges than the limit (8)
    graphs = counters["stats"]["unique_graphs"]
    for n in (5, 9, 17, 33):
        for a, b in ranges:
            pos, h, r = _stream(n)
            got, want = compiled.run(a, b, pos, h, r), eager.run(a, b, pos, h, r)
            assert torch.allclose(got[0], want[0]) and torch.equal(got[1], want[1])
    # one graph per range, traced at its first use, whatever the row count after that
    assert counters["stats"]["unique_graphs"] - graphs == len(ranges)
    assert compiled.counts == {"compiled": 4 * len(ranges)}
    assert eager.counts == {"eager": 4 * len(ranges)}


def test_stage_zero_takes_no_residual():
    layers = [Layer(i) for i in range(3)]
    pos, h, _ = _stream(6)
    got = _runs(layers, True).run(0, 3, pos, h, None)
    want = _runs(layers, False).run(0, 3, pos, h, None)
    assert torch.allclose(got[0], want[0]) and torch.allclose(got[1], want[1])


def test_a_range_that_fails_to_compile_runs_eager_from_then_on(caplog):
    layers = [Layer(0), Layer(1, breaks_graph=True), Layer(2)]
    runs, eager = _runs(layers, True), _runs(layers, False)
    for n in (4, 7):
        pos, h, r = _stream(n)
        got, want = runs.run(0, 3, pos, h, r), eager.run(0, 3, pos, h, r)
        assert torch.allclose(got[0], want[0]) and torch.equal(got[1], want[1])
    assert "layers [0, 3) run eager" in caplog.text
    assert runs.counts == {"eager": 2}
    pos, h, r = _stream(5)
    runs.run(0, 1, pos, h, r)  # another range still compiles
    assert runs.counts == {"eager": 2, "compiled": 1}

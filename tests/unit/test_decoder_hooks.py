"""The routed decoder's forward hooks are exception-safe: a routed forward that raises
leaves no step behind and puts vLLM's CustomOps back on their native forms. A pure-decode
re-routing step hooks the attention op of its due stage-start layers only, for that
forward only (a raising one included), and re-routes there with the op's query."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from vllm_recroute import vllm_view
from vllm_recroute.worker.decoder import RoutedDecoder
from vllm_recroute.worker.layer_runs import LayerRuns


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
    dec.forwards, dec.row_moves, dec._kernels_on = Counter(), Counter(), False
    dec.runs = LayerRuns([])  # eager pieces: the eager forward switches to the kernels
    step = SimpleNamespace(needs_eager=True, tier=SimpleNamespace(due={}))
    dec._begin_step = lambda num_rows: step
    model = Exploding()
    dec._install_hooks(model)
    with pytest.raises(RuntimeError, match="kernel failure"):
        model(torch.zeros(3, dtype=torch.long), positions=torch.arange(3))
    assert switched == [True, False]  # guard: the eager path was taken, then undone
    assert dec._step is None


# -- re-routing decode steps: the attention-op hooks (vllm_view.hook_attention_query, P15) --

NUM_LAYERS, HEADS, DIM = 6, 2, 4


class Impl:
    """An attention impl as vLLM's op calls it: ``impl.forward(layer, query, ...)``."""

    def forward(self, layer, query, key=None, value=None, kv_cache=None, attn_metadata=None):
        return query


def _layers():
    out = []
    for _ in range(NUM_LAYERS):
        attn = SimpleNamespace(impl=Impl(), use_direct_call=False, query_quant=None)
        out.append(SimpleNamespace(self_attn=SimpleNamespace(attn=attn, head_dim=DIM, scaling=0.5)))
    return out


class Attending(torch.nn.Module):
    """Calls every layer's attention op as vLLM's does; records, per layer, whether its
    impl was hooked while it ran. ``fail_at``: raise there; ``skip``: layers never called."""

    def __init__(self, layers, queries, fail_at=None, skip=()):
        super().__init__()
        self.layers, self.queries, self.fail_at, self.skip = layers, queries, fail_at, skip
        self.hooked_while_running: list[int] = []

    def forward(self, input_ids, positions):
        for idx, layer in enumerate(self.layers):
            if idx == self.fail_at:
                raise RuntimeError("kernel failure")
            if idx in self.skip:
                continue
            impl = layer.self_attn.attn.impl
            if "forward" in vars(impl):
                self.hooked_while_running.append(idx)
            impl.forward(layer.self_attn.attn, self.queries[idx])
        return positions


def _router(layers, reroute_in_attention=True):
    """A real StepRouter over three decode rows: "a" (stages at 2 and 4) and "c" (stage at
    4) are due at this step, "b" (stage at 3) never re-routes."""
    from vllm_recroute.routing import Stage
    from vllm_recroute.vllm_view import StepBatch
    from vllm_recroute.worker.rows import StepRows
    from vllm_recroute.worker.state import RouteState
    from vllm_recroute.worker.step import StepRouter

    calls = []
    tier = SimpleNamespace(
        due=lambda i, every: every > 0 and i > 0 and i % every == 0,
        reroute_all=lambda due: calls.extend((d.req_id, d.k, d.q, d.scale) for d in due) or {},
        gauges=dict,
    )
    groups = SimpleNamespace(of_layer=lambda i: SimpleNamespace(gid=0, block_size=4))
    rt = SimpleNamespace(
        tier=tier, num_layers=NUM_LAYERS, released=None, layers=layers, groups=groups,
        record=lambda delta, gauges: None,
    )  # fmt: skip
    batch = StepBatch(
        req_ids=("a", "b", "c"),
        qsl=torch.tensor([0, 1, 2, 3]),
        num_computed=torch.tensor([10, 10, 11]),
        prompt_lens=(8, 8, 8),
        token_ids=torch.zeros(3, dtype=torch.long),
    )
    a = RouteState((Stage(2, 4, 0.5), Stage(4, 6, 0.25)), (4, 8), reroute_every=1)
    b = RouteState((Stage(3, 6, 0.5),), (4,), reroute_every=0)
    c = RouteState((Stage(4, 6, 0.5),), (4,), reroute_every=2)  # output 4: due
    rows = StepRows(batch, decodes={0: a, 1: b, 2: c})
    router = StepRouter(rt, None, rows, 3, reroute_in_attention)
    router.tables = router.tier.tables = lambda gid: torch.zeros(3, 4, dtype=torch.long)
    router.install_all = lambda: None
    return router, calls


def _decoder(layers, router):
    dec = RoutedDecoder.__new__(RoutedDecoder)
    dec.layers, dec._step, dec._native_ops = layers, None, []
    dec._unhooks, dec._hooked = [], {}
    dec.forwards, dec.reroute_forwards = Counter(), Counter()
    dec.row_moves, dec._kernels_on, dec.runs = Counter(), False, LayerRuns([])
    dec.reroute_in_attention = True
    dec._begin_step = lambda num_rows: router
    return dec


def _no_hooks_left(layers) -> bool:
    return all("forward" not in vars(layer.self_attn.attn.impl) for layer in layers)


def test_reroute_hooks_only_the_due_stage_start_layers_and_only_for_the_forward(monkeypatch):
    monkeypatch.setattr(vllm_view, "current_step", lambda: object())
    layers = _layers()
    router, calls = _router(layers)
    assert not router.needs_eager and router.reroutes_in_attention
    assert router.reroute_layers() == [2, 4]  # "b" (stage at 3) is not due
    queries = [torch.randn(3, HEADS, DIM) for _ in layers]
    model = Attending(layers, queries)
    _decoder(layers, router)._install_hooks(model)
    model(torch.zeros(3, dtype=torch.long), positions=torch.arange(3))
    assert model.hooked_while_running == [2, 4]
    assert _no_hooks_left(layers)
    # each due (request, stage) re-routed once, with its last row's query at its stage start
    assert [(req, k) for req, k, _, _ in calls] == [("a", 0), ("a", 1), ("c", 0)]
    for (_, _, q, scale), (layer, row) in zip(calls, [(2, 0), (4, 0), (4, 2)], strict=True):
        assert torch.equal(q, queries[layer][row]) and q.device.type == "cpu"
        assert scale == 0.5


def test_reroute_hooks_are_removed_when_the_forward_raises(monkeypatch):
    monkeypatch.setattr(vllm_view, "current_step", lambda: object())
    layers = _layers()
    router, _ = _router(layers)
    model = Attending(layers, [torch.randn(3, HEADS, DIM) for _ in layers], fail_at=3)
    dec = _decoder(layers, router)
    dec._install_hooks(model)
    with pytest.raises(RuntimeError, match="kernel failure"):
        model(torch.zeros(3, dtype=torch.long), positions=torch.arange(3))
    assert model.hooked_while_running == [2]  # guard: hooks were in place
    assert _no_hooks_left(layers) and dec._step is None and not dec._hooked
    assert dec.reroute_in_attention  # a raise is not a missing hook


def test_an_unhooked_attention_op_falls_back_to_eager(monkeypatch, caplog):
    monkeypatch.setattr(vllm_view, "current_step", lambda: object())
    layers = _layers()
    router, _ = _router(layers)
    model = Attending(layers, [torch.randn(3, HEADS, DIM) for _ in layers], skip=(4,))
    dec = _decoder(layers, router)
    dec._install_hooks(model)
    model(torch.zeros(3, dtype=torch.long), positions=torch.arange(3))
    assert _no_hooks_left(layers)
    assert not dec.reroute_in_attention and "not hooked" in caplog.text


def test_reroute_path_eager_runs_the_step_eager_without_hooks():
    layers = _layers()
    router, _ = _router(layers, reroute_in_attention=False)
    assert router.needs_eager and not router.reroutes_in_attention
    assert router.reroute_layers() == []  # the eager path re-routes on the routed path
    assert sorted(router.tier.due) == [2, 4]


def test_attention_query_hookable_and_the_hook_restores_what_was_there():
    attn = _layers()[0].self_attn.attn
    assert vllm_view.attention_query_hookable(attn) == (True, "")
    direct = SimpleNamespace(impl=Impl(), use_direct_call=True, query_quant=None)
    assert not vllm_view.attention_query_hookable(direct)[0]
    quant = SimpleNamespace(impl=Impl(), use_direct_call=False, query_quant=object())
    assert not vllm_view.attention_query_hookable(quant)[0]
    seen = []
    own = attn.impl.forward = lambda layer, query: ("own", query)  # an instance attribute
    remove = vllm_view.hook_attention_query(attn, seen.append)
    assert attn.impl.forward(attn, "q") == ("own", "q") and seen == ["q"]
    remove()
    remove()  # idempotent
    assert attn.impl.forward is own

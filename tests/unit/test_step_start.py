"""The step start: classifying the rows changes no state; the runtime's ``begin_step``
applies what it implies, explicitly: requests that start afresh forget their old state,
a prompt split at its image is counted, a loaded later turn's re-route is taken once."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import vllm_recroute.worker.runtime as runtime_mod
from vllm_recroute.config import RoutingConfig
from vllm_recroute.routing import Stage
from vllm_recroute.vllm_view import StepBatch
from vllm_recroute.worker.rows import Lookups, classify_rows
from vllm_recroute.worker.runtime import LayerCost, WorkerRuntime
from vllm_recroute.worker.state import RouteState
from vllm_recroute.worker.tp import TPGroup

IMG = 9
CFG = RoutingConfig(mode="reroute", schedule="custom", custom=((1, 0.5),))
STATE = RouteState((Stage(1, 2, 0.5),), (2,), 0)


def _batch() -> StepBatch:
    """r-new: a whole prompt (text, 4 visual, text); r-old: a routed decode; r-stale: a
    prompt from 0 whose id still has state (recomputed); r-split: a prompt chunked
    inside its image span."""
    new = [1, IMG, IMG, IMG, IMG, 2, 3]
    stale = [1, IMG, IMG, 2, 3]
    split = [1, IMG, IMG]  # 3 of its 6 prompt tokens
    tokens = [*new, 5, *stale, *split]
    qsl = [0, 7, 8, 13, 16]
    return StepBatch(
        req_ids=("r-new", "r-old", "r-stale", "r-split"),
        qsl=torch.tensor(qsl),
        num_computed=torch.tensor([0, 20, 0, 0]),
        prompt_lens=(7, 20, 5, 6),
        token_ids=torch.tensor(tokens),
    )


def _runtime(monkeypatch) -> WorkerRuntime:
    rt = WorkerRuntime(CFG, [object()] * 2, ["l0", "l1"], LayerCost(1, 1), IMG, tp=TPGroup(1))
    rt.groups = SimpleNamespace(bind=lambda runner: None)
    monkeypatch.setattr(runtime_mod.StepBatch, "of", staticmethod(lambda runner: _batch()))
    monkeypatch.setattr(rt, "_lookups", lambda runner: _lookups(rt))
    return rt


def _lookups(rt: WorkerRuntime) -> Lookups:
    return Lookups(IMG, 2, rt.store.get, lambda req_id: CFG, lambda req_id: 1)


@pytest.fixture
def rt(monkeypatch):
    rt = _runtime(monkeypatch)
    rt.store.put("r-old", STATE)
    rt.store.put("r-stale", STATE)
    rt.store.request_reroute("r-old")
    return rt


def test_classifying_the_rows_changes_no_state(rt):
    rows = classify_rows(_batch(), _lookups(rt))
    assert [p.req_id for p in rows.prefills] == ["r-new", "r-stale"]
    assert list(rows.decodes) == [1] and rows.fresh == ["r-new", "r-stale", "r-split"]
    assert rows.split == ["r-split"] and rows.forced == set()
    assert rt.store.get("r-stale") == STATE and rt.store.wants_reroute("r-old")
    assert rt.ledger.totals["chunked_fallbacks"] == 0


def test_begin_step_applies_the_step_start_side_effects(rt):
    rows = rt.begin_step(runner=None)
    assert rt.store.get("r-stale") is None  # starts afresh: the old decision is gone
    assert rt.store.get("r-old") == STATE
    assert rows.forced == {1} and not rt.store.wants_reroute("r-old")  # taken once
    assert rt.ledger.totals["chunked_fallbacks"] == 1
    assert rt.begin_step(runner=None).forced == set()

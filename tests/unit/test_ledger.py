"""The worker's Ledger: only the keys of the one metrics list, unknown ones refused."""

from __future__ import annotations

import pytest

from vllm_recroute.metrics.accounting import GAUGES, KEYS, Ledger, LedgerKey
from vllm_recroute.metrics.names import METRICS, PREFIX


def test_keys_are_the_metrics_and_the_named_handles_are_the_keys():
    assert set(KEYS) == {m.name.removeprefix(PREFIX) for m in METRICS}
    assert len(KEYS) == len(set(KEYS))
    handles = {v for k, v in vars(LedgerKey).items() if k.isupper()}
    assert handles == set(KEYS)
    assert all(getattr(LedgerKey, k.upper()) == k for k in KEYS)


def test_record_adds_counters_and_sets_gauges():
    ledger = Ledger()
    ledger.record({LedgerKey.VISUAL_TOKENS: 3, "routed_requests": {"reroute/fastv": 1}})
    ledger.record({"visual_tokens": 2}, {GAUGES[0]: 5}, {GAUGES[0]: 7}, {})
    assert ledger.totals["visual_tokens"] == 5
    assert ledger.totals["routed_requests"] == {"reroute/fastv": 1}
    assert ledger.totals[GAUGES[0]] == 7
    assert ledger.drain()["visual_tokens"] == 5
    assert ledger.drain()["visual_tokens"] == 0


def test_an_unknown_key_is_refused_by_name_and_nothing_is_recorded():
    ledger = Ledger()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['visual_tokenz'\]"):
        ledger.record({"visual_tokens": 1}, {"visual_tokenz": 1})
    assert ledger.totals["visual_tokens"] == 1  # the earlier, valid delta stands
    with pytest.raises(ValueError, match="chunked_fallbacks"):  # the message lists the keys
        ledger.record({"bogus": 1})
    assert "bogus" not in ledger.totals and "bogus" not in ledger.drain()

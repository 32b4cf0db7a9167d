"""keep=1.0 everywhere must be the unmodified model: same greedy tokens, same logprobs."""

from __future__ import annotations

import pytest

from tests.helpers import generate

pytestmark = pytest.mark.engine


def _logprobs(out) -> list[float]:
    o = out.outputs[0]
    return [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs, strict=True)]


@pytest.mark.parametrize(
    "cfg",
    [
        {"mode": "reroute", "schedule": "fastv", "keep": 1.0},
        {"mode": "remove", "schedule": "pdrop", "keep": 1.0},
        {"mode": "reroute", "schedule": "custom", "custom": [[1, 1.0], [3, 1.0]]},
    ],
)
def test_keep_one_equals_plain_vllm(routed_llm, plain_llm, tiny_idefics3, cfg):
    routed = generate(routed_llm, tiny_idefics3, [cfg] * 3)
    plain = generate(plain_llm, tiny_idefics3, [{}] * 3)
    for r, p in zip(routed, plain, strict=True):
        assert r.outputs[0].token_ids == p.outputs[0].token_ids
        assert _logprobs(r) == pytest.approx(_logprobs(p), abs=1e-4)


def test_routing_changes_output_below_full_budget(routed_llm, plain_llm, tiny_idefics3):
    # Guards the test above against a routed path that silently never routes.
    routed = generate(routed_llm, tiny_idefics3, [{"schedule": "pdrop", "keep": 0.25}] * 3)
    plain = generate(plain_llm, tiny_idefics3, [{}] * 3)
    assert any(
        _logprobs(r) != pytest.approx(_logprobs(p), abs=1e-4)
        for r, p in zip(routed, plain, strict=True)
    )

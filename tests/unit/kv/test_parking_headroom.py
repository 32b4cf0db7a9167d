"""The parked tier's extra activation is bounded: deferred rows' stage-wide K/V are
computed in chunks of at most PARK_CHUNK_BYTES on the device (vLLM's profile run never
sees this memory), with the same parked contents."""

from __future__ import annotations

import torch

import vllm_recroute.worker.parking as parking
from tests.unit.kv.test_parking_tier import DIM, KV_HEADS, tier_setup
from vllm_recroute.kv.parked_pool import ParkedKey

_REAL = parking._key_values


@torch.no_grad()
def _parked(monkeypatch, chunk_bytes):
    monkeypatch.setattr(parking, "PARK_CHUNK_BYTES", chunk_bytes)
    tier, _, x, positions, mask, cpos, scores, _ = tier_setup()
    rows_seen = []
    monkeypatch.setattr(
        parking,
        "_key_values",
        lambda layer, p, xs: rows_seen.append(len(xs)) or _REAL(layer, p, xs),
    )
    tier.park_prefill("r", 0, 1, 3, positions, x, mask, cpos, scores)
    return [tier.pool.restore(ParkedKey("r", 0, uid)) for uid in (2, 3, 4, 5)], rows_seen


def test_parking_in_bounded_chunks_parks_the_same_kv(monkeypatch):
    whole, rows_whole = _parked(monkeypatch, 1 << 30)
    # two units' rows per chunk: 2 layers x K and V x 4 bytes x kv_size per row
    per_row = 2 * 2 * KV_HEADS * DIM * 4
    chunked, rows_chunked = _parked(monkeypatch, 4 * per_row)
    assert rows_whole == [8, 8] and rows_chunked == [4, 4, 4, 4]  # guard: it did chunk
    for (k0, v0), (k1, v1) in zip(whole, chunked, strict=True):
        assert torch.allclose(k0, k1, atol=1e-6) and torch.allclose(v0, v1, atol=1e-6)

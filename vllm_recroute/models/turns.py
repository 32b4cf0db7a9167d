"""Later-turn restore, worker side: finished turns' stage KV kept on the host, loaded back.

The scheduler decides (kv/turn_index.py); this module follows, per step, in the order
evict → save → load, all before the forward pass that reads the loaded pages:

    turn 1 finishes            its pages are held by vLLM (delayed free)
      save(job)                every layer's rows in turn 1's stage layout (all tokens
                               at stage 0, the compacted active rows at a routed stage)
                               ──copy──► TurnRecord;  its parked units ──move──► TurnRecord
                               then finished_sending: vLLM frees turn 1's pages
    turn 2 arrives             the scheduler offered turn 1's tokens as external KV
      load(job)                TurnRecord ──write──► turn 2's new pages; turn 1's routing
                               state and units become turn 2's; parked units ──copy──►
                               ParkedPool under turn 2's id; turn 2 re-routes at its first
                               forward (StepRouter, query = its last prompt token)

A record is read-only once saved, so several later turns (branches of one conversation)
can load it. Its bytes belong to this store until the scheduler evicts it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_recroute.kv.turn_index import TurnLoad, TurnSave
from vllm_recroute.models.parking import PageRow, StageUnits
from vllm_recroute.routing import stage_at


@dataclass
class TurnRecord:
    """One finished turn's stage KV, in the layout its routing left it."""

    state: Any  # models/routed.RouteState, or None for a request that was not routed
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: K, V [rows, kv_heads, dim]
    units: dict[int, StageUnits] = field(default_factory=dict)  # stage -> units (no pool)
    parked: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, float]] = field(
        default_factory=dict
    )  # (stage, unit) -> K, V [stage layers, n, kv_heads, dim], score

    @property
    def nbytes(self) -> int:
        tensors = [t for kv in self.kv for t in kv]
        tensors += [t for k, v, _ in self.parked.values() for t in (k, v)]
        return sum(t.numel() * t.element_size() for t in tensors)


class TurnStore:
    """Kept turns of one routed decoder, by the scheduler's turn id."""

    def __init__(self, decoder: Any) -> None:
        self.decoder = decoder
        self.records: dict[int, TurnRecord] = {}
        self._sent: set[str] = set()

    # -- one step's jobs ----------------------------------------------------------------

    def apply(self, evicted: list[int], saves: list[TurnSave], loads: list[TurnLoad]) -> None:
        for turn_id in evicted:
            self.records.pop(turn_id, None)
        for job in saves:
            self.save(job)
        for job in loads:
            self.load(job)
        self.decoder.store.release_held()
        if evicted or saves or loads:
            self.decoder.store.record({**self.gauges(), **self.decoder.tier.gauges()})

    def take_sent(self) -> set[str]:
        """Requests whose pages were copied since the last call (vLLM may free them)."""
        out, self._sent = self._sent, set()
        return out

    # -- save / load ----------------------------------------------------------------------

    def save(self, job: TurnSave) -> None:
        dec, tier = self.decoder, self.decoder.tier
        state = dec.store.get(job.request_id)  # held since vLLM said it finished
        kv = []
        for i in range(dec.num_layers):
            page = self._page(i, job.block_ids)
            rows = torch.arange(_rows(state, i, job.num_tokens))
            kv.append(tier.io[i].read(page.slots(rows), page.block_size))  # gathered copies
        record = TurnRecord(state, kv)
        if state is not None:
            record.units, record.parked = tier.take(job.request_id, len(state.stages))
        self.records[job.turn_id] = record
        self._sent.add(job.request_id)
        dec.store.record({"turn_saves": 1})

    def load(self, job: TurnLoad) -> None:
        from vllm_recroute.models.routed import RouteState
        from vllm_recroute.request_options import routing_for_request

        dec, tier = self.decoder, self.decoder.tier
        record = self.records.get(job.turn_id)
        if record is None:
            raise RuntimeError(
                f"vllm-recroute: turn {job.turn_id} offered to request {job.request_id} is "
                "not in the worker's turn store (scheduler and worker disagree)"
            )
        for i, (k, v) in enumerate(record.kv):
            # an entry shorter than the record (its prompt alone) loads a prefix of the rows
            end = _rows(record.state, i, job.num_tokens)
            page = self._page(i, job.block_ids)
            rows = torch.arange(job.start, end)
            tier.io[i].write(k[job.start : end], v[job.start : end], page.slots(rows))
        delta = {"turn_loads": 1, "turn_loaded_tokens": job.num_tokens - job.start}
        state = record.state
        if state is not None:
            cfg = routing_for_request(dec.config, dec.runner, job.request_id)
            every = cfg.reroute_every if cfg.mode == "reroute" else 0
            dec.store.put(job.request_id, RouteState(state.stages, state.deferred, every))
            delta.update(tier.adopt(job.request_id, record.units, record.parked))
            if record.parked:
                dec.store.reroute_now.add(job.request_id)
        dec.store.record({**delta, **tier.gauges()})

    # -- helpers --------------------------------------------------------------------------

    def _page(self, layer_idx: int, block_ids: tuple[tuple[int, ...], ...]) -> PageRow:
        gid = self.decoder.group_of(self.decoder.runner, layer_idx)
        block_size, _ = self.decoder.group_info[gid]
        return PageRow(torch.tensor(block_ids[gid], dtype=torch.long), block_size)

    def gauges(self) -> dict[str, int]:
        return {
            "turn_store_entries": len(self.records),
            "turn_store_bytes": sum(r.nbytes for r in self.records.values()),
        }


def _rows(state: Any, layer_idx: int, num_tokens: int) -> int:
    """Rows the layer holds for ``num_tokens`` tokens: a routed stage holds its compacted
    active rows only (deferred tokens are parked, dropped or removed)."""
    k = None if state is None else stage_at(state.stages, layer_idx)
    return num_tokens if k is None else num_tokens - state.deferred[k]


__all__ = ["TurnRecord", "TurnStore"]

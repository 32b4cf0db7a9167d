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
                               forward (worker/step.py, query = its last prompt token)

A record is read-only once saved, so several later turns (branches of one conversation)
can load it. Its bytes belong to this store until the scheduler evicts it.

Devices: a record lives in host memory (pinned where CUDA is available, so the load's
copies back are asynchronous), never on the device: device memory outside vLLM's KV budget
would be unaccounted for, and ``turn_cache_bytes`` is a host budget. ``save`` copies the
pages' rows device -> host; ``load`` writes them back through ``KVPageIO.write``, which
moves them to the cache's device. The parked units handed over by the tier are the pool's
own host tensors already.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from vllm_recroute.kv.pages import KVPageIO
from vllm_recroute.messages import TurnLoad, TurnSave
from vllm_recroute.metrics.accounting import Ledger
from vllm_recroute.routing import stage_at
from vllm_recroute.worker.parking import HandedUnit, ParkingTier, StageUnits
from vllm_recroute.worker.stage_pages import PageRow
from vllm_recroute.worker.state import RouteState, RouteStore

# Where a layer's rows of a request live, from the scheduler's block ids per KV group.
PageLocator = Callable[[int, tuple[tuple[int, ...], ...]], PageRow]
# A request's decode re-route pace (its options' ``reroute_every``), for this step.
Pace = Callable[[str], int]


@dataclass
class TurnRecord:
    """One finished turn's stage KV, in the layout its routing left it."""

    state: RouteState | None  # None: the request was not routed
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: K, V [rows, kv_heads, dim]
    units: dict[int, StageUnits] = field(default_factory=dict)  # stage -> units (no pool)
    # (stage, unit) -> the unit as the pool held it (a state, or K/V), its digest and score
    parked: dict[tuple[int, int], HandedUnit] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Host bytes of the record's K/V (the scheduler's ``turn_cache_bytes`` budget)."""
        pages = sum(t.numel() * t.element_size() for kv in self.kv for t in kv)
        return pages + sum(unit.nbytes for unit in self.parked.values())


class TurnStore:
    """Kept turns of one routed worker, by the scheduler's turn id.

    Collaborators, given at construction: each layer's page I/O, the routing state store,
    the ledger, and the parked tier when there is one (a record then carries the turn's
    units). Given with each step's jobs (``apply``): where a layer's pages are
    (``pages``) and each request's decode re-route pace (``pace``, from its options).
    Without a tier a record holds pages only; the config still asks for ``parked_bytes``
    with ``turn_cache_bytes`` (config.py, docs/configuration.md): a later turn re-routes
    for its own question through the parked units.
    """

    def __init__(
        self,
        io: Sequence[KVPageIO],
        store: RouteStore,
        ledger: Ledger,
        tier: ParkingTier | None = None,
    ) -> None:
        self.io = list(io)
        self.store = store
        self.ledger = ledger
        self.tier = tier
        self.records: dict[int, TurnRecord] = {}
        self._sent: set[str] = set()

    # -- one step's jobs ----------------------------------------------------------------

    def apply(
        self,
        evicted: list[int],
        saves: list[TurnSave],
        loads: list[TurnLoad],
        pages: PageLocator,
        pace: Pace,
    ) -> None:
        for turn_id in evicted:
            self.records.pop(turn_id, None)
        for job in saves:
            self.save(job, pages)
        for job in loads:
            self.load(job, pages, pace)
        self.store.release_held()
        if evicted or saves or loads:
            self.ledger.record(self.gauges(), self._tier_gauges())

    def take_sent(self) -> set[str]:
        """Requests whose pages were copied since the last call (vLLM may free them)."""
        out, self._sent = self._sent, set()
        return out

    # -- save / load ----------------------------------------------------------------------

    def save(self, job: TurnSave, pages: PageLocator) -> None:
        state = self.store.get(job.request_id)  # held since vLLM said it finished
        kv = []
        for i, io in enumerate(self.io):
            page = pages(i, job.block_ids)
            n = _rows(state, i, job.num_tokens)
            if n > page.table.numel() * page.block_size:
                raise RuntimeError(
                    f"vllm-recroute: turn save of {job.request_id}: layer {i} needs {n} rows "
                    f"but the scheduler sent {page.table.numel()} blocks of {page.block_size} "
                    f"(num_tokens {job.num_tokens}, state {state}, blocks per group "
                    f"{[len(g) for g in job.block_ids]})"
                )
            k, v = io.read(page.slots(torch.arange(n)), page.block_size)
            kv.append((_to_host(k), _to_host(v)))
        record = TurnRecord(state, kv)
        if state is not None and self.tier is not None:
            # the pool's tensors are host ones already: the record takes them as they are
            record.units, record.parked = self.tier.take(job.request_id, len(state.stages))
        self.records[job.turn_id] = record
        self._sent.add(job.request_id)
        self.ledger.record({"turn_saves": 1})

    def load(self, job: TurnLoad, pages: PageLocator, pace: Pace) -> None:
        record = self.records.get(job.turn_id)
        if record is None:
            raise RuntimeError(
                f"vllm-recroute: turn {job.turn_id} offered to request {job.request_id} is "
                "not in the worker's turn store (scheduler and worker disagree)"
            )
        for i, (k, v) in enumerate(record.kv):
            # an entry shorter than the record (its prompt alone) loads a prefix of the rows
            end = _rows(record.state, i, job.num_tokens)
            page = pages(i, job.block_ids)
            rows = torch.arange(job.start, end)
            self.io[i].write(k[job.start : end], v[job.start : end], page.slots(rows))
        delta = {"turn_loads": 1, "turn_loaded_tokens": job.num_tokens - job.start}
        state = record.state
        if state is not None:
            every = pace(job.request_id)
            self.store.put(job.request_id, RouteState(state.stages, state.deferred, every))
            if self.tier is not None:
                delta.update(self.tier.adopt(job.request_id, record.units, record.parked))
            if record.parked:
                self.store.request_reroute(job.request_id)
        self.ledger.record(delta, self._tier_gauges())

    # -- helpers --------------------------------------------------------------------------

    def gauges(self) -> dict[str, int]:
        return {
            "turn_store_entries": len(self.records),
            "turn_store_bytes": sum(r.nbytes for r in self.records.values()),
        }

    def _tier_gauges(self) -> dict[str, int]:
        return {} if self.tier is None else self.tier.gauges()


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """``t`` in host memory: a host tensor as it is (``KVPageIO.read`` gathers a fresh one,
    the pool hands over its own), a device one copied into pinned memory where CUDA is
    available. The copy is synchronous: the pages are freed once this step's saves ran."""
    if t.device.type == "cpu":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=torch.cuda.is_available())
    out.copy_(t)
    return out


def _rows(state: RouteState | None, layer_idx: int, num_tokens: int) -> int:
    """Rows the layer holds for ``num_tokens`` tokens: a routed stage holds its compacted
    active rows only (deferred tokens are parked, dropped or removed)."""
    k = None if state is None else stage_at(state.stages, layer_idx)
    return num_tokens if k is None else num_tokens - state.deferred[k]


__all__ = ["TurnRecord", "TurnStore"]

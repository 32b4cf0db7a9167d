"""Parked tier, worker side: deferred visual units in a host pool, swapped back at decode.

Where this sits in a routed prefill and in the decode steps after it (one request, one
routing stage with layers [s, e), unit = ``park_block_tokens`` visual tokens):

    prefill, at layer s (before it runs)
      every visual token ──► its key at layer s (one projection): one digest per unit
      active visual tokens ──► stage pages (compacted positions), as without the tier
      deferred visual tokens ─► their stage-entry state (hidden + residual, positions)
                               ──► ParkedPool (one host copy); no K/V computed
    decode step i with i % reroute_every == 0, at layer s (before it runs)
      score q_i against every unit's digest (routing/rerouting.py)
      for each swap (evict active A, restore parked R):
          pages[A's slots] ──read──► pool (A parked as its K/V)
          pool (R) ──► K/V for layers s..e-1 (a state: input norm, K/V projection and RoPE
                       at its original positions) ──write──► pages[A's slots]

A deferred token skips its whole stage, so its state is the same at every layer of the
stage and every K/V the stage would cache for it is a function of it: parking it costs
``hidden`` values instead of ``2 * kv_heads * head_dim * (e - s)``, and K/V are computed
only for the few units a re-route restores. A unit that ran the stage (an evicted active
one) parks as its K/V: its stage-entry state was never kept.

The stage's active count never changes, so no page is allocated or freed and the
scheduler is not involved: the swap happens inside the pages the request already holds.
Keys are cached after RoPE at their original positions, so a restored unit attends
correctly from any slot. Ownership: the pool's bytes belong to this worker process; a
unit is either in the pool or in pages, never both. A unit the full pool drops is a
removed token from then on (counted). Finish / abort / preemption free every pool entry of
the request (``forget``); a preempted request re-routes and re-parks when it runs again.

Tensor parallelism: the hidden state is replicated on every rank (after the all-reduce),
and each rank's layers project only its own KV-head shard. Each rank keeps the whole state
of its parked units and projects its shard at restore: sharding the state by channel
would need an all-gather before every restore's projection (a collective inside a
re-route, on every rank), to save bytes the state form has already cut about five-fold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from vllm_recroute.config import RoutingConfig
from vllm_recroute.kv.pages import KVPageIO
from vllm_recroute.kv.parked_pool import Parked, ParkedKey, ParkedPool, ParkedState
from vllm_recroute.routing.rerouting import chunk_units, plan_swaps, unit_scores
from vllm_recroute.worker.compaction import take_positions
from vllm_recroute.worker.projections import Projections
from vllm_recroute.worker.stage_pages import PageRow, read_stage, restored_kv


@dataclass(frozen=True)
class HandedUnit:
    """A parked unit out of the pool, for a kept turn (worker/turns.py): its payload in
    the form it was parked, its digest and score. Host tensors only."""

    payload: Parked
    digest: torch.Tensor
    score: float

    @property
    def nbytes(self) -> int:
        return self.payload.nbytes + self.digest.numel() * self.digest.element_size()


@dataclass(frozen=True, eq=False)
class DueReroute:
    """One request's re-route at a stage-start layer: its query ``q`` ``[heads, dim]``
    (host) and, per layer of the stage, where its compacted positions live."""

    req_id: str
    k: int
    q: torch.Tensor
    scale: float
    pages: list[PageRow]


@dataclass(frozen=True, eq=False)
class Restore:
    """A unit out of the pool whose K/V are not yet in the pages: its payload and, per
    layer of its stage, the slots it takes (on the cache's device)."""

    payload: Parked
    slots: tuple[torch.Tensor, ...]


@dataclass
class StageUnits:
    """One request's units at one routing stage (index ``k`` of its stages)."""

    start: int  # first layer of the stage
    end: int
    active: dict[int, torch.Tensor] = field(default_factory=dict)  # uid -> compacted positions
    digests: dict[int, torch.Tensor] = field(default_factory=dict)  # uid -> [kv_heads, dim]
    sizes: dict[int, int] = field(default_factory=dict)  # uid -> tokens (all units)
    parked: set[int] = field(default_factory=set)  # uids stored in the pool


class ParkingTier:
    """The pool, the units of every request, and the park / swap operations."""

    def __init__(
        self,
        cfg: RoutingConfig,
        proj: Projections,
        io: Sequence[KVPageIO],
        head_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.cfg = cfg
        self.proj = proj  # the decoder layers' projections (keys, K/V; no queries)
        self.io = list(io)  # per layer: the runtime's page I/O (page_io)
        # tensor parallelism: unit scores are head means over this rank's shard; the mean
        # over ranks makes every rank plan the same swaps (worker/tp.py)
        self.head_mean = head_mean or (lambda scores: scores)
        # host memory, pinned on a GPU host so restores copy asynchronously (the device rule)
        self.pool = ParkedPool(
            cfg.parked_bytes, cfg.park_format, pin_memory=torch.cuda.is_available()
        )
        self.units: dict[tuple[str, int], StageUnits] = {}
        self._reported = (-1, -1)

    # -- prefill ------------------------------------------------------------------------

    def park_prefill(
        self,
        req_id: str,
        k: int,
        start: int,
        end: int,
        positions: torch.Tensor,
        x: torch.Tensor,
        mask: torch.Tensor,
        cpos: torch.Tensor,
        scores: torch.Tensor,
    ) -> dict[str, int]:
        """Park the stage's deferred units and remember its active ones.

        ``positions``/``x``: the request's visual tokens (original positions, residual
        stream at the stage's first layer); ``mask``: active at this stage; ``cpos``:
        compacted positions of the visual tokens (meaningful for active ones); ``scores``:
        the router's scores (order in which a full pool drops units).

        A deferred unit parks as its stage-entry state (``ParkedState``): it skips the whole
        stage, so that state determines every K/V the stage would cache for it, and K/V are
        projected only for the units a re-route restores. Keys are projected once, at
        layer ``start``, for every visual row: the digests of all units (one host copy).
        """
        u = self.cfg.park_block_tokens
        units = StageUnits(start, end)
        self.units[(req_id, k)] = units  # before parking: a full pool may drop our own units
        active_idx = torch.nonzero(mask).flatten()  # host, as mask (the device rule)
        deferred_idx = torch.nonzero(~mask).flatten()
        active = chunk_units(active_idx, u)
        deferred = chunk_units(deferred_idx, u)
        digests = self._digests(start, positions, x, active + deferred)
        for uid, idx in enumerate(active):
            units.active[uid] = cpos[idx]
            units.digests[uid] = digests[uid]
            units.sizes[uid] = int(idx.numel())
        delta = {"parked_blocks": 0, "parked_blocks_dropped": 0}
        if not deferred:  # e.g. keep = 1.0: nothing to park
            return delta
        rows = deferred_idx.to(x.device, non_blocking=True)
        host_x = x[rows].cpu()  # one copy for every deferred unit's state
        host_pos = take_positions(positions, rows).cpu()
        # one device->host copy for every unit's score, as for the states
        unit_score = torch.stack([scores[idx.to(scores.device)].float().mean() for idx in deferred])
        lo = 0
        for uid, idx, score in zip(
            range(len(active), len(active) + len(deferred)),
            deferred,
            unit_score.tolist(),
            strict=True,
        ):
            n = int(idx.numel())
            units.sizes[uid] = n
            state = ParkedState(host_x[lo : lo + n], host_pos[..., lo : lo + n])
            key = ParkedKey(req_id, k, uid)
            self._admitted(key, self.pool.park_state(key, state, digests[uid], score), delta)
            lo += n
        return delta

    def _digests(self, layer: int, positions, x, chunks: list[torch.Tensor]) -> torch.Tensor:
        """``[units, kv_heads, dim]`` host float32: each unit's mean post-RoPE key at
        ``layer`` (chunks index the visual rows), projected once, one copy back."""
        if not chunks:
            return torch.empty(0, device="cpu")  # host, as the digests (the device rule)
        rows = torch.cat(chunks).to(x.device, non_blocking=True)
        keys = self.proj.keys(layer, take_positions(positions, rows), x[rows])
        sizes = [int(c.numel()) for c in chunks]
        return torch.stack([part.float().mean(0) for part in keys.split(sizes)]).cpu()

    # -- decode -------------------------------------------------------------------------

    def due(self, output_index: int, every: int) -> bool:
        """Whether the decode step producing output ``output_index`` re-routes (the
        request's own ``reroute_every``; 0 = never)."""
        return every > 0 and output_index > 0 and output_index % every == 0

    def reroute(
        self,
        req_id: str,
        k: int,
        q: torch.Tensor,
        scale: float,
        pages: list[PageRow],
    ) -> dict[str, int]:
        """Swap units so the stage's active set is the best for query ``q`` (one request:
        ``reroute_all``)."""
        return self.reroute_all([DueReroute(req_id, k, q, scale, pages)])

    def reroute_all(self, due: Sequence[DueReroute]) -> dict[str, int]:
        """Every re-route due at one stage-start layer of a step, in order. The pool's
        side runs request by request, as if each re-routed alone (plan from the pool as
        the earlier ones left it, restore, park the evicted, drops included); the K/V of
        every restored unit is projected and written at the end, one projection and one
        write per stage layer for all of them (per request, the projections of a few
        rows each were the re-route step's largest cost)."""
        delta = {"restored_blocks": 0, "parked_blocks": 0, "parked_blocks_dropped": 0}
        pending: dict[tuple[int, int], list[Restore]] = {}
        for job in due:
            units = self.units.get((job.req_id, job.k))
            plan = None if units is None else self._plan(job, units)
            if plan:
                restores = self._swap_pool(job.req_id, job.k, units, *plan, job.pages, delta)
                pending.setdefault((units.start, units.end), []).extend(restores)
        for span, restores in pending.items():
            self._write_restored(span, restores)
        return delta

    def _plan(self, job: DueReroute, units: StageUnits):
        """``(swaps, scores)`` of one request's stage for its query, or None."""
        if not units.parked:
            return None
        full = self.cfg.park_block_tokens
        act = [uid for uid in units.active if units.sizes[uid] == full]
        par = [uid for uid in sorted(units.parked) if units.sizes[uid] == full]
        if not act or not par:
            return None
        digests = [units.digests[uid] for uid in act]
        digests += [self.pool.digest(ParkedKey(job.req_id, job.k, uid))[0] for uid in par]
        scores = self.head_mean(unit_scores(job.q, torch.stack(digests), job.scale))
        score = dict(zip(act + par, scores.tolist(), strict=True))
        plan = plan_swaps(
            {u: score[u] for u in act}, {u: score[u] for u in par}, self.cfg.reroute_max_swaps
        )
        return (plan, score) if plan else None

    def _swap_all(self, req_id, k, units, plan, score, pages, delta) -> None:
        """One request's swaps, written at once (``reroute_all`` for one request)."""
        restores = self._swap_pool(req_id, k, units, plan, score, pages, delta)
        self._write_restored((units.start, units.end), restores)

    def _swap_pool(self, req_id, k, units, plan, score, pages, delta) -> list[Restore]:
        """The pool's side of one request's swaps: restored units leave the pool, the
        evicted units' K/V are read from the pages (one slot read per layer, one copy to
        the host) and parked. Restores run before parks, so the pool has the restored
        units' room for the evicted ones. Returns what the pages still need: each
        restored unit and, per stage layer, the slots it takes (an evicted unit's)."""
        keys = [ParkedKey(req_id, k, swap.restore) for swap in plan]
        digests = {key.unit: self.pool.digest(key)[0] for key in keys}
        back = [self.pool.restore(key) for key in keys]
        positions = [units.active.pop(swap.evict) for swap in plan]
        sizes = [int(pos.numel()) for pos in positions]
        ios = self._stage_io(units)
        indices, old = read_stage(ios, pages, torch.cat(positions))
        # per layer, each swap's share of the evicted slots (units are equal size)
        slots = [index.slots.split(sizes) for index in indices]
        restores = [
            Restore(payload, tuple(layer[i] for layer in slots)) for i, payload in enumerate(back)
        ]
        # the evicted units' K/V to the host in one copy per re-route
        old_k = torch.stack([kk for kk, _ in old]).cpu().split(sizes, dim=1)
        old_v = torch.stack([vv for _, vv in old]).cpu().split(sizes, dim=1)
        for swap, pos, ek, ev in zip(plan, positions, old_k, old_v, strict=True):
            units.parked.discard(swap.restore)
            units.active[swap.restore] = pos
            units.digests[swap.restore] = digests[swap.restore]
            digest = units.digests.pop(swap.evict)
            delta["restored_blocks"] += 1
            key = ParkedKey(req_id, k, swap.evict)
            dropped = self.pool.park(key, ek, ev, score[swap.evict], digest)
            self._admitted(key, dropped, delta)
        return restores

    def _write_restored(self, span: tuple[int, int], restores: list[Restore]) -> None:
        """K/V of restored units into their slots at every layer of ``span``: a unit
        parked as a state gets its K/V projected here (states first, so each layer's new
        K/V is one projection and one concatenation), a K/V unit is copied; one
        host->device copy each, one backend write per layer."""
        if not restores:
            return
        restores = sorted(restores, key=lambda r: not isinstance(r.payload, ParkedState))
        ios = self.io[span[0] : span[1]]
        layers = range(*span)
        back = [r.payload for r in restores]
        new = restored_kv(self.proj, layers, back, ios[0].cache.device, self.pool.pin_memory)
        for i, (io, (kk, vv)) in enumerate(zip(ios, new, strict=True)):
            io.write(kk, vv, torch.cat([r.slots[i] for r in restores]))

    def _stage_io(self, units: StageUnits) -> list[KVPageIO]:
        return self.io[units.start : units.end]

    def _admitted(self, key: ParkedKey, dropped: list[ParkedKey], delta: dict) -> None:
        """Account one park of a unit of ``self.units[(request, stage)]``: the pool may
        have dropped it or less useful units to make room (each drop counted, never an
        error)."""
        self._apply_drops(dropped, delta)
        if key not in dropped:
            self.units[(key.request_id, key.k)].parked.add(key.unit)
            delta["parked_blocks"] += 1

    def _apply_drops(self, dropped: list[ParkedKey], delta: dict[str, int]) -> None:
        for key in dropped:
            units = self.units.get((key.request_id, key.k))
            if units is not None:
                units.parked.discard(key.unit)
            delta["parked_blocks_dropped"] += 1

    # -- lifecycle ------------------------------------------------------------------------

    def forget(self, req_ids: list[str]) -> dict[str, int]:
        freed = 0
        for req_id in req_ids:
            freed += len(self.pool.free_request(req_id))
        if self.units:
            gone = set(req_ids)
            for key in [key for key in self.units if key[0] in gone]:
                del self.units[key]
        return {"parked_blocks_freed": freed} if freed else {}

    # -- later turns (worker/turns.py) ----------------------------------------------------

    def take(self, req_id: str, num_stages: int) -> tuple[dict, dict]:
        """Hand a finished request's units over (for a kept turn): per stage its units
        without pool entries, and the parked units (``HandedUnit``) leaving the pool."""
        units, parked = {}, {}
        for k in range(num_stages):
            stage_units = self.units.get((req_id, k))
            if stage_units is None:
                continue
            for uid in sorted(stage_units.parked):
                key = ParkedKey(req_id, k, uid)
                digest, score = self.pool.digest(key), self.pool.score(key)
                parked[(k, uid)] = HandedUnit(self.pool.restore(key), digest, score)
            units[k] = replace(stage_units, parked=set())
        return units, parked

    def adopt(self, req_id: str, units: dict, parked: dict) -> dict[str, int]:
        """A kept turn's units become ``req_id``'s (copies: a turn can be loaded again);
        its parked units go back into the pool, in the form they left it, where a full pool
        may drop them."""
        delta = {"parked_blocks": 0, "parked_blocks_dropped": 0}
        for k, stage_units in units.items():
            self.units[(req_id, k)] = replace(
                stage_units,
                active=dict(stage_units.active),
                digests=dict(stage_units.digests),
                parked=set(),
            )
        for (k, uid), unit in parked.items():
            key = ParkedKey(req_id, k, uid)
            self._admitted(key, self._repark(key, unit), delta)
        return delta

    def _repark(self, key: ParkedKey, unit: HandedUnit) -> list[ParkedKey]:
        if isinstance(unit.payload, ParkedState):
            return self.pool.park_state(key, unit.payload, unit.digest[0], unit.score)
        return self.pool.park(key, *unit.payload, unit.score, unit.digest[0])

    def gauges(self) -> dict[str, int]:
        """Pool fill, only when it changed since the last call (keeps stats sparse)."""
        stats = self.pool.stats()
        now = (stats.num_blocks, stats.used_bytes)
        if now == self._reported:
            return {}
        self._reported = now
        return {"parked_pool_blocks": now[0], "parked_pool_bytes": now[1]}


__all__ = [
    "DueReroute",
    "HandedUnit",
    "ParkingTier",
    "StageUnits",
]

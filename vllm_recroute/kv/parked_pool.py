"""Bounded host-memory pool of parked (deferred) visual units. Pure torch.

One entry = one unit (``park_block_tokens`` visual tokens) of one request at one routing
stage, in one of two forms (``Parked``):

* ``ParkedState(x, positions)``: the unit's stage-entry residual-stream rows ``[tokens,
  hidden]`` (vLLM's fused-norm pair summed) and their original positions. A deferred
  token skips its whole stage, so this one vector determines every K/V the stage's layers
  would cache for it; the worker projects K/V from it only when a re-route restores the
  unit (worker/parking.py). This is how prefill parks deferred units:
  ``hidden`` values instead of ``2 * kv_heads * head_dim * stage_layers``.
* ``ParkedKV(k, v)``: K/V ``[layers, tokens, kv_heads, head_dim]`` (the stage's layers),
  for a unit that ran the stage (an active unit a re-route evicts): its K/V already exist
  in the pages and its stage-entry state was never kept.

The pool keeps a copy (never a view of a device page, which is freed when the unit is
parked), a small per-unit *digest* (mean post-RoPE key at the stage's first layer per head,
float32, ``[1, kv_heads, head_dim]``; a ``ParkedKV``'s is per layer) for re-scoring, and a
usefulness *score*.

Formats (``compress``):

* ``"none"``: the tensors are copied as they are; ``restore`` returns them bit-exactly.
* ``"int8"``: symmetric per-channel int8 over the unit's tokens (one float32 scale per
  hidden channel of a state; per layer, head and channel of K/V). Per element,
  ``|x - restore(x)| <= scale / 2`` with ``scale = max_tokens |x| / 127`` (plus the
  rounding of the cast back to ``x.dtype``). Positions are never compressed.

Capacity is bounded in bytes (payload + scales + positions + digest, all counted). When a
unit does not fit, the least useful entries are dropped (lowest score first, the oldest
first among equal scores) -- but only entries less useful than the incoming unit; if the
incoming unit is itself the least useful, *it* is dropped instead. Dropping is counted,
never an error: a dropped unit becomes a removed token (docs/architecture.md, "Parked
tier").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

__all__ = [
    "Compress",
    "Parked",
    "ParkedKV",
    "ParkedKey",
    "ParkedPool",
    "ParkedPoolStats",
    "ParkedState",
]

Compress = Literal["none", "int8"]
_INT8_MAX = 127.0


class ParkedKV(NamedTuple):
    """K/V of a unit for every layer of its stage, ``[layers, tokens, kv_heads, dim]``."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return _nbytes(self.k, self.v)


class ParkedState(NamedTuple):
    """A unit's stage-entry residual-stream rows ``[tokens, hidden]`` and their original
    positions (``[tokens]``, or ``[3, tokens]`` under M-RoPE)."""

    x: torch.Tensor
    positions: torch.Tensor

    @property
    def nbytes(self) -> int:
        return _nbytes(self.x, self.positions)


Parked = ParkedKV | ParkedState


@dataclass(frozen=True, order=True)
class ParkedKey:
    """Identity of a parked unit: request, the index ``k`` of the routed stage in the
    request's stages (0-based; its stage number is ``routing.spec_stage(k)``), and the unit
    id at that stage (``park_block_tokens`` visual tokens, numbered active units first:
    worker/parking.py)."""

    request_id: str
    k: int
    unit: int


@dataclass(frozen=True)
class ParkedPoolStats:
    capacity_bytes: int
    used_bytes: int
    num_blocks: int
    parks: int  # units stored
    restores: int  # units handed back for re-activation
    drops: int  # units lost to capacity (evicted, or rejected on park)
    discards: int  # units removed on purpose: free_request()


@dataclass
class _Entry:
    kind: type[ParkedKV] | type[ParkedState]
    parts: tuple[torch.Tensor, torch.Tensor]  # (k, v) or (x, positions); int8 codes if scaled
    scales: tuple[torch.Tensor | None, torch.Tensor | None]
    dtype: torch.dtype
    digest: torch.Tensor  # [layers, kv_heads, head_dim] (a state's: [1, ...]), float32
    score: float
    seq: int
    nbytes: int


def _nbytes(*ts: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _quantize(x: torch.Tensor, token_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel symmetric int8 over the token axis."""
    xf = x.detach().to("cpu", torch.float32)
    amax = xf.abs().amax(dim=token_dim, keepdim=True)
    scale = torch.where(amax > 0, amax / _INT8_MAX, torch.ones_like(amax))
    q = torch.round(xf / scale).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return q, scale


def _dequantize(q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    return q if scale is None else (q.to(torch.float32) * scale).to(dtype)


class ParkedPool:
    """Host tier of the parked-unit design. Single-threaded; no vLLM dependency."""

    def __init__(
        self, capacity_bytes: int, compress: Compress = "none", pin_memory: bool = False
    ) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        if compress not in ("none", "int8"):
            raise ValueError(f"compress must be 'none' or 'int8', got {compress!r}")
        self.capacity_bytes = int(capacity_bytes)
        self.compress: Compress = compress
        self.pin_memory = pin_memory
        self._entries: dict[ParkedKey, _Entry] = {}
        self._by_request: dict[str, set[ParkedKey]] = {}
        self._next_seq = 0  # park order, breaks score ties (older is dropped first)
        self.used_bytes = 0
        self.parks = 0
        self.restores = 0
        self.drops = 0
        self.discards = 0

    # ------------------------------------------------------------------ sizing

    def entry_bytes(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """Bytes a unit parked as K/V occupies in this pool (payload, scales, digest)."""
        _check_kv(k, v)
        layers, _, heads, dim = k.shape
        digest = heads * dim * 4  # float32, the stage's first layer (the one scored)
        if self.compress == "none":
            return _nbytes(k, v) + digest
        scales = layers * heads * (dim + v.shape[-1]) * 4  # float32, one per channel
        return k.numel() + v.numel() + scales + digest

    def state_bytes(self, state: ParkedState, digest: torch.Tensor) -> int:
        """Bytes a unit parked as its stage-entry state occupies (payload, scales,
        positions, digest)."""
        x, positions = state
        _check_state(x, positions, digest)
        fixed = _nbytes(positions) + digest.numel() * 4
        if self.compress == "none":
            return _nbytes(x) + fixed
        return x.numel() + x.shape[-1] * 4 + fixed  # int8 codes, one float32 scale a channel

    def _plan(self, key: ParkedKey, nbytes: int, score: float) -> list[ParkedKey] | None:
        """Entries to evict so that ``nbytes`` fit, or None if the unit must be dropped."""
        if nbytes > self.capacity_bytes:
            return None
        free = self.capacity_bytes - self.used_bytes
        old = self._entries.get(key)
        if old is not None:
            free += old.nbytes  # re-parking replaces the old copy
        if nbytes <= free:
            return []
        victims: list[ParkedKey] = []
        incoming = (score, self._next_seq)
        ranked = sorted((e.score, e.seq, k) for k, e in self._entries.items() if k != key)
        for vscore, vseq, vkey in ranked:
            if (vscore, vseq) >= incoming:
                return None
            victims.append(vkey)
            free += self._entries[vkey].nbytes
            if nbytes <= free:
                return victims
        return None

    # ------------------------------------------------------------------ park / restore

    def park(
        self,
        key: ParkedKey,
        k: torch.Tensor,
        v: torch.Tensor,
        score: float,
        digest: torch.Tensor | None = None,
    ) -> list[ParkedKey]:
        """Store a copy of a unit's K/V. ``digest``: its mean key at the stage's first layer
        ``[kv_heads, head_dim]`` when the caller has it (a re-route's evicted unit), else
        computed from ``k[0]``. Returns the keys dropped to make room, or ``[key]`` when
        the unit itself is dropped (too big, or least useful)."""
        nbytes = self.entry_bytes(k, v)
        if digest is None:
            digest = k[0].detach().to("cpu", torch.float32).mean(dim=0)
        digest = digest.detach().to("cpu", torch.float32)[None]
        return self._admit(key, nbytes, float(score), lambda: self._store_kv(k, v, digest))

    def park_state(
        self, key: ParkedKey, state: ParkedState, digest: torch.Tensor, score: float
    ) -> list[ParkedKey]:
        """Store a copy of a unit's stage-entry state; ``digest``: its mean post-RoPE key
        at the stage's first layer, ``[kv_heads, head_dim]``. Returns as ``park``."""
        nbytes = self.state_bytes(state, digest)
        digest = digest.detach().to("cpu", torch.float32)[None]
        return self._admit(key, nbytes, float(score), lambda: self._store_state(state, digest))

    def restore(self, key: ParkedKey) -> Parked:
        """Hand the unit back (in its original dtype, in the form it was parked) and remove
        it from the pool. Raises ``KeyError`` if it is not parked (dropped units cannot be
        restored)."""
        entry = self._entries[key]
        self._remove(key)
        self.restores += 1
        a, b = (
            _dequantize(p, s, entry.dtype) for p, s in zip(entry.parts, entry.scales, strict=True)
        )
        return entry.kind(a, b)

    def free_request(self, request_id: str) -> list[ParkedKey]:
        """Finish / abort / preemption: discard every unit of the request."""
        keys = sorted(self._by_request.get(request_id, ()))
        for key in keys:
            self._remove(key)
        self.discards += len(keys)
        return keys

    # ------------------------------------------------------------------ scoring support

    def digest(self, key: ParkedKey) -> torch.Tensor:
        """Mean post-RoPE key of the unit at its stage's first layer, per head,
        ``[1, kv_heads, head_dim]`` float32 (what a re-route scores; either form)."""
        return self._entries[key].digest

    def score(self, key: ParkedKey) -> float:
        return self._entries[key].score

    def keys(self, request_id: str | None = None) -> list[ParkedKey]:
        if request_id is None:
            return sorted(self._entries)
        return sorted(self._by_request.get(request_id, ()))

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> ParkedPoolStats:
        return ParkedPoolStats(
            capacity_bytes=self.capacity_bytes,
            used_bytes=self.used_bytes,
            num_blocks=len(self._entries),
            parks=self.parks,
            restores=self.restores,
            drops=self.drops,
            discards=self.discards,
        )

    # ------------------------------------------------------------------ internals

    def _admit(self, key: ParkedKey, nbytes: int, score: float, build) -> list[ParkedKey]:
        victims = self._plan(key, nbytes, score)
        if victims is None:
            self.drops += 1
            if key in self._entries:  # a failed re-park loses the stale copy as well
                self._remove(key)
            return [key]
        for vkey in victims:
            self._remove(vkey)
        self.drops += len(victims)
        if key in self._entries:
            self._remove(key)
        entry = build()
        entry.score, entry.seq, entry.nbytes = score, self._next_seq, nbytes
        self._next_seq += 1
        self._entries[key] = entry
        self._by_request.setdefault(key.request_id, set()).add(key)
        self.used_bytes += nbytes
        self.parks += 1
        return victims

    def _copy(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=self.pin_memory)
        out.copy_(x.detach())
        return out

    def _entry(self, kind, parts, scales, dtype, digest) -> _Entry:
        return _Entry(kind, parts, scales, dtype, digest, 0.0, 0, 0)  # _admit sets the rest

    def _store_kv(self, k: torch.Tensor, v: torch.Tensor, digest: torch.Tensor) -> _Entry:
        if self.compress == "none":
            return self._entry(
                ParkedKV, (self._copy(k), self._copy(v)), (None, None), k.dtype, digest
            )
        (kq, ks), (vq, vs) = _quantize(k, 1), _quantize(v, 1)
        return self._entry(ParkedKV, (kq, vq), (ks, vs), k.dtype, digest)

    def _store_state(self, state: ParkedState, digest: torch.Tensor) -> _Entry:
        x, positions = state
        pos = self._copy(positions)
        if self.compress == "none":
            return self._entry(ParkedState, (self._copy(x), pos), (None, None), x.dtype, digest)
        xq, xs = _quantize(x, 0)
        return self._entry(ParkedState, (xq, pos), (xs, None), x.dtype, digest)

    def _remove(self, key: ParkedKey) -> None:
        entry = self._entries.pop(key)
        self.used_bytes -= entry.nbytes
        keys = self._by_request[key.request_id]
        keys.discard(key)
        if not keys:
            del self._by_request[key.request_id]


def _check_kv(k: torch.Tensor, v: torch.Tensor) -> None:
    if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            "k and v must be [layers, tokens, kv_heads, head_dim] with equal leading "
            f"dims, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.dtype != v.dtype:
        raise ValueError(f"k and v dtypes differ: {k.dtype} vs {v.dtype}")


def _check_state(x: torch.Tensor, positions: torch.Tensor, digest: torch.Tensor) -> None:
    if x.dim() != 2 or positions.dim() not in (1, 2) or positions.shape[-1] != x.shape[0]:
        raise ValueError(
            "a parked state is x [tokens, hidden] and positions [tokens] or [3, tokens], "
            f"got {tuple(x.shape)} and {tuple(positions.shape)}"
        )
    if digest.dim() != 2:
        raise ValueError(f"a state's digest is [kv_heads, head_dim], got {tuple(digest.shape)}")

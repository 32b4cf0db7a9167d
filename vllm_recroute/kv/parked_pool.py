"""Bounded host-memory pool for the K/V of parked (deferred) visual blocks. Pure torch.

One entry = one KV block of one request at one routing stage: ``k`` and ``v`` of shape
``[layers, tokens, kv_heads, head_dim]`` (the stage's layers, the block's tokens). The pool
keeps a copy (never a view of a device page, which is freed when the block is parked), a
small per-block *digest* (mean key per layer and head, float32) for later re-scoring, and
a usefulness *score*.

Formats (``compress``):

* ``"none"``: the tensors are copied as they are; ``restore`` returns them bit-exactly.
* ``"int8"``: symmetric per-channel int8 (one float32 scale per layer, head and channel,
  over the block's tokens). Per element, ``|x - restore(x)| <= scale / 2`` with
  ``scale = max_tokens |x| / 127`` (plus the rounding of the cast back to ``x.dtype``).

Capacity is bounded in bytes (payload + scales + digest, all counted). When a block does
not fit, the least useful entries are dropped (lowest score first, the oldest first among
equal scores) -- but only entries less useful than the incoming block; if the incoming
block is itself the least useful, *it* is dropped instead. Dropping is counted, never an
error: a dropped block becomes a removed token (docs/architecture.md, "Parked tier").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["Compress", "ParkedKey", "ParkedPool", "ParkedPoolStats"]

Compress = Literal["none", "int8"]
_INT8_MAX = 127.0


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
    parks: int  # blocks stored
    restores: int  # blocks handed back for re-activation
    drops: int  # blocks lost to capacity (evicted, or rejected on park)
    discards: int  # blocks removed on purpose: free_request()


@dataclass
class _Entry:
    k: torch.Tensor  # raw copy, or int8 codes
    v: torch.Tensor
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None
    dtype: torch.dtype
    digest: torch.Tensor  # [layers, kv_heads, head_dim], float32
    score: float
    seq: int
    nbytes: int


def _nbytes(*ts: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel symmetric int8 over the token axis (dim 1)."""
    xf = x.detach().to("cpu", torch.float32)
    amax = xf.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / _INT8_MAX, torch.ones_like(amax))
    q = torch.round(xf / scale).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return q, scale


def _dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(torch.float32) * scale).to(dtype)


class ParkedPool:
    """Host tier of the parked-block design. Single-threaded; no vLLM dependency."""

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
        """Bytes a block with these tensors occupies in this pool (payload, scales,
        digest)."""
        self._check(k, v)
        layers, _, heads, dim = k.shape
        digest = layers * heads * dim * 4
        if self.compress == "none":
            return _nbytes(k, v) + digest
        scales = layers * heads * (dim + v.shape[-1]) * 4  # float32, one per channel
        return k.numel() + v.numel() + scales + digest

    def _plan(self, key: ParkedKey, nbytes: int, score: float) -> list[ParkedKey] | None:
        """Entries to evict so that ``nbytes`` fit, or None if the block must be dropped."""
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
        self, key: ParkedKey, k: torch.Tensor, v: torch.Tensor, score: float
    ) -> list[ParkedKey]:
        """Store a copy of the block. Returns the keys dropped to make room, or
        ``[key]`` when the block itself is dropped (too big, or least useful)."""
        nbytes = self.entry_bytes(k, v)
        victims = self._plan(key, nbytes, float(score))
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
        self._entries[key] = self._store(k, v, float(score), nbytes)
        self._by_request.setdefault(key.request_id, set()).add(key)
        self.used_bytes += nbytes
        self.parks += 1
        return victims

    def restore(self, key: ParkedKey) -> tuple[torch.Tensor, torch.Tensor]:
        """Hand the block back (in its original dtype) and remove it from the pool.
        Raises ``KeyError`` if it is not parked (dropped blocks cannot be restored)."""
        entry = self._entries[key]
        self._remove(key)
        self.restores += 1
        if entry.k_scale is None:
            return entry.k, entry.v
        assert entry.v_scale is not None
        return (
            _dequantize(entry.k, entry.k_scale, entry.dtype),
            _dequantize(entry.v, entry.v_scale, entry.dtype),
        )

    def free_request(self, request_id: str) -> list[ParkedKey]:
        """Finish / abort / preemption: discard every block of the request."""
        keys = sorted(self._by_request.get(request_id, ()))
        for key in keys:
            self._remove(key)
        self.discards += len(keys)
        return keys

    # ------------------------------------------------------------------ scoring support

    def digest(self, key: ParkedKey) -> torch.Tensor:
        """Mean key of the block per layer and head, ``[layers, kv_heads, head_dim]``."""
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

    @staticmethod
    def _check(k: torch.Tensor, v: torch.Tensor) -> None:
        if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
            raise ValueError(
                "k and v must be [layers, tokens, kv_heads, head_dim] with equal leading "
                f"dims, got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        if k.dtype != v.dtype:
            raise ValueError(f"k and v dtypes differ: {k.dtype} vs {v.dtype}")

    def _copy(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=self.pin_memory)
        out.copy_(x.detach())
        return out

    def _store(self, k: torch.Tensor, v: torch.Tensor, score: float, nbytes: int) -> _Entry:
        digest = k.detach().to("cpu", torch.float32).mean(dim=1)
        seq = self._next_seq
        self._next_seq += 1
        if self.compress == "none":
            return _Entry(
                self._copy(k), self._copy(v), None, None, k.dtype, digest, score, seq, nbytes
            )
        kq, ks = _quantize(k)
        vq, vs = _quantize(v)
        return _Entry(kq, vq, ks, vs, k.dtype, digest, score, seq, nbytes)

    def _remove(self, key: ParkedKey) -> None:
        entry = self._entries.pop(key)
        self.used_bytes -= entry.nbytes
        keys = self._by_request[key.request_id]
        keys.discard(key)
        if not keys:
            del self._by_request[key.request_id]

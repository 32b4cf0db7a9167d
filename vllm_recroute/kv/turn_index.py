"""Scheduler side of later-turn restore: which finished turns' stage KV the worker holds.

A conversation's turn 2 prompt starts with turn 1's prompt and answer. When turn 1
finishes, the connector asks this index whether to keep its stage KV (pages of every
layer, in the stage layout turn 1 used, plus its parked units); the worker copies it to
its host store (worker/turns.py) and only then are turn 1's pages freed. When a new
request arrives, the index finds the longest kept turn whose tokens are a prefix of the
request's: those tokens are offered to vLLM as externally computed.

Matching is exact: the key is vLLM's chained block hash of the kept range's last full
block (it covers every earlier token and image), the tokens of the partial block after it,
the images that start in that tail, the request's routing options (the stage layout
depends on them) and its ``cache_salt``. The salt is what isolates tenants in vLLM's
prefix cache; vLLM folds it into the first block's hash only, so a turn shorter than a
block would otherwise be keyed by its tokens alone and served to any tenant. It is part of
every key: a turn kept under one salt is never loaded by a request with another or none.
The scheduler alone decides what is kept and what is evicted (LRU by bytes); the worker
follows its decisions, so both sides always agree.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

# TurnSave / TurnLoad are scheduler -> worker messages (vllm_recroute/messages.py), named
# here too for worker/turns.py.
from vllm_recroute.messages import TurnLoad, TurnSave

__all__ = ["TurnIndex", "TurnKey", "TurnLoad", "TurnRequest", "TurnSave"]

TurnKey = Hashable


@dataclass(frozen=True)
class TurnRequest:
    """What the index needs to know of a request (built from vLLM's ``Request``)."""

    token_ids: Sequence[int]
    block_hashes: Sequence[Hashable]  # vLLM's chained hashes of the full blocks
    images: tuple[tuple[int, int, str], ...]  # (offset, length, identifier), by offset
    routing: Hashable  # routing options that shape the stage layout
    salt: str | None = None  # vLLM's cache_salt: the tenant; None matches only None


class TurnIndex:
    """Kept turns, least recently used first, within ``capacity_bytes``.

    A turn is kept once (its KV for ``num_tokens`` tokens) and can be entered at several
    lengths: all its computed tokens (the next prompt repeats the answer token for token)
    and its prompt alone (a chat template that re-renders the answer differently still
    starts with the earlier prompt). Loading a shorter entry takes a prefix of the rows.
    """

    def __init__(self, capacity_bytes: int, block_size: int, bytes_per_token: int) -> None:
        if block_size <= 0 or bytes_per_token <= 0:
            raise ValueError("block_size and bytes_per_token must be > 0")
        self.capacity_bytes = capacity_bytes
        self.block_size = block_size
        self.bytes_per_token = bytes_per_token
        self._turns: OrderedDict[int, tuple[int, list[TurnKey]]] = OrderedDict()  # LRU
        self._keys: dict[TurnKey, tuple[int, int]] = {}  # key -> (turn id, length)
        self._lengths: dict[int, int] = {}  # entry length -> number of keys
        self._next_id = 0
        self.used_bytes = 0

    def key(self, req: TurnRequest, num_tokens: int) -> TurnKey | None:
        """Key of the request's first ``num_tokens`` tokens (None: not keyable)."""
        full = num_tokens // self.block_size
        if len(req.block_hashes) < full or num_tokens > len(req.token_ids):
            return None
        tail_start = full * self.block_size
        tail = tuple(req.token_ids[tail_start:num_tokens])
        tail_images = tuple(
            im for im in req.images if im[0] + im[1] > tail_start and im[0] < num_tokens
        )
        head = req.block_hashes[full - 1] if full else None  # shorter than one block
        return (num_tokens, head, tail, tail_images, req.routing, req.salt)

    # -- keep (pair) --------------------------------------------------------------------

    def can_keep(self, req: TurnRequest, num_tokens: int) -> bool:
        """Worth keeping: whole images inside the range, fits the store, not kept yet."""
        if not req.images or any(off + n > num_tokens for off, n, _ in req.images):
            return False
        key = self.key(req, num_tokens)
        return (
            key is not None
            and key not in self._keys
            and self.nbytes(num_tokens) <= self.capacity_bytes
        )

    def keep(
        self, req: TurnRequest, num_tokens: int, also_at: tuple[int, ...] = ()
    ) -> tuple[int, list[int]]:
        """Record the turn, enterable at ``num_tokens`` and at the ``also_at`` lengths
        that hold every image; returns its id and the ids evicted to make room."""
        if not self.can_keep(req, num_tokens):
            raise ValueError("turn cannot be kept (check can_keep first)")
        nbytes = self.nbytes(num_tokens)
        evicted = []
        while self.used_bytes + nbytes > self.capacity_bytes:
            evicted.append(self._evict_oldest())
        turn_id, self._next_id = self._next_id, self._next_id + 1
        keys = []
        for length in sorted({num_tokens, *(n for n in also_at if n < num_tokens)}):
            key = self.key(req, length)
            whole = all(off + n <= length for off, n, _ in req.images)
            if key is None or not whole or key in self._keys:
                continue
            keys.append(key)
            self._keys[key] = (turn_id, length)
            self._lengths[length] = self._lengths.get(length, 0) + 1
        self._turns[turn_id] = (nbytes, keys)
        self.used_bytes += nbytes
        return turn_id, evicted

    # -- lookup -------------------------------------------------------------------------

    def match(self, req: TurnRequest, max_tokens: int) -> tuple[int, int] | None:
        """The longest kept entry that is a prefix of the request's first ``max_tokens``
        tokens, as (turn id, length); its turn becomes the most recently used."""
        for length in sorted(self._lengths, reverse=True):
            if length > max_tokens:
                continue
            hit = self._keys.get(self.key(req, length))
            if hit is not None:
                self._turns.move_to_end(hit[0])
                return hit
        return None

    def nbytes(self, num_tokens: int) -> int:
        # Upper bound of what the worker holds: every token's K/V at every layer, either in
        # the copied pages or among the parked units (dropped units hold nothing).
        return num_tokens * self.bytes_per_token

    def __len__(self) -> int:
        return len(self._turns)

    def _evict_oldest(self) -> int:
        turn_id, (nbytes, keys) = self._turns.popitem(last=False)
        self.used_bytes -= nbytes
        for key in keys:
            _, length = self._keys.pop(key)
            self._lengths[length] -= 1
            if self._lengths[length] == 0:
                del self._lengths[length]
        return turn_id

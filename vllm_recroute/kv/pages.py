"""Read and write single token slots of a layer's paged KV cache, for any backend.

Writing goes through the attention backend's own ``do_kv_cache_update`` (the op vLLM uses
for every new token), so the bytes land in whatever layout the kernel expects. Reading has
no backend API, and layouts differ: vLLM's CPU backend packs keys inside a block (values
stay plain); FlashAttention uses ``[2, blocks, block_size, heads, dim]``. So the layout of
one block is *measured* once per (cache shape, dtype): the backend writes a probe whose
every element encodes its own (token, head, dim) index into a one-block scratch cache, and
the resulting permutation becomes a gather index. A layout that is not a permutation of the
written elements (e.g. quantized pages) is refused with an error, never read wrongly.

    real cache (block dim = the dim of size num_blocks)       one block, flattened
    ┌────────┬────────┬────────┐  select(block_dim, b)        [ k k v k v ... ]
    │ blk 0  │ blk 1  │ ...    │  ────────────────────►       gather(key_index[off])  -> K [H, D]
    └────────┴────────┴────────┘                              gather(value_index[off]) -> V [H, D]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["BlockLayout", "KVPageIO"]

# Digits small enough to be exact in every float KV dtype (bf16 holds integers <= 256).
_BASE = 128


@dataclass(frozen=True)
class BlockLayout:
    """Where each (token offset, head, dim) of K and of V sits in a flattened block."""

    block_dim: int
    key_index: torch.Tensor  # long [block_size, heads, dim]
    value_index: torch.Tensor  # long [block_size, heads, dim]


class KVPageIO:
    """Slot reads and writes for the KV cache of one attention layer."""

    def __init__(self, attn_layer: Any, num_kv_heads: int, head_dim: int) -> None:
        self.attn = attn_layer
        self.heads = num_kv_heads
        self.dim = head_dim
        self._layout: BlockLayout | None = None
        self._shape: tuple[int, ...] | None = None

    @property
    def cache(self) -> torch.Tensor:
        return self.attn.kv_cache

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store ``k``/``v`` ``[n, heads, dim]`` at flat slots ``[n]`` (block * B + offset)."""
        cache = self.cache
        self.attn.impl.do_kv_cache_update(
            self.attn, k.to(cache.dtype), v.to(cache.dtype), cache, slots.to(cache.device)
        )

    def read(self, slots: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[n, heads, dim]`` held at flat slots ``[n]``."""
        cache = self.cache
        layout = self.layout(block_size)
        n = len(slots)
        per_block = cache.movedim(layout.block_dim, 0)  # a view when the block dim is first
        flat = per_block.reshape(-1)
        # element index = block * (elements per block) + in-block position of (slot, h, d):
        # gathers exactly the slots' elements, never whole blocks
        base = (slots // block_size).to(cache.device) * (flat.numel() // per_block.shape[0])
        offsets = (slots % block_size).to(cache.device)
        kidx = base[:, None] + layout.key_index.to(cache.device)[offsets].reshape(n, -1)
        vidx = base[:, None] + layout.value_index.to(cache.device)[offsets].reshape(n, -1)
        shape = (n, self.heads, self.dim)
        return flat[kidx].reshape(shape), flat[vidx].reshape(shape)

    def layout(self, block_size: int) -> BlockLayout:
        cache = self.cache
        if self._layout is None or self._shape != tuple(cache.shape):
            self._layout = self._measure(block_size)
            self._shape = tuple(cache.shape)
        return self._layout

    def _measure(self, block_size: int) -> BlockLayout:
        cache = self.cache
        num_blocks = _num_blocks(cache, block_size, self.heads, self.dim)
        dims = [i for i, n in enumerate(cache.shape) if n == num_blocks]
        block_dim = dims[0]
        probe_shape = list(cache.shape)
        probe_shape[block_dim] = 1
        count = block_size * self.heads * self.dim
        idx = torch.arange(count)
        slots = torch.arange(block_size, dtype=torch.long, device=cache.device)
        element = None  # per probe position: index of the K or V element stored there
        kind = None  # per probe position: +1 key, -1 value, 0 untouched
        place = 1
        while True:
            digit = (idx // place) % _BASE + 1  # 1..128, so 0 marks untouched positions
            probe = torch.zeros(probe_shape, dtype=cache.dtype, device=cache.device)
            k = digit.to(cache.dtype).reshape(block_size, self.heads, self.dim)
            self.attn.impl.do_kv_cache_update(self.attn, k, -k, probe, slots)
            flat = probe.reshape(-1).float().cpu()
            if kind is None:
                kind = torch.sign(flat).long()
                element = torch.zeros(flat.numel(), dtype=torch.long)
            element += (flat.abs().long() - 1).clamp(min=0) * place
            place *= _BASE
            if place >= count:
                break
        return _layout_from_probe(block_dim, element, kind, count, block_size, self)


def _layout_from_probe(block_dim, element, kind, count, block_size, io) -> BlockLayout:
    out = []
    for sign in (1, -1):
        pos = torch.nonzero(kind == sign).flatten()
        index = torch.full((count,), -1, dtype=torch.long)
        index[element[pos].clamp(0, count - 1)] = pos
        if pos.numel() != count or bool((index < 0).any()):
            raise RuntimeError(
                f"vllm-recroute parked tier: the {type(io.attn.impl).__name__} KV layout is "
                "not a plain permutation of K/V elements (quantized pages?); set "
                "recroute.parked_bytes to 0"
            )
        out.append(index.reshape(block_size, io.heads, io.dim))
    return BlockLayout(block_dim, out[0], out[1])


def _num_blocks(cache: torch.Tensor, block_size: int, heads: int, dim: int) -> int:
    per_block = 2 * block_size * heads * dim
    if cache.numel() % per_block:
        raise ValueError(
            f"KV cache of shape {tuple(cache.shape)} is not whole blocks of K and V "
            f"({block_size} tokens x {heads} heads x {dim})"
        )
    return cache.numel() // per_block

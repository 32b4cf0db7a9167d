"""Read and write single token slots of a layer's paged KV cache, for any backend.

Writing goes through the attention backend's own ``do_kv_cache_update`` (the op vLLM uses
for every new token), so the bytes land in whatever layout the kernel expects. Reading has
no backend API, and layouts differ: vLLM's CPU backend packs keys inside a block (values
stay plain); FlashAttention reads ``[blocks, heads, block_size, 2 * dim]`` as K and V
halves of the last dim. So the layout of one block is *measured* once per (cache shape,
strides, dtype, device): the backend writes a probe whose every element encodes its own
(token, head, dim) index into a one-block scratch cache, and the resulting permutation
becomes a gather index. A layout that is not a permutation of the written elements (e.g.
quantized pages) is refused with an error, never read wrongly.

The per-layer cache is a *view* of vLLM's one raw allocation, in the stride order of the
resolved KV cache layout (``vllm/v1/kv_cache_interface.py``, ``create_kv_cache_views``).
FlashAttention declares no layout, so it gets the default ``LBNHC`` (physical ``[B, N, H,
C]`` under the logical ``[B, H, N, C]`` view): not contiguous once ``num_kv_heads > 1``,
and no layer-interleaved (``BL..``) layout is ever contiguous. Flattening such a view
copies the whole layer; so reads never flatten the cache: the probe's positions become
storage offsets through the real cache's strides, and the gather runs on a 1-D
``as_strided`` view of the layer's storage span, touching only the slots' elements.
A read gathers runs of adjacent elements, not single elements: the layout records, for K
and for V, the longest common run within a token's ``heads * dim`` values (FlashAttention:
``dim``; the CPU backend: ``dim`` for V, 1 for its transposed K) and the gather takes rows
of an overlapping ``[span - run + 1, run]`` view with one 1-D ``index_select`` (an index
per run; on the CPU 2-6x faster than advanced indexing per element, and one kernel on a
GPU).

Devices: K/V, slots and the gather index live on the cache's device; inputs are moved there
explicitly (asynchronously from pinned host memory), and reads come back on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["BlockLayout", "KVPageIO", "SlotIndex"]

# Digits small enough to be exact in every float KV dtype (bf16 holds integers <= 256).
_BASE = 128


@dataclass(frozen=True)
class BlockLayout:
    """Where each (token offset, head, dim) of K and of V sits in the real cache, as runs of
    adjacent elements: storage offsets (in elements) from the start of the block, on the
    cache's device."""

    block_dim: int
    block_stride: int  # elements from block b to block b + 1
    # adjacent elements per run of a token's (heads * dim) K values, and V values
    key_run: int
    value_run: int
    # each run's first element: long [block_size, heads * dim // run]
    key_start: torch.Tensor
    value_start: torch.Tensor


@dataclass(frozen=True)
class SlotIndex:
    """Where ``n`` slots sit in any cache of one layout (``layout``: its key): the K and V
    run indices a read gathers. Layers of one KV group share their slots and, in vLLM, their
    layout, so one index serves a whole stage's reads (``KVPageIO.read_at``)."""

    layout: tuple
    slots: torch.Tensor  # long [n], on the cache's device (a write's slots, too)
    key: torch.Tensor  # long [n * runs per token], on the cache's device
    value: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.slots.numel())


class KVPageIO:
    """Slot reads and writes for the KV cache of one attention layer."""

    def __init__(self, attn_layer: Any, num_kv_heads: int, head_dim: int) -> None:
        self.attn = attn_layer
        self.heads = num_kv_heads
        self.dim = head_dim
        self._layout: BlockLayout | None = None
        self._key: tuple | None = None

    @property
    def cache(self) -> torch.Tensor:
        return self.attn.kv_cache

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store ``k``/``v`` ``[n, heads, dim]`` at flat slots ``[n]`` (block * B + offset);
        host inputs are copied to the cache's device first."""
        cache = self.cache
        dev = cache.device
        self.attn.impl.do_kv_cache_update(
            self.attn,
            _onto(k, dev, cache.dtype),
            _onto(v, dev, cache.dtype),
            cache,
            _onto(slots, dev),
        )

    def read(self, slots: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[n, heads, dim]`` held at flat slots ``[n]``, on the cache's device."""
        return self.read_at(self.index(slots, block_size))

    def index(self, slots: torch.Tensor, block_size: int) -> SlotIndex:
        """The run indices of flat slots ``[n]`` in this layer's layout."""
        layout = self.layout(block_size)
        slots = _onto(slots, self.cache.device)
        base = (slots // block_size) * layout.block_stride
        offsets = slots % block_size
        key = _run_index(layout.key_start, offsets, base)
        return SlotIndex(self._key, slots, key, _run_index(layout.value_start, offsets, base))

    def read_at(self, index: SlotIndex) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[n, heads, dim]`` at an index made by a layer of the same layout."""
        layout = self.layout(index.layout[-1])
        if index.layout != self._key:
            raise ValueError(f"a slot index of layout {index.layout} read in {self._key}")
        # a view, never a copy: reshaping a non-contiguous layer view would copy the layer
        flat = self.cache.as_strided((_span(self.cache),), (1,))
        shape = (index.n, self.heads, self.dim)
        k = _gather(flat, layout.key_run, index.key).view(shape)
        return k, _gather(flat, layout.value_run, index.value).view(shape)

    def layout_key(self, block_size: int) -> tuple:
        """What a layout depends on: cache shape, strides, dtype, device, block size."""
        cache = self.cache
        return (tuple(cache.shape), cache.stride(), cache.dtype, str(cache.device), block_size)

    def layout(self, block_size: int) -> BlockLayout:
        key = self.layout_key(block_size)
        if self._layout is None or self._key != key:
            self._layout = self._measure(block_size)
            self._key = key
        return self._layout

    def _measure(self, block_size: int) -> BlockLayout:
        cache = self.cache
        num_blocks = _num_blocks(cache, block_size, self.heads, self.dim)
        block_dim = next(i for i, n in enumerate(cache.shape) if n == num_blocks)
        probe_shape = list(cache.shape)
        probe_shape[block_dim] = 1
        kind, element = self._probe(block_size, probe_shape)
        count = block_size * self.heads * self.dim
        kpos, vpos = _positions_from_probe(element, kind, count, self)
        # probe positions are row-major in probe_shape; the real strides place them
        offsets = _storage_offsets(torch.stack([kpos, vpos]), probe_shape, cache.stride())
        offsets = offsets.reshape(2, block_size, self.heads * self.dim)
        k_run, v_run = _common_run(offsets[0]), _common_run(offsets[1])
        k_start = offsets[0, :, ::k_run].to(cache.device)
        v_start = offsets[1, :, ::v_run].to(cache.device)
        return BlockLayout(block_dim, cache.stride(block_dim), k_run, v_run, k_start, v_start)

    def _probe(self, block_size: int, probe_shape: list[int]) -> tuple[torch.Tensor, ...]:
        """Per probe position (row-major): +1 key / -1 value / 0 untouched, and the index of
        the K or V element the backend stored there; brought to the host once."""
        cache = self.cache
        dev = cache.device
        count = block_size * self.heads * self.dim
        idx = torch.arange(count, device=dev)
        slots = torch.arange(block_size, dtype=torch.long, device=dev)
        element = kind = None
        place = 1
        while True:
            digit = (idx // place) % _BASE + 1  # 1..128, so 0 marks untouched positions
            probe = _zeros_in_stride_order(cache, probe_shape)
            k = digit.to(cache.dtype).reshape(block_size, self.heads, self.dim)
            self.attn.impl.do_kv_cache_update(self.attn, k, -k, probe, slots)
            flat = probe.reshape(-1).float()  # one block: a small copy
            if kind is None:
                kind = torch.sign(flat).long()
                element = torch.zeros_like(kind)
            element += (flat.abs().long() - 1).clamp(min=0) * place
            place *= _BASE
            if place >= count:
                break
        kind, element = torch.stack([kind, element]).cpu()
        return kind, element


def _onto(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` on ``device``: asynchronous from pinned memory (the copy is stream-ordered
    before the kernel that reads it), a no-op when it is there already."""
    return t.to(device, dtype or t.dtype, non_blocking=t.is_pinned())


def _span(t: torch.Tensor) -> int:
    """Elements from ``t``'s first element to its last in storage (gaps included)."""
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))


def _common_run(offsets: torch.Tensor) -> int:
    """The largest divisor ``r`` of the last dim whose every ``r``-element chunk is ``r``
    adjacent storage elements, in every row (host, once per layout)."""
    width = offsets.shape[-1]
    adjacent = (offsets.diff(dim=-1) == 1).reshape(-1, width - 1).all(dim=0)
    adjacent = torch.cat([adjacent, adjacent.new_ones(1)])  # [j]: j and j + 1 adjacent
    for r in range(width, 1, -1):
        if width % r == 0 and bool(adjacent.view(-1, r)[:, :-1].all()):
            return r
    return 1


def _run_index(starts: torch.Tensor, offsets: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Storage offsets of each slot's runs, flat ``[n * runs per token]``."""
    idx = starts[offsets]  # [n, runs per token]
    idx += base[:, None]  # in place: one index tensor per read of K or V
    return idx.view(-1)


def _gather(flat: torch.Tensor, run: int, index: torch.Tensor) -> torch.Tensor:
    """``[runs, run]``: the runs of ``run`` elements of ``flat`` starting at ``index``."""
    if run == 1:  # element by element: the 1-D gather (3x faster than rows of one)
        return flat.index_select(0, index)
    # row i of this view is flat[i : i + run] (overlapping rows: a view, only read)
    rows = flat.as_strided((flat.numel() - run + 1, run), (1, 1))
    return rows.index_select(0, index)


def _zeros_in_stride_order(cache: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """Zeros of ``shape`` whose dims are ordered in memory as ``cache``'s: a kernel that
    honours strides writes the probe as it writes the cache."""
    order = sorted(range(cache.dim()), key=lambda d: (-cache.stride(d), d))
    phys = torch.zeros([shape[d] for d in order], dtype=cache.dtype, device=cache.device)
    return phys.permute([order.index(d) for d in range(cache.dim())])


def _storage_offsets(pos: torch.Tensor, shape: list[int], strides: tuple[int, ...]) -> torch.Tensor:
    """Row-major positions in ``shape`` as element offsets under ``strides``."""
    out = torch.zeros_like(pos)
    rest = pos.clone()
    for n, s in zip(reversed(shape), reversed(strides), strict=True):
        out += (rest % n) * s
        rest //= n
    return out


def _positions_from_probe(element, kind, count, io) -> tuple[torch.Tensor, torch.Tensor]:
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
        out.append(index)
    return out[0], out[1]


def _num_blocks(cache: torch.Tensor, block_size: int, heads: int, dim: int) -> int:
    per_block = 2 * block_size * heads * dim
    if cache.numel() % per_block:
        raise ValueError(
            f"KV cache of shape {tuple(cache.shape)} is not whole blocks of K and V "
            f"({block_size} tokens x {heads} heads x {dim})"
        )
    return cache.numel() // per_block

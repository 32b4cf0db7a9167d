"""KV caches laid out exactly as vLLM lays them out, and a FlashAttention-like writer.

vLLM allocates one raw int8 buffer for all layers and views it per layer as the logical
``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` in the stride order of the
resolved layout (``vllm/v1/worker/utils.py: allocate_kv_cache`` ->
``vllm/v1/kv_cache_interface.py: create_kv_cache_views``). FlashAttention declares no
layout, so it runs on the default ``LBNHC`` (physical ``[B, N, H, C]``): its per-layer view
is non-contiguous whenever ``num_kv_heads > 1``; the block-outermost (``BL..``) layouts
interleave the layers, so none of their views is contiguous. vLLM's CPU backend declares
``LBHNC`` (contiguous). ``flash_caches`` builds these views with vLLM's own code.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch

# layouts whose per-layer view is a non-contiguous view for num_kv_heads > 1
NON_CONTIGUOUS = ("LBNHC", "BLNHC", "BLHNC", "BHLNC", "LHBNC")
LAYOUTS = ("LBHNC", *NON_CONTIGUOUS)


def flash_caches(
    layout: str,
    num_blocks: int,
    block_size: int,
    heads: int,
    dim: int,
    dtype: torch.dtype,
    num_layers: int = 2,
    raw_on: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> list[torch.Tensor]:
    """Per-layer KV cache views of one raw buffer (``raw_on``: e.g. ``FakeCuda.tensor``)."""
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheTensor,
        compute_layout_strides,
        create_kv_cache_views,
    )
    from vllm.v1.kv_cache_layout import KVCacheLayout

    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=heads, head_size=dim, dtype=dtype)
    order = KVCacheLayout[layout]
    # the layer and block byte strides the KV cache config would give this layout
    strides = compute_layout_strides(spec, num_blocks, num_layers, order)
    size = spec.page_size_bytes * num_blocks * num_layers
    tensor = KVCacheTensor(
        size=size,
        layers=[f"l{i}" for i in range(num_layers)],
        layer_stride=strides[0],
        block_stride=strides[1],
    )
    raw = raw_on(torch.zeros(size, dtype=torch.int8))
    return create_kv_cache_views(raw, spec, num_blocks, order, tensor)


class FlashImpl:
    """FlashAttentionImpl.do_kv_cache_update (vllm/v1/attention/backends/flash_attn.py):
    K and V halves of ``[B, H, N, 2D]`` seen as ``[B, N, H, D]``, then what the CUDA op
    ``reshape_and_cache_flash`` does (not built on CPU): ``cache[slot // N, slot % N] = x``."""

    def __init__(self, head_size: int) -> None:
        self.head_size = head_size

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        n = key_cache.shape[1]
        key_cache[slot_mapping // n, slot_mapping % n] = key
        value_cache[slot_mapping // n, slot_mapping % n] = value


def flash_attn(cache: torch.Tensor, head_size: int) -> SimpleNamespace:
    """An attention layer as KVPageIO sees it: ``impl`` and ``kv_cache``."""
    return SimpleNamespace(impl=FlashImpl(head_size), kv_cache=cache)


def flash_read(cache: torch.Tensor, head_size: int, slots: torch.Tensor):
    """The oracle: K, V at ``slots`` as FlashAttention's kernel addresses them."""
    key_cache, value_cache = cache.transpose(1, 2).split(head_size, dim=-1)
    n = key_cache.shape[1]
    return key_cache[slots // n, slots % n], value_cache[slots // n, slots % n]

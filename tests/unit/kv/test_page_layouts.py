"""KVPageIO on KV caches laid out as vLLM lays them out for FlashAttention, and on "cuda".

The per-layer cache is a view of one raw buffer in the layout's stride order
(tests/kv_layouts.py); FlashAttention's default (LBNHC) view is non-contiguous with GQA.
Asserted: reads return what FlashAttention's writer stored at arbitrary slots (and touch no
other layer), write/read round trips, a read allocates only O(slots) bytes (never a copy
of the layer), and under FakeCuda: a device cache, host slots and host K/V, device reads,
one device->host crossing to measure the layout, no host/device mix.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tests.devices import FakeCuda, is_device
from tests.kv_layouts import (
    LAYOUTS,
    NON_CONTIGUOUS,
    FlashImpl,
    flash_attn,
    flash_caches,
    flash_read,
)
from vllm_recroute.kv.pages import KVPageIO

HEADS, BLOCK, BLOCKS = 2, 16, 64
SLOTS = torch.tensor([5, 1000, 17, 16, 3 * BLOCK + 15, 0, BLOCKS * BLOCK - 1, 511, 6])


def kv(n: int, dim: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, HEADS, dim, generator=g).to(dtype) for _ in range(2)]


def test_vllm_lays_flash_attention_out_non_contiguous_with_gqa():
    """The premise of the bound test: FlashAttention's default view is not contiguous."""
    for layout in LAYOUTS:
        cache = flash_caches(layout, BLOCKS, BLOCK, HEADS, 32, torch.float16)[1]
        assert cache.shape == (BLOCKS, HEADS, BLOCK, 64)
        assert cache.is_contiguous() == (layout not in NON_CONTIGUOUS), layout


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("dim", "dtype"), [(32, torch.float16), (64, torch.bfloat16)])
def test_reads_what_flash_attention_wrote_at_arbitrary_slots(layout, dim, dtype):
    caches = flash_caches(layout, BLOCKS, BLOCK, HEADS, dim, dtype)
    k, v = kv(len(SLOTS), dim, dtype)
    attn = flash_attn(caches[1], dim)
    attn.impl.do_kv_cache_update(attn, k, v, caches[1], SLOTS)  # the backend's own write
    rk, rv = KVPageIO(attn, HEADS, dim).read(SLOTS, BLOCK)
    assert torch.equal(rk, k) and torch.equal(rv, v)
    assert not caches[0].any()  # the other layer's pages (interleaved or not) untouched


@pytest.mark.parametrize("layout", ["LBNHC", "BLHNC", "LBHNC"])
def test_write_then_read_round_trips(layout):
    caches = flash_caches(layout, BLOCKS, BLOCK, HEADS, 64, torch.float16)
    io = KVPageIO(flash_attn(caches[0], 64), HEADS, 64)
    k, v = kv(len(SLOTS), 64, torch.float32)  # written in the cache's dtype
    io.write(k, v, SLOTS)
    rk, rv = io.read(SLOTS, BLOCK)
    assert torch.equal(rk, k.half()) and torch.equal(rv, v.half())
    fk, fv = flash_read(caches[0], 64, SLOTS)  # where FlashAttention's kernel will look
    assert torch.equal(fk, rk) and torch.equal(fv, rv)
    k2, v2 = kv(2, 64, torch.float16, seed=1)  # overwrite two slots, the rest stay
    io.write(k2, v2, SLOTS[[1, 4]])
    rk, _ = io.read(SLOTS, BLOCK)
    assert torch.equal(rk[[1, 4]], k2) and torch.equal(rk[[0, 2, 3]], k.half()[[0, 2, 3]])
    assert not caches[1].any()


class AllocatedBytes(TorchDispatchMode):
    """Bytes of every op output that is a new tensor (views and in-place results share an
    input's storage and are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0
        self.largest = (0, "")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        ptrs = {t.untyped_storage().data_ptr() for t in inputs}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in ptrs:
                nbytes = t.numel() * t.element_size()
                self.nbytes += nbytes
                self.largest = max(self.largest, (nbytes, str(func)))
        return out


def read_bound(n: int, dim: int, itemsize: int) -> int:
    """Outputs K, V (n x H x D items), one int64 gather index each per run of ``dim``
    adjacent elements (not per element), and a few int64 per-slot temporaries (device
    slots, block base, in-block offset)."""
    return 2 * n * HEADS * dim * itemsize + 2 * n * HEADS * 8 + 8 * 8 * n


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_read_gathers_whole_head_rows(layout):
    """FlashAttention keeps each head's ``dim`` K (or V) values adjacent in every layout, so
    a read indexes runs of ``dim`` elements: one index per head and slot."""
    cache = flash_caches(layout, BLOCKS, BLOCK, HEADS, 32, torch.float16)[1]
    layout_of = KVPageIO(flash_attn(cache, 32), HEADS, 32).layout(BLOCK)
    assert layout_of.key_run == layout_of.value_run == 32
    assert layout_of.key_start.shape == layout_of.value_start.shape == (BLOCK, HEADS)


class ReversedImpl:
    """A backend that stores each head's values in reverse order: no two adjacent elements
    of K or V are in order, so the layout has runs of one element."""

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        FlashImpl(key.shape[-1]).do_kv_cache_update(
            layer, key.flip(-1), value.flip(-1), kv_cache, slot_mapping
        )


def test_a_layout_without_runs_is_read_element_by_element():
    caches = flash_caches("LBNHC", BLOCKS, BLOCK, HEADS, 32, torch.float16)
    attn = SimpleNamespace(impl=ReversedImpl(), kv_cache=caches[1])
    io = KVPageIO(attn, HEADS, 32)
    k, v = kv(len(SLOTS), 32, torch.float16)
    io.write(k, v, SLOTS)
    assert io.layout(BLOCK).key_run == io.layout(BLOCK).value_run == 1  # guard: per element
    rk, rv = io.read(SLOTS, BLOCK)
    assert torch.equal(rk, k) and torch.equal(rv, v)
    fk, _ = flash_read(caches[1], 32, SLOTS)
    assert torch.equal(fk, k.flip(-1))  # the bytes really are reversed in the pages


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_read_allocates_per_slot_never_per_layer(layout):
    dim, dtype = 64, torch.bfloat16
    cache = flash_caches(layout, BLOCKS, BLOCK, HEADS, dim, dtype)[1]
    io = KVPageIO(flash_attn(cache, dim), HEADS, dim)
    io.read(SLOTS[:1], BLOCK)  # the layout is measured once per cache (one block's probes)
    n = len(SLOTS)
    layer_bytes = cache.numel() * cache.element_size()
    with AllocatedBytes() as seen:
        io.read(SLOTS, BLOCK)
    bound = read_bound(n, dim, cache.element_size())
    assert bound * 20 < layer_bytes  # the bound is far below one layer's cache
    assert seen.nbytes <= bound, (
        f"read of {n} slots allocated {seen.nbytes} bytes (largest {seen.largest}), "
        f"bound {bound}, one layer's cache {layer_bytes}"
    )


def test_measuring_the_layout_costs_one_block_whatever_the_cache_size():
    """The probe is one block (in int64 digits): its bytes do not grow with the cache."""
    seen = []
    for blocks in (BLOCKS, 4 * BLOCKS):
        cache = flash_caches("LBNHC", blocks, BLOCK, HEADS, 64, torch.float16)[1]
        io = KVPageIO(flash_attn(cache, 64), HEADS, 64)
        with AllocatedBytes() as mode:
            io.read(SLOTS, BLOCK)
        seen.append(mode.nbytes)
    assert seen[0] == seen[1] <= 512 * (2 * BLOCK * HEADS * 64)


# ------------------------------------------------------------------ device rules (FakeCuda)


@pytest.mark.parametrize("layout", ["LBNHC", "BLNHC"])
def test_device_cache_host_inputs_device_reads(layout):
    dim, dtype = 32, torch.float16
    k, v = kv(len(SLOTS), dim, dtype)
    with FakeCuda() as fc:
        caches = flash_caches(layout, BLOCKS, BLOCK, HEADS, dim, dtype, raw_on=fc.tensor)
        cache = caches[1]
        assert is_device(cache) and not cache.is_contiguous()
        io = KVPageIO(flash_attn(cache, dim), HEADS, dim)
        io.write(k, v, SLOTS)  # host K/V and host slots (block tables are host)
        assert fc.h2d == 3 and fc.h2d_bytes == 2 * k.nbytes + SLOTS.nbytes
        fc.reset()
        rk, rv = io.read(SLOTS, BLOCK)  # measures the layout on the device
        assert is_device(rk) and is_device(rv)
        assert fc.d2h == 1  # the probe comes back to the host once
        fc.reset()
        rk, rv = io.read(SLOTS, BLOCK)
        assert (fc.h2d, fc.h2d_bytes, fc.d2h) == (1, SLOTS.nbytes, 0)  # only the slots cross
        assert sum(fc.syncs.values()) == 0
        assert torch.equal(rk.cpu(), k) and torch.equal(rv.cpu(), v)


def test_the_layout_probe_runs_on_the_cache_device():
    """Pages written on the device (as the model's forward does), read with host slots:
    the probe is built and written on the device, so the backend's writer sees no host
    tensor."""
    dim, dtype = 64, torch.bfloat16
    k, v = kv(len(SLOTS), dim, dtype)
    with FakeCuda() as fc:
        cache = flash_caches("LBNHC", BLOCKS, BLOCK, HEADS, dim, dtype, raw_on=fc.tensor)[0]
        attn = flash_attn(cache, dim)
        attn.impl.do_kv_cache_update(attn, fc.tensor(k), fc.tensor(v), cache, fc.tensor(SLOTS))
        io = KVPageIO(attn, HEADS, dim)
        rk, rv = io.read(SLOTS, BLOCK)
        assert io.layout(BLOCK).key_start.device.type == "cuda"  # the gather index
        assert is_device(rk) and torch.equal(rk.cpu(), k) and torch.equal(rv.cpu(), v)

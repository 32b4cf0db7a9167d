"""Park / restore bandwidth of the parked-block host pool against a plain tensor copy.

One parked block = the K and V of one KV block (16 tokens) for the layers of one routing
stage, SmolVLM-256M shapes (3 KV heads x 64 dims; a PyramidDrop stage of a 30-layer model
spans 7-8 layers). Each row parks and restores `--blocks` such blocks and reports the
throughput in GB/s of the *uncompressed* K/V bytes, next to `torch.Tensor.copy_` of the
same bytes into a preallocated buffer (the floor any host tier pays) and `clone()`.
CPU only here (device = host), so this measures the pool's own overhead: copying,
digests, int8 quantisation, bookkeeping.

The "swap" rows run the engine's decode-time data path on real paged caches in vLLM's CPU
kernel layout (`cpu_attn_reshape_and_cache`, keys packed per block): per unit and layer,
read the evicted unit's slots, park it, restore another unit and write it into the same
slots with the backend's own writer, `--swaps-per-step` units per re-routing step batched
as `ParkingTier` does (worker/stage_pages.py: one slot index per KV group, one read and
one write per layer). A swap
moves the unit's bytes both ways; GB/s are per direction, like the copy rows.

The first table is the host bytes of one deferred unit as the pool counts them, parked as
its K/V for the stage's layers (the design before #24) and as its stage-entry state
(`--hidden` values a token, what prefill parks now). The swap rows move K/V units (what a
re-route evicts and later restores); a unit restored from its state also pays the K/V
projection of its rows at each stage layer (compute, not copy; not in these rows).

    python bench/park_bandwidth.py [--blocks 2000] [--layers 8] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the root: bench.common

import torch

from bench import common
from vllm_recroute.kv.pages import KVPageIO
from vllm_recroute.kv.parked_pool import ParkedKey, ParkedPool
from vllm_recroute.worker.projections import Projections
from vllm_recroute.worker.stage_pages import PageRow, read_stage, restored_kv, write_stage

CPU = torch.device("cpu")


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=2000)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (blocks are small)")
    ap.add_argument("--swaps-per-step", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=576, help="hidden size (a parked state)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    shape = (args.layers, args.tokens, args.heads, args.dim)
    ks = [torch.randn(shape).to(dtype) for _ in range(args.blocks)]
    vs = [torch.randn(shape).to(dtype) for _ in range(args.blocks)]
    nbytes = sum(k.numel() * k.element_size() * 2 for k in ks)
    rows = []

    dst = [torch.empty(shape, dtype=dtype) for _ in range(2 * args.blocks)]

    def plain_copy():
        for i in range(args.blocks):
            dst[2 * i].copy_(ks[i])
            dst[2 * i + 1].copy_(vs[i])

    t_copy = common.median_seconds(plain_copy, args.repeats)
    rows.append(("torch copy_ (preallocated)", t_copy, t_copy))
    t_clone = common.median_seconds(
        lambda: [(k.clone(), v.clone()) for k, v in zip(ks, vs, strict=True)], args.repeats
    )
    rows.append(("torch clone()", t_clone, t_clone))

    for compress in ("none", "int8"):
        park_t, restore_t = [], []
        for _ in range(args.repeats):
            pool = ParkedPool(capacity_bytes=4 * nbytes, compress=compress)
            keys = [ParkedKey("r", 1, i) for i in range(args.blocks)]
            t0 = time.perf_counter()
            for key, k, v in zip(keys, ks, vs, strict=True):
                pool.park(key, k, v, score=1.0)
            park_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for i, key in enumerate(keys):  # restore = hand back + write into a page
                k, v = pool.restore(key)
                dst[2 * i].copy_(k)
                dst[2 * i + 1].copy_(v)
            restore_t.append(time.perf_counter() - t0)
        rows.append(
            (f"ParkedPool {compress}", statistics.median(park_t), statistics.median(restore_t))
        )

    rows += _swap_rows(args, dtype, ks, vs, t_copy)
    print(
        f"{args.blocks} blocks of K+V [{args.layers} layers, {args.tokens} tokens, "
        f"{args.heads} heads, {args.dim}] {args.dtype}: {nbytes / 1e6:.1f} MB per pass; "
        f"median of {args.repeats}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n"
    )
    _unit_bytes(args)
    print("| path | park GB/s | restore GB/s | park time / copy_ |")
    print("|---|---:|---:|---:|")
    for name, tp, tr in rows:
        print(f"| {name} | {_gbps(nbytes, tp):.2f} | {_gbps(nbytes, tr):.2f} | {tp / t_copy:.2f} |")


def _unit_bytes(args) -> None:
    """Host bytes one deferred unit occupies in the pool (payload, scales, positions,
    digest) parked as its K/V for the stage's layers (before #24) and as its stage-entry
    state (now), by the pool's own accounting."""
    from vllm_recroute.kv.parked_pool import ParkedState

    print("| dtype | format | as K/V (bytes) | as state (bytes) | state / K/V |")
    print("|---|---|---:|---:|---:|")
    shape = (args.layers, args.tokens, args.heads, args.dim)
    for dtype in (torch.float32, torch.bfloat16):
        k = torch.zeros(shape, dtype=dtype)
        state = ParkedState(
            torch.zeros(args.tokens, args.hidden, dtype=dtype), torch.arange(args.tokens)
        )
        digest = torch.zeros(args.heads, args.dim)
        for fmt in ("none", "int8"):
            pool = ParkedPool(1, compress=fmt)
            kv, st = pool.entry_bytes(k, k), pool.state_bytes(state, digest)
            print(
                f"| {str(dtype).removeprefix('torch.')} | {fmt} | {kv:,} | {st:,} | {st / kv:.3f} |"
            )
    print()


class _CpuKernelWriter:
    """The write of vLLM's CPU attention backend (its `do_kv_cache_update`)."""

    def do_kv_cache_update(self, layer, k, v, cache, slots):
        import vllm._custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        nb, h, b, _ = cache.shape
        kc, vc = cache.view(nb, h, b * 2, -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, _get_attn_isa(k.dtype, b, k.shape[-1]))


def _swap_rows(args, dtype, ks, vs, t_copy) -> list[tuple[str, float, float]]:
    """Decode-time swaps through paged caches: time per pass of ``--blocks`` swaps."""
    from types import SimpleNamespace

    page = 32  # vLLM CPU block size
    n = args.blocks
    slots_per_unit = args.tokens
    num_pages = (n * slots_per_unit) // page + 1
    ios = []
    for _ in range(args.layers):
        attn = SimpleNamespace(
            impl=_CpuKernelWriter(),
            kv_cache=torch.zeros(num_pages, args.heads, page, 2 * args.dim, dtype=dtype),
        )
        ios.append(KVPageIO(attn, args.heads, args.dim))
    unit_slots = [torch.arange(i * slots_per_unit, (i + 1) * slots_per_unit) for i in range(n)]
    # one KV group: every layer's page row is this one (identity table: positions = slots)
    rows = [PageRow(torch.arange(num_pages), page)] * args.layers
    for layer, io in enumerate(ios):  # fill pages with the "active" units
        for i in range(n):
            io.write(ks[i][layer], vs[i][layer], unit_slots[i])
    # an evicted unit parks with the digest it was scored by (worker/parking.py): computed
    # when it was parked or scored, not by the swap
    digests = [ks[i][0].float().mean(dim=0) for i in range(n)]
    out = []
    for compress in ("none", "int8"):
        times = []
        for _ in range(args.repeats):
            pool = ParkedPool(capacity_bytes=1 << 40, compress=compress)
            for i in range(n):  # the parked units
                pool.park(ParkedKey("r", 1, n + i), ks[(i + 1) % n], vs[(i + 1) % n], 1.0)
            t0 = time.perf_counter()
            step = args.swaps_per_step
            for first in range(0, n, step):
                units = range(first, min(first + step, n))
                slots = torch.cat([unit_slots[i] for i in units])
                indices, old = read_stage(ios, rows, slots)
                back = [pool.restore(ParkedKey("r", 1, n + i)) for i in units]
                # K/V units only: nothing is projected (the layers are never read)
                new = restored_kv(Projections([]), range(len(ios)), back, CPU, False)
                write_stage(ios, indices, new)
                old_k = torch.stack([a for a, _ in old]).split(args.tokens, dim=1)
                old_v = torch.stack([b for _, b in old]).split(args.tokens, dim=1)
                for i, ek, ev in zip(units, old_k, old_v, strict=True):
                    pool.park(ParkedKey("r", 1, i), ek, ev, 1.0, digests[i])
            times.append(time.perf_counter() - t0)
        t = statistics.median(times) / 2  # two directions: GB/s per direction, like copy_
        name = f"swap via pages (CPU kernel layout, {args.swaps_per_step}/step), {compress}"
        out.append((name, t, t))
    out += _page_io_rows(args, ios, rows, unit_slots, ks, vs)
    return out


def _page_io_rows(args, ios, rows, unit_slots, ks, vs) -> list[tuple[str, float, float]]:
    """The two page operations of a swap alone, over the same units and batches: the
    slot read (index + gather out of the CPU kernel's layout, keys packed per block) and
    the backend's write. Each is one direction of a swap, so each bounds it."""
    step = args.swaps_per_step
    batches = [
        torch.cat([unit_slots[i] for i in range(first, min(first + step, args.blocks))])
        for first in range(0, args.blocks, step)
    ]

    def read_all():
        for slots in batches:
            read_stage(ios, rows, slots)

    t_read = common.median_seconds(read_all, args.repeats)
    # what the writes put back: each batch's K/V, per layer, already stacked
    writes = []
    for first, slots in zip(range(0, args.blocks, step), batches, strict=True):
        units = range(first, min(first + step, args.blocks))
        indices, _ = read_stage(ios, rows, slots)
        kv = [
            (torch.cat([ks[i][layer] for i in units]), torch.cat([vs[i][layer] for i in units]))
            for layer in range(args.layers)
        ]
        writes.append((indices, kv))
    t_write = common.median_seconds(
        lambda: [write_stage(ios, indices, kv) for indices, kv in writes], args.repeats
    )
    return [
        ("of a swap: pages read alone (slot index + gather)", t_read, t_read),
        ("of a swap: pages write alone (the backend's writer)", t_write, t_write),
    ]


if __name__ == "__main__":
    main()

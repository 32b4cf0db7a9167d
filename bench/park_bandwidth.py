"""Park / restore bandwidth of the parked-block host pool against a plain tensor copy.

One parked block = the K and V of one KV block (16 tokens) for the layers of one routing
stage, SmolVLM-256M shapes (3 KV heads x 64 dims; a PyramidDrop stage of a 30-layer model
spans 7-8 layers). Each row parks and restores `--blocks` such blocks and reports the
throughput in GB/s of the *uncompressed* K/V bytes, next to `torch.Tensor.copy_` of the
same bytes into a preallocated buffer (the floor any host tier pays) and `clone()`.
CPU only here (device = host), so this measures the pool's own overhead: copying,
digests, int8 quantisation, bookkeeping.

    python bench/park_bandwidth.py [--blocks 2000] [--layers 8] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from vllm_recroute.kv.parked_pool import ParkedKey, ParkedPool


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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

    t_copy = _median_time(plain_copy, args.repeats)
    rows.append(("torch copy_ (preallocated)", t_copy, t_copy))
    t_clone = _median_time(
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

    print(
        f"{args.blocks} blocks of K+V [{args.layers} layers, {args.tokens} tokens, "
        f"{args.heads} heads, {args.dim}] {args.dtype}: {nbytes / 1e6:.1f} MB per pass; "
        f"median of {args.repeats}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print("| path | park GB/s | restore GB/s | park time / copy_ |")
    print("|---|---:|---:|---:|")
    for name, tp, tr in rows:
        print(f"| {name} | {_gbps(nbytes, tp):.2f} | {_gbps(nbytes, tr):.2f} | {tp / t_copy:.2f} |")


if __name__ == "__main__":
    main()

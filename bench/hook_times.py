"""Wall time inside a routed engine's hooks: where a routed configuration's extra time goes.

Runs one engine of bench/throughput.py in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
so the worker's hooks are timed here), its warm pass and its measured pass, and prints the
total wall time of each timed plugin function over the measured pass (timers reset after
the warm pass; nested functions count in both). Not a ratio bench: a breakdown.

    python bench/hook_times.py ["routed, pdrop + kv_release + parked tier"] [--set JSON]
"""

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the root: bench.common

from bench import common
from bench import throughput as T
from vllm_recroute.kv import pages
from vllm_recroute.worker import decoder, parking, projections, step, step_tier

acc = defaultdict(float)
cnt = defaultdict(int)


def timed(owner, name, label=None):
    fn = getattr(owner, name)
    label = label or f"{owner.__name__}.{name}"

    @functools.wraps(fn)
    def w(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc[label] += time.perf_counter() - t
            cnt[label] += 1

    setattr(owner, name, w)


for owner, name in [
    (parking.ParkingTier, "park_prefill"),
    (parking.ParkingTier, "reroute_all"),
    (parking.ParkingTier, "_swap_pool"),
    (parking.ParkingTier, "_write_restored"),
    (parking.ParkingTier, "_plan"),
    (parking.ParkingTier, "_digests"),
    (step.StepRouter, "_scores_on_device"),
    (step.StepRouter, "score_before"),
    (step.StepRouter, "_tier_before"),
    (step_tier.StepTier, "reroute_from_query"),
    (step.StepRouter, "run_layer"),
    (step.StepRouter, "install_all"),
    (step.StepRouter, "start"),
    (projections.Projections, "keys"),
    (projections.Projections, "key_values"),
    (pages.KVPageIO, "write"),
    (pages.KVPageIO, "read_at"),
    (pages.KVPageIO, "index"),
]:
    timed(owner, name)
# the whole forward: pre-hook to post-hook
fw = {"t": None}
pre, post = decoder.RoutedDecoder._before_forward, decoder.RoutedDecoder._after_forward


def before(self, *a):
    fw["t"] = time.perf_counter()
    return pre(self, *a)


def after(self, m, a, out):
    r = post(self, m, a, out)
    if fw["t"] is not None:
        kind = "forward:" + ("prefill" if self.forwards["eager"] != fw.get("e") else "decode")
        fw["e"] = self.forwards["eager"]
        acc[kind] += time.perf_counter() - fw["t"]
        cnt[kind] += 1
    return r


decoder.RoutedDecoder._before_forward = before
decoder.RoutedDecoder._after_forward = after

orig_pass = T._pass


def _pass(llm, requests, max_tokens, label):
    if label == "run":
        acc.clear()
        cnt.clear()
    t = time.perf_counter()
    r = orig_pass(llm, requests, max_tokens, label)
    if label == "run":
        acc["pass wall"] = time.perf_counter() - t
    return r


T._pass = _pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine", nargs="?", default="routed, pdrop + kv_release + parked tier")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--set", default=None, metavar="JSON", help="recroute fields over the engine's")
    args = ap.parse_args()
    if args.set:
        engine = T.ENGINES[args.engine]
        T.ENGINES[args.engine] = dataclasses.replace(
            engine, routing={**engine.routing, **json.loads(args.set)}
        )
    run = argparse.Namespace(
        model=common.default_model(None), reroute_path=None, concurrency=args.concurrency,
        max_tokens=48, image_size=1536, kv_mib=1024,
    )  # fmt: skip
    print(json.dumps(T.run_engine(args.engine, run)))
    print("| function | wall (s) | calls |\n|---|---:|---:|")
    for k in sorted(acc, key=lambda k: -acc[k]):
        print(f"| {k} | {acc[k]:.3f} | {cnt[k]} |")


if __name__ == "__main__":
    main()

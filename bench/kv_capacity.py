"""Concurrency at a fixed KV budget: plain vLLM vs pdrop routing with kv_release, without
and with the parked host tier (decode-time re-routing every 4 steps).

Many image requests at once on the random-weight SmolVLM-256M-shaped model, same
`kv_cache_memory_bytes` for both engines. Measured per engine step (LLMEngine.step loop,
vLLM's own gauges): peak requests generating a token in one step (each holds its whole
prompt's KV: the concurrency figure), peak running requests (vLLM's gauge, which also
counts a request admitted with a chunk of its prompt only), KV blocks in use per running
request (from `vllm:kv_cache_usage_perc`), preemptions, and generated tokens/s. Next to them, the
analytic ideal of the KV ratio from the schedule: per request, the stage-weighted share
of tokens that keep KV pages, at the final length.

    python bench/kv_capacity.py [--requests 24] [--max-tokens 24] [--kv-mib 270] [--parked-mib 256]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the root: bench.common

from bench import common


def _engine(model: str, routing: dict | None, kv_bytes: int, max_seqs: int, block_size: int):
    return common.make_llm(
        model, routing, max_model_len=1024, kv_cache_memory_bytes=kv_bytes,
        max_num_seqs=max_seqs, enable_prefix_caching=False,
        disable_log_stats=False, block_size=block_size,
        # otherwise vLLM's defaults for every engine: compiled, chunked prefill on
    )  # fmt: skip


def _run(llm, requests, max_tokens: int) -> dict:
    # One pass: peak running requests and KV per request do not depend on timing (the
    # tokens/s column is a cold pass; bench/throughput.py measures speed).
    return _pass(llm, requests, max_tokens, "run")


def _pass(llm, requests, max_tokens: int, tag: str) -> dict:
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    preempt0 = int({x.name: x for x in llm.get_metrics()}["vllm:num_preemptions"].value)
    for i, req in enumerate(requests):
        engine.add_request(f"{tag}{i}", req, params)
    restored0 = common.plugin_metric(llm, "recroute:restored_blocks")
    peak, usage_per_req, generated, parked_peak, peak_gen = 0, [], 0, 0, 0
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        outs = engine.step()
        # Requests that got a token this step: their whole prompt holds KV. vLLM's running
        # gauge also counts a request admitted with only a chunk of its prompt (chunked
        # prefill), which may be preempted again before it has its full KV.
        peak_gen = max(peak_gen, sum(1 for out in outs if out.outputs[0].token_ids))
        for out in outs:
            if out.finished:
                generated += len(out.outputs[0].token_ids)
        m = {x.name: x for x in llm.get_metrics()}
        running = int(m["vllm:num_requests_running"].value)
        peak = max(peak, running)
        if running:
            usage_per_req.append(m["vllm:kv_cache_usage_perc"].value / running)
        parked_peak = max(parked_peak, common.plugin_metric(llm, "recroute:parked_pool_bytes"))
    wall = time.perf_counter() - t0
    m = {x.name: x for x in llm.get_metrics()}
    return {
        "peak_running": peak,
        "peak_generating": peak_gen,
        "kv_usage_per_running_req": sum(usage_per_req) / max(1, len(usage_per_req)),
        "preemptions": int(m["vllm:num_preemptions"].value) - preempt0,
        "tokens_per_s": generated / wall,
        "wall_s": wall,
        "final_usage": m["vllm:kv_cache_usage_perc"].value,
        "parked_peak_mib": parked_peak / (1 << 20),
        "restored": common.plugin_metric(llm, "recroute:restored_blocks") - restored0,
        "parked_after": common.plugin_metric(llm, "recroute:parked_pool_bytes"),
    }


def _ideal_ratio(num_layers: int, num_visual: int, total_tokens: int) -> float:
    from vllm_recroute.config import RoutingConfig
    from vllm_recroute.routing import num_keep, resolve_stages

    stages = resolve_stages(RoutingConfig(schedule="pdrop"), num_layers, num_visual)
    kept = stages[0].start * total_tokens
    for s in stages:
        deferred = num_visual - num_keep(s.keep, num_visual)
        kept += (s.end - s.start) * (total_tokens - deferred)
    return kept / (num_layers * total_tokens)


def main() -> None:
    ap = common.parser()
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--kv-mib", type=int, default=270)
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--parked-mib", type=int, default=256, help="parked host pool size")
    args = ap.parse_args()

    from transformers import AutoProcessor

    from vllm_recroute.tiny import make_test_image

    model = common.default_model(args.model)
    proc = AutoProcessor.from_pretrained(model)
    requests = []
    for i in range(args.requests):
        prompt = common.chat_prompt(proc, f"Describe object number {i} please.")
        # One image for all (vLLM's encoder cache runs the vision tower once; prefix caching
        # is off, so no request shares another's KV): the decoder's KV is what is measured.
        image = make_test_image(100, args.image_size)
        requests.append({"prompt": prompt, "multi_modal_data": {"image": image}})
    first = requests[0]
    prompt_len, num_visual = common.prompt_token_counts(
        proc, first["prompt"], first["multi_modal_data"]["image"]
    )
    layers = common.num_layers(model)

    results = {}
    release = {"schedule": "pdrop", "kv_release": True}
    parked = {**release, "parked_bytes": args.parked_mib << 20, "reroute_every": 4}
    engines = (
        ("plain vLLM", None),
        ("pdrop + kv_release", release),
        ("pdrop + kv_release + parked tier", parked),
    )
    for name, routing in engines:
        llm = _engine(model, routing, args.kv_mib << 20, args.requests, args.block_size)
        results[name] = _run(llm, requests, args.max_tokens)
        common.shutdown(llm)
        del llm
    base = results["plain vLLM"]
    ideal = _ideal_ratio(layers, num_visual, prompt_len + args.max_tokens)
    print(
        f"{args.requests} requests at once, each {prompt_len} prompt tokens ({num_visual} "
        f"visual) + {args.max_tokens} generated; kv_cache_memory_bytes {args.kv_mib} MiB, "
        f"block size {args.block_size}; {layers} layers.\n"
    )
    print(
        "| engine | peak generating in one step | peak running (vLLM gauge) | KV use per "
        "running request | preemptions | tokens/s | parked pool peak | units restored |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r['peak_generating']} "
            f"({r['peak_generating'] / base['peak_generating']:.2f}x) "
            f"| {r['peak_running']} ({r['peak_running'] / base['peak_running']:.2f}x) "
            f"| {100 * r['kv_usage_per_running_req']:.2f}% "
            f"({r['kv_usage_per_running_req'] / base['kv_usage_per_running_req']:.2f}x) "
            f"| {r['preemptions']} | {r['tokens_per_s']:.1f} "
            f"({r['tokens_per_s'] / base['tokens_per_s']:.2f}x) "
            f"| {r['parked_peak_mib']:.1f} MiB | {int(r['restored'])} |"
        )
    print(
        f"\nAnalytic ideal KV ratio (pdrop, final length, token granularity): {ideal:.3f}; "
        f"KV usage after the run: "
        + ", ".join(f"{n} {100 * r['final_usage']:.1f}%" for n, r in results.items())
        + f"; parked pool after the run: {int(results[engines[2][0]]['parked_after'])} bytes"
    )
    for name, r in list(results.items())[1:]:
        for key in ("peak_generating", "peak_running"):
            ratio = r[key] / base[key]
            print(
                f"{name}: {key.replace('_', ' ')} {ratio:.2f}x plain vLLM against an ideal "
                f"of {1 / ideal:.2f}x (1 / KV ratio) = {ratio * ideal:.2f} of the ideal"
            )


if __name__ == "__main__":
    main()

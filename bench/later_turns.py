"""Second turn of image conversations: time to first token with and without later-turn
restore, next to plain vLLM with its prefix cache, in one run.

Random-weight SmolVLM-256M-shaped model. Each conversation: turn 1 = image + question
(max_tokens answer), turn 2 = turn 1's prompt, its answer and a new question (token ids,
so the prefix is exactly turn 1's tokens). Turn 2 runs alone, max_tokens=1: its wall time
is its time to first token. Engines:

- plain vLLM, prefix caching on: turn 2 hits every cached block of turn 1 (the baseline
  a routed model gives up, since routed-stage KV depends on the question);
- pdrop reroute + parked tier: turn 2 recomputes the image (prefix caching is off for a
  routed model without kv_release);
- the same + ``turn_cache_bytes``: turn 2 loads turn 1's stage KV from the host store and
  re-routes it.

Each engine runs the workload once unmeasured (vLLM's CPU path pays a large one-time cost
per new tensor shape) and once measured, with other images.

    python bench/later_turns.py [--conversations 4] [--image-size 1024] [--max-tokens 8]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the root: bench.common

from bench import common


def _engine(model: str, routing: dict | None, kv_bytes: int):
    return common.make_llm(
        model, routing, max_model_len=2048, kv_cache_memory_bytes=kv_bytes,
        max_num_seqs=8, enforce_eager=True, disable_log_stats=False,
        enable_chunked_prefill=False, max_num_batched_tokens=4096,
        enable_prefix_caching=routing is None,
    )  # fmt: skip


def _conversations(proc, seeds: list[int], image_size: int) -> list[tuple[str, object]]:
    from vllm_recroute.tiny import make_test_image

    out = []
    for seed in seeds:
        prompt = common.chat_prompt(proc, f"What is in region {seed} of the picture?")
        out.append((prompt, make_test_image(seed, image_size)))
    return out


def _pass(llm, convs, max_tokens: int) -> dict:
    from vllm import SamplingParams

    tok = llm.get_tokenizer()
    first = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    answers = llm.generate(
        [{"prompt": p, "multi_modal_data": {"image": im}} for p, im in convs],
        first,
        use_tqdm=False,
    )
    second = SamplingParams(temperature=0, max_tokens=1)
    question = tok.encode(" Which object is the largest one?", add_special_tokens=False)
    ttft, cached, prompt_lens = [], [], []
    for (prompt, image), ans in zip(convs, answers, strict=True):
        ids = tok.encode(prompt) + list(ans.outputs[0].token_ids) + question
        t0 = time.perf_counter()
        [out] = llm.generate(
            [{"prompt_token_ids": ids, "multi_modal_data": {"image": image}}],
            second,
            use_tqdm=False,
        )
        ttft.append(time.perf_counter() - t0)
        cached.append(out.num_cached_tokens or 0)
        prompt_lens.append(len(out.prompt_token_ids))
    return {
        "ttft_median_s": statistics.median(ttft),
        "cached_tokens": statistics.median(cached),
        "prompt_tokens": statistics.median(prompt_lens),
    }


def main() -> None:
    ap = common.parser()
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--kv-mib", type=int, default=256)
    args = ap.parse_args()

    from transformers import AutoProcessor

    model = common.default_model(args.model)
    proc = AutoProcessor.from_pretrained(model)
    n = args.conversations
    warm = _conversations(proc, list(range(200, 200 + n)), args.image_size)
    measured = _conversations(proc, list(range(300, 300 + n)), args.image_size)
    routed = {"schedule": "pdrop", "parked_bytes": 256 << 20, "reroute_every": 4}
    engines = (
        ("plain vLLM (prefix caching)", None),
        ("pdrop reroute + parked tier", routed),
        ("pdrop reroute + parked tier + turn_cache_bytes", {**routed, "turn_cache_bytes": 1 << 30}),
    )
    results = {}
    for name, routing in engines:
        llm = _engine(model, routing, args.kv_mib << 20)
        _pass(llm, warm, args.max_tokens)
        loads0 = common.plugin_metric(llm, "recroute:turn_loads")
        results[name] = _pass(llm, measured, args.max_tokens)
        results[name]["turn_loads"] = common.plugin_metric(llm, "recroute:turn_loads") - loads0
        store = common.plugin_metric(llm, "recroute:turn_store_bytes")
        results[name]["store_mib"] = store / (1 << 20)
        common.shutdown(llm)
        del llm
    base = results[engines[0][0]]
    print(
        f"{n} conversations (measured; {n} more to warm up), turn 1 answer {args.max_tokens} "
        f"tokens, turn 2 prompt {int(base['prompt_tokens'])} tokens, "
        f"image {args.image_size} px.\n"
    )
    print(
        "| engine | turn-2 TTFT (median) | vs plain vLLM | tokens not recomputed "
        "| turns loaded | store |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {1000 * r['ttft_median_s']:.0f} ms "
            f"| {r['ttft_median_s'] / base['ttft_median_s']:.2f}x "
            f"| {int(r['cached_tokens'])} | {int(r['turn_loads'])} | {r['store_mib']:.1f} MiB |"
        )


if __name__ == "__main__":
    main()

"""Prefill time (TTFT) of routing off vs fastv vs pdrop, as ratios against plain vLLM.

One run, one machine: a plain-vLLM engine and a routed engine on the same random-weight
SmolVLM-256M-shaped checkpoint (`vllm-recroute make-tiny-model --preset smolvlm-256m`:
30 Llama layers, hidden 576; 640 visual tokens for a 1536-px image). Each request is sent
alone with max_tokens=1, so its wall time is its time to first token (vision encoder +
prefill + one sample). Routing configs travel per request (vllm_xargs), so every routed
row shares one engine. Median of --repeats after one warm-up.

    python bench/ttft.py [--repeats 5] [--image-size 1536] [--out docs/bench_ttft.md]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the root: bench.common

from bench import common

CONFIGS = {
    "routed, mode off": {"recroute_mode": "off"},
    "fastv keep 0.5 (reroute)": {"recroute_schedule": "fastv", "recroute_keep": 0.5},
    "fastv keep 0.25 (reroute)": {"recroute_schedule": "fastv", "recroute_keep": 0.25},
    "pdrop 0.5/0.25/0.125 (reroute)": {"recroute_schedule": "pdrop"},
    "pdrop 0.5/0.25/0.125 (remove)": {"recroute_schedule": "pdrop", "recroute_mode": "remove"},
}


def _llm(model: str, routed: bool, max_len: int):
    return common.make_llm(
        model, {} if routed else None, max_model_len=max_len, kv_cache_memory_bytes=1 << 30,
        max_num_seqs=4, enable_prefix_caching=False,
    )  # fmt: skip


def _time(llm, request, xargs, repeats: int) -> tuple[float, int]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1, extra_args=xargs)
    warm = llm.generate([request], params, use_tqdm=False)  # warm-up
    t = common.median_seconds(lambda: llm.generate([request], params, use_tqdm=False), repeats)
    return t, len(warm[0].prompt_token_ids)


def _retention(xargs: dict, num_layers: int, num_visual: int) -> float:
    from vllm_recroute.routing import average_retention

    cfg, stages = common.request_stages(xargs, num_layers, num_visual)
    return average_retention(stages, num_layers) if cfg.enabled else 1.0


def main() -> None:
    ap = common.parser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=1536)
    common.add_out_arg(ap)
    args = ap.parse_args()

    from transformers import AutoProcessor

    from vllm_recroute.tiny import make_test_image

    model = common.default_model(args.model)
    proc = AutoProcessor.from_pretrained(model)
    prompt = common.chat_prompt(proc, "What color is the circle on the left?")
    image = make_test_image(7, args.image_size)
    request = {"prompt": prompt, "multi_modal_data": {"image": image}}
    layers = common.num_layers(model)

    rows = []
    plain = _llm(model, routed=False, max_len=2048)
    base, prompt_len = _time(plain, request, None, args.repeats)
    common.shutdown(plain)
    del plain
    rows.append(("plain vLLM", base, 1.0))
    routed = _llm(model, routed=True, max_len=2048)
    _, num_visual = common.prompt_token_counts(proc, prompt, image)
    for name, xargs in CONFIGS.items():
        t, _ = _time(routed, request, xargs, args.repeats)
        rows.append((name, t, _retention(xargs, layers, num_visual)))
    common.shutdown(routed)

    lines = [
        f"Model: {model} ({layers} layers), prompt {prompt_len} tokens of which "
        f"{num_visual} visual; median of {args.repeats} runs, max_tokens=1.",
        "",
        "| config | TTFT (s) | TTFT / plain vLLM | avg visual-token retention |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {n} | {t:.3f} | {t / base:.3f} | {r:.3f} |" for n, t, r in rows]
    common.write_table(lines, args.out)


if __name__ == "__main__":
    main()

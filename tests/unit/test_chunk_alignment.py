"""Chunked prefill with routing (sched/): the chunk rule as arithmetic, then vLLM's own
scheduler with it, step by step, with exact chunk sizes (no model runs: scheduled tokens
are all the scheduler decides).

Fake prompts: token ids don't matter to the scheduler, only the image spans
(``mm_features``) and the lengths. Budget: 64 tokens a step.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

import pytest

from vllm_recroute import vllm_view
from vllm_recroute.sched import SCHEDULER_PATH
from vllm_recroute.sched.chunking import aligned_chunk, span_fits

BUDGET = 64

# ------------------------------------------------------------------ the rule, pure


@pytest.mark.parametrize(
    ("computed", "num_new", "prompt_end", "first_image", "fits", "expected"),
    [
        # image at the start: nothing before it to chunk, so all or nothing
        (0, 64, 100, 0, True, 0),
        (0, 100, 100, 0, True, 100),
        # image in the middle: the text before it, then the whole rest
        (0, 64, 100, 40, True, 40),
        (40, 60, 100, 40, True, 60),
        (40, 58, 100, 40, True, 0),  # this step's budget is short: wait
        (0, 30, 100, 40, True, 30),  # ends before the image: vLLM's chunk
        (0, 40, 100, 40, True, 40),  # ends right at it
        # two images (20 and 60): cut before the first, not between them
        (0, 64, 100, 20, True, 20),
        # the rest from the first image is larger than any step: vLLM chunks (fallback)
        (0, 64, 150, 40, False, 64),
        (40, 64, 150, 40, False, 64),
        # text only
        (0, 64, 200, None, True, 64),
        # prefix-cache hit of 32 tokens before the image at 40: 8 more text tokens
        (32, 64, 100, 40, True, 8),
        # a hit past the first image: never routed (worker/step.py), vLLM's chunk
        (48, 52, 100, 40, True, 52),
        # a recomputed (preempted) request's outputs after the prompt: the span is in
        (0, 110, 100, 40, True, 110),
    ],
)
def test_aligned_chunk(computed, num_new, prompt_end, first_image, fits, expected):
    assert aligned_chunk(computed, num_new, prompt_end, first_image, fits) == expected


@pytest.mark.parametrize(
    ("computed", "num_new", "prompt_end", "first_image", "expected"),
    [
        (0, 64, 100, 40, 0),  # would be cut at the image: waits to be admitted whole
        (0, 3, 100, 40, 3),  # ends before the image: vLLM's chunk, as without the flag
        (0, 100, 100, 40, 100),  # the whole prompt: admitted
        (32, 60, 100, 40, 0),  # after a prefix-cache hit, the same
    ],
)
def test_aligned_chunk_admit_whole(computed, num_new, prompt_end, first_image, expected):
    got = aligned_chunk(computed, num_new, prompt_end, first_image, True, admit_whole=True)
    assert got == expected


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((100, 40, 64), True),  # 60 tokens
        ((100, 36, 64), True),  # exactly 64
        ((100, 35, 64), False),
        ((100, 40, 64, 60, 80), True),
        ((100, 40, 64, 90, 80), False),  # the images' encoder outputs don't fit one step
    ],
)
def test_span_fits(args, expected):
    assert span_fits(*args) is expected


# ------------------------------------------------------------------ vLLM's scheduler


def _engine_config(model, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    import vllm_recroute
    from tests.helpers import ROUTED_IDEFICS3

    vllm_recroute.register()
    args = EngineArgs(
        model=str(model),
        max_model_len=1024,
        max_num_batched_tokens=BUDGET,
        max_num_seqs=16,
        hf_overrides={"architectures": [ROUTED_IDEFICS3]},
        additional_config={"recroute": {"mode": "reroute"}},
        limit_mm_per_prompt={"image": 2},
        **kwargs,
    )
    cfg = args.create_engine_config()
    cfg.cache_config.num_gpu_blocks = 400
    return cfg


@pytest.fixture(scope="module")
def configs(tiny_idefics3):
    on_gpu = _engine_config(tiny_idefics3)
    # vLLM's CPU platform turns async scheduling off; a CUDA host has it on by default
    on_gpu.scheduler_config.async_scheduling = True
    return {"sync": _engine_config(tiny_idefics3), "async": on_gpu}


def _scheduler(cfg, cls=None):
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float32)
    kv = KVCacheConfig(
        num_blocks=400, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l0"], spec)]
    )
    cls = cls or cfg.scheduler_config.get_scheduler_cls()
    return cls(
        vllm_config=cfg,
        kv_cache_config=kv,
        structured_output_manager=StructuredOutputManager(cfg),
        block_size=16,
    )


def _request(rid: str, n: int, images: Iterable[tuple[int, int]] = (), **extra):
    from vllm import SamplingParams
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
    from vllm.v1.request import Request

    feats = [
        MultiModalFeatureSpec(
            data=None,
            modality="image",
            identifier=f"{rid}-{i}",
            mm_position=PlaceholderRange(offset=o, length=length),
            mm_hash=None,
        )
        for i, (o, length) in enumerate(images)
    ]
    params = SamplingParams(max_tokens=50, ignore_eos=True, extra_args=extra or None)
    return Request(rid, [1] * n, params, None, mm_features=feats or None)


def _step(sched, encoder: dict[str, list[int]] | None = None) -> dict[str, int]:
    """One scheduling step (scheduled tokens per request; the encoder inputs it schedules
    into ``encoder``); requests whose prompt is done sample one token."""
    from vllm.v1.outputs import ModelRunnerOutput

    out = sched.schedule()
    ids = list(out.num_scheduled_tokens)
    sampled = [[7] if _prompt_done(sched.requests[r]) else [] for r in ids]
    result = ModelRunnerOutput(
        req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)}, sampled_token_ids=sampled
    )
    sched.update_from_output(out, result)
    if encoder is not None:
        encoder.clear()
        encoder.update(out.scheduled_encoder_inputs)
    return dict(out.num_scheduled_tokens)


def _prompt_done(request) -> bool:
    return request.num_computed_tokens >= request.num_prompt_tokens


def _run(sched, requests, steps: int) -> list[dict[str, int]]:
    for r in requests:
        sched.add_request(r)
    return [_step(sched) for _ in range(steps)]


def _chunks(steps: list[dict[str, int]], rid: str) -> list[int]:
    return [s[rid] for s in steps if rid in s]


# routed prompt: 40 text tokens, an image of 30 at 40, a 30-token question (span 60 <= 64)
ROUTED = (100, [(40, 30)])


def test_config_hook_installs_the_scheduler_and_vllm_picks_the_async_variant(configs):
    from vllm_recroute.sched.scheduler import AsyncRoutedChunkScheduler, RoutedChunkScheduler

    for cfg in configs.values():
        assert cfg.scheduler_config.scheduler_cls == SCHEDULER_PATH
        assert cfg.scheduler_config.enable_chunked_prefill is True
        assert cfg.scheduler_config.max_num_batched_tokens == BUDGET
    assert type(_scheduler(configs["sync"])) is RoutedChunkScheduler
    assert type(_scheduler(configs["async"])) is AsyncRoutedChunkScheduler


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_routed_prompt_takes_its_span_in_one_step_and_text_still_chunks(configs, kind):
    steps = _run(_scheduler(configs[kind]), [_request("a", *ROUTED), _request("t", 200)], 6)
    # a: the text before its image, then the whole span, then decodes; t: chunked by what
    # is left of each step's budget
    assert _chunks(steps, "a") == [40, 60, 1, 1, 1, 1]
    assert _chunks(steps, "t") == [24, 4, 63, 63, 46, 1]


def test_plain_vllm_would_split_the_span(configs):
    """Guard: the case above is not vacuous."""
    from vllm.v1.core.sched.scheduler import Scheduler

    steps = _run(_scheduler(configs["sync"], Scheduler), [_request("a", *ROUTED)], 2)
    assert _chunks(steps, "a") == [64, 36]


def test_span_larger_than_a_step_chunks_as_in_vllm(configs):
    # span 110 > 64: no cut helps; the worker runs it unrouted and counts the fallback
    steps = _run(_scheduler(configs["sync"]), [_request("a", 150, [(40, 50)])], 3)
    assert _chunks(steps, "a") == [64, 64, 22]


def test_request_with_routing_off_chunks_as_in_vllm(configs):
    req = _request("a", *ROUTED, recroute_mode="off")
    assert _chunks(_run(_scheduler(configs["sync"]), [req], 2), "a") == [64, 36]


def test_two_images_go_in_the_same_step(configs):
    steps = _run(_scheduler(configs["sync"]), [_request("a", 90, [(30, 20), (55, 20)])], 2)
    assert _chunks(steps, "a") == [30, 60]


def test_image_at_the_start_waits_for_a_step_with_the_whole_span(configs):
    # t takes 40 of step 0's budget; a (span 50 from token 0) waits, then goes whole
    steps = _run(_scheduler(configs["sync"]), [_request("t", 40), _request("a", 50, [(0, 30)])], 3)
    assert steps[0] == {"t": 40}
    assert steps[1]["a"] == 50


def test_cut_request_is_served_first_at_its_next_step(configs):
    """Seven decoding requests ahead of it would leave 57 of 64 tokens each step: without
    the preference the routed request's 60-token span would wait for all their decodes."""
    texts = [_request(f"t{i}", 6) for i in range(7)]
    sched = _scheduler(configs["sync"])
    steps = _run(sched, [*texts, _request("a", *ROUTED)], 3)
    assert steps[0]["a"] == 22  # 64 - 42: text only, before the image
    assert steps[1]["a"] == 18  # would end inside the span (57 left): cut at the image
    assert steps[2]["a"] == 60  # first in line: the whole span
    assert sum(steps[2].values()) == BUDGET  # four decodes wait one step


def test_without_the_preference_the_span_would_wait(configs, monkeypatch):
    """Guard for the test above: the reordering is what serves it."""
    from vllm_recroute.sched.scheduler import RoutedChunkScheduler

    monkeypatch.setattr(RoutedChunkScheduler, "_serve_first", lambda self, ids: None)
    texts = [_request(f"t{i}", 6) for i in range(7)]
    steps = _run(_scheduler(configs["sync"]), [*texts, _request("a", *ROUTED)], 4)
    assert "a" not in steps[2] and "a" not in steps[3]


def test_encoder_budget_cut_inside_the_span_defers_the_whole_span(configs):
    """b's image takes 35 of a 50-embedding encoder budget; a's first image (10) would
    fit, its second (10) not: vLLM would stop a between its images (split span). a is not
    admitted with its text only (its whole prompt fits a step): it waits, then takes its
    whole prompt, both images, at the next step."""
    sched = _scheduler(configs["sync"])
    sched.max_num_encoder_input_tokens = 50
    sched._step_embeds = vllm_view.step_embed_limit(sched)
    sched.add_request(_request("b", 40, [(2, 35)]))
    sched.add_request(_request("a", 24, [(2, 10), (12, 10)]))
    encoder: dict[str, list[int]] = {}
    assert _step(sched, encoder) == {"b": 40}
    assert encoder == {"b": [0]}
    assert _step(sched, encoder)["a"] == 24
    assert encoder["a"] == [0, 1]


# routed prompt whose whole 50 tokens fit a step: 2 text tokens, an image of 30 at 2
SHORT_TEXT = (50, [(2, 30)])


def test_waiting_request_is_admitted_whole_not_with_its_text_only(configs):
    """t takes 40 of step 0's 64 tokens; a (50 tokens, its image at 2) would be admitted
    with its 2 text tokens and hold a place in ``running`` while its image waits. vLLM's
    admission check counts a's whole prompt against the free pool, but so does the next
    request admitted that way in the same step: over-admission, preemptions later (the KV
    capacity bench measured 2 with 24 requests). a waits and goes whole at step 1."""
    sched = _scheduler(configs["sync"])
    steps = _run(sched, [_request("t", 40), _request("a", *SHORT_TEXT)], 2)
    assert steps[0] == {"t": 40}
    assert sched.requests["a"].num_computed_tokens == 50
    assert steps[1]["a"] == 50


def test_without_admit_whole_the_text_would_be_admitted_alone(configs, monkeypatch):
    """Guard for the test above: the rule is what keeps a waiting."""
    monkeypatch.setattr(vllm_view, "is_waiting", lambda request: False)
    steps = _run(_scheduler(configs["sync"]), [_request("t", 40), _request("a", *SHORT_TEXT)], 2)
    assert steps[0] == {"t": 40, "a": 2}
    assert steps[1]["a"] == 48


def test_is_waiting_reads_vllm_request_status():
    from vllm.v1.request import RequestStatus

    req = _request("a", *SHORT_TEXT)
    assert req.status == RequestStatus.WAITING and vllm_view.is_waiting(req)
    req.status = RequestStatus.PREEMPTED
    assert vllm_view.is_waiting(req)
    req.status = RequestStatus.RUNNING
    assert not vllm_view.is_waiting(req)


def test_overridden_vllm_method_keeps_its_signature():
    """P11 overrides a private method: an upgrade that changes it must fail here."""
    from vllm.v1.core.sched.scheduler import Scheduler

    params = list(inspect.signature(Scheduler._try_schedule_encoder_inputs).parameters)
    assert params == [
        "self",
        "request",
        "num_computed_tokens",
        "num_new_tokens",
        "encoder_compute_budget",
        "shift_computed_tokens",
    ]


def test_scheduler_path_resolves_to_the_class():
    from vllm.utils.import_utils import resolve_obj_by_qualname

    from vllm_recroute.sched.scheduler import RoutedChunkScheduler

    assert resolve_obj_by_qualname(SCHEDULER_PATH) is RoutedChunkScheduler


def test_the_scheduler_shares_the_connectors_resolution_and_drops_it_at_finish(configs):
    """One resolution of a request's routing in the engine core: the scheduler's chunk rule
    and the connector's scheduler side read the same entry, dropped when it finishes."""
    from vllm.v1.request import RequestStatus

    from vllm_recroute import vllm_view
    from vllm_recroute.requests.resolution import RoutingResolver

    sched = _scheduler(configs["sync"])
    routings = sched._routings
    assert routings is sched.connector.request_routings
    _run(sched, [_request("a", *ROUTED, recroute_keep=0.25), _request("t", 20)], 1)
    first = routings.resolve(sched.requests["a"])
    assert first.cfg.keep == 0.25 and first is routings.resolve(sched.requests["a"])
    sched.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert "a" not in routings
    # without the plugin's connector the scheduler's own resolver drops it at its next step
    own = sched._routings = RoutingResolver(routings.base, vllm_view.scheduler_request_options)
    _run(sched, [_request("b", *ROUTED)], 1)
    assert "b" in own
    sched.finish_requests("b", RequestStatus.FINISHED_ABORTED)
    assert "b" in own
    _step(sched)
    assert "b" not in own and len(own) == 0

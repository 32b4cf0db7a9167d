"""The routed architectures beyond Idefics3 / PaliGemma, one tiny model each, on CPU.

Per architecture (module-scoped, one after the other): a plain vLLM engine (the
reference for keep = 1.0, and the source of the merged input embeddings and positions
the text-only reference starts from), one routed engine with ``kv_release`` and the
parked tier on (pdrop; per-request modes, schedules and budgets), and one
`vllm-recroute serve` process started the README's way (`--routing pdrop` plus the flags
the published checkpoint needs: `--trust-remote-code`; vLLM's startup profiling with its
largest dummy input, a video for Keye-VL and MiniCPM-V) driven with the openai client.

The reference (`reference/oracle.py`) runs the HF text model of the architecture
(transformers' Qwen3 for Keye-VL, Phi-3 for Phi-3-Vision, Qwen2 for MiniCPM-V 2.6) over
vLLM's own merged embeddings: routing lives in the decoder only, so the vision tower need not be
re-implemented for it, and what is checked is the decoder path (scores, compaction, KV
layout, positions, parking).
"""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from reference.oracle import oracle_generate, oracle_generate_parked
from tests.helpers import (
    CONFIGS,
    MAX_TOKENS,
    PARKING,
    REQUESTS,
    flush,
    generate,
    kv_usage,
    make_llm,
    pool_state,
    prom_counter,
    request_inputs,
    shutdown,
    xargs,
)
from vllm_recroute.config import RoutingConfig

pytestmark = pytest.mark.engine


@dataclass(frozen=True)
class Arch:
    routed: str  # routed architecture name
    decoder: str  # attribute path of the vLLM text model (its `.layers`) in the model
    mrope: bool  # 3-D M-RoPE positions
    engine_kwargs: dict = field(default_factory=dict)


_NO_VIDEO = {"image": 2, "video": 0}
ARCHS: dict[str, Arch] = {
    "keye": Arch(
        "RecrouteKeyeForConditionalGeneration",
        "language_model.model",
        mrope=True,
        engine_kwargs={"trust_remote_code": True, "limit_mm_per_prompt": _NO_VIDEO},
    ),
    "phi3v": Arch(
        "RecroutePhi3VForCausalLM",
        "language_model.model",
        mrope=False,
        engine_kwargs={"trust_remote_code": True},
    ),
    "minicpmv": Arch(
        "RecrouteMiniCPMV",
        "llm.model",
        mrope=False,
        engine_kwargs={"trust_remote_code": True, "limit_mm_per_prompt": _NO_VIDEO},
    ),
}

# released pages and the parked tier (re-routing every decode step) on one routed engine
ROUTED = {"mode": "reroute", "schedule": "pdrop", "kv_release": True, **PARKING}
# Mixed batches (request i routed with cfgs[i]). With kv_release the schedule is fixed
# per engine (its per-stage KV groups are built at startup): the fastv and custom
# schedules are checked over HTTP, on the server below.
BATCHES = {
    "off-reroute-remove": ["off", "pdrop-reroute", "pdrop-remove"],
    "block-avg-reroute": ["pdrop-reroute-keynorm-block", "pdrop-avg-tokens", "pdrop-reroute"],
}


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_dir(arch) -> Path:
    from vllm_recroute.tiny import cached_tiny_model

    return cached_tiny_model(arch)


@pytest.fixture(scope="module")
def plain(arch, model_dir):
    # no prefix caching: every prompt's layer-0 inputs are captured whole
    llm = make_llm(model_dir, routed_arch=None, enable_prefix_caching=False,
                   **ARCHS[arch].engine_kwargs)  # fmt: skip
    yield llm
    shutdown(llm)


@pytest.fixture(scope="module")
def routed(arch, model_dir):
    llm = make_llm(
        model_dir,
        routed_arch=ARCHS[arch].routed,
        recroute=ROUTED,
        block_size=32,
        disable_log_stats=False,
        **ARCHS[arch].engine_kwargs,
    )
    yield llm
    # Its last requests' parked units are freed at the next step: run one, so this
    # engine's pool gauges end at 0 in the process-wide Prometheus registry, which later
    # modules' tests sum over (tests/engine/test_parking.py, test_tensor_parallel.py).
    flush(llm)
    shutdown(llm)


@pytest.fixture(scope="module")
def text_model(arch, model_dir):
    """The architecture's text model in transformers (eager attention)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=True)
    if arch == "minicpmv":  # HF Qwen2 over the checkpoint's `llm.` weights
        from safetensors.torch import load_file
        from transformers import Qwen2ForCausalLM

        config._attn_implementation = "eager"
        model = Qwen2ForCausalLM(config)
        weights = load_file(str(model_dir / "model.safetensors"))
        model.load_state_dict(
            {k.removeprefix("llm."): v for k, v in weights.items() if k.startswith("llm.")}
        )
        return model.float().eval()
    if arch == "keye":
        from transformers import Qwen3ForCausalLM as cls
    elif arch == "phi3v":
        from transformers import Phi3ForCausalLM as cls
    model = cls.from_pretrained(
        str(model_dir), config=config, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def _capture(llm, decoder: str, prompt: dict) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(prompt ids, positions, hidden states entering decoder layer 0) of the prefill of
    ``prompt``."""
    from vllm import SamplingParams

    def install(worker):
        layer = operator.attrgetter(decoder)(worker.model_runner.model).layers[0]
        seen: list = []

        def hook(_module, args):
            seen.append((args[0].detach().clone(), args[1].detach().clone()))

        worker._recroute_capture = (layer.register_forward_pre_hook(hook), seen)

    def collect(worker):
        handle, seen = worker._recroute_capture
        handle.remove()
        positions, hidden = seen[0]
        return positions.tolist(), hidden.float().tolist()  # plain lists cross the RPC

    llm.collective_rpc(install)
    [out] = llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)
    positions, hidden = llm.collective_rpc(collect)[0]
    return list(out.prompt_token_ids), torch.tensor(positions), torch.tensor(hidden)


@pytest.fixture(scope="module")
def captured(arch, plain, model_dir) -> dict[int, dict]:
    """Per request of REQUESTS: the reference's inputs (ids, merged embeddings, positions)."""
    out = {}
    for i, spec in enumerate(REQUESTS):
        text, images = request_inputs(str(model_dir), spec)
        prompt = {"prompt": text, "multi_modal_data": {"image": images}}
        ids, positions, embeds = _capture(plain, ARCHS[arch].decoder, prompt)
        n = len(ids)
        assert embeds.shape[0] >= n
        out[i] = {
            "input_ids": torch.tensor([ids]),
            "inputs_embeds": embeds[:n].float(),
            "positions": positions[..., :n].long(),
        }
    return out


def _reference(text_model, inputs: dict, cfg: dict) -> list[int]:
    """Greedy tokens of the routing oracle (parked units never restored: ``cfg`` has
    ``reroute_every`` 0, so parking must change nothing)."""
    return oracle_generate(text_model, inputs, RoutingConfig.from_dict(cfg), MAX_TOKENS)


def _tokens(outs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize("batch", list(BATCHES))
def test_mixed_batch_matches_reference(routed, text_model, captured, model_dir, batch):
    # parked but never swapped back (re-routing: the test below): the oracle's tokens
    cfgs = [{**CONFIGS[name], "reroute_every": 0} for name in BATCHES[batch]]
    parked = prom_counter("recroute:parked_blocks")
    released = prom_counter("recroute:kv_blocks_released")
    outs = generate(routed, model_dir, cfgs)
    for i, (cfg, out) in enumerate(zip(cfgs, outs, strict=True)):
        assert out.prompt_token_ids == captured[i]["input_ids"][0].tolist()
        assert list(out.outputs[0].token_ids) == _reference(text_model, captured[i], cfg), (
            batch,
            i,
        )
    flush(routed)
    assert prom_counter("recroute:parked_blocks") > parked  # the parked tier is on
    # kv_release is on: the deferred tokens' pages went back to vLLM's pool
    assert prom_counter("recroute:kv_blocks_released") > released


def test_parked_tier_restores_as_the_reference(routed, text_model, captured, model_dir):
    """Decode-time re-routing every step: the tokens and the restores of the
    never-parked reference."""
    cfg = CONFIGS["pdrop-reroute"]
    before = prom_counter("recroute:restored_blocks")
    restored = 0
    outs = generate(routed, model_dir, [cfg] * len(REQUESTS))
    for i, out in enumerate(outs):
        routing = RoutingConfig.from_dict({**cfg, **PARKING})
        tokens, n = oracle_generate_parked(text_model, captured[i], routing, MAX_TOKENS)
        assert list(out.outputs[0].token_ids) == tokens
        restored += n
    flush(routed)
    assert restored > 0  # decode-time re-routing swapped units back from the pool
    assert prom_counter("recroute:restored_blocks") - before == restored
    # swaps inside the compacted rows leave no page or pool entry behind
    assert routed.collective_rpc(pool_state) == [(0, 0, 0)]
    assert kv_usage(routed) == 0.0


def _logprobs(out) -> list[float]:
    o = out.outputs[0]
    return [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs, strict=True)]


def test_keep_one_equals_plain_vllm(routed, plain, model_dir):
    full = generate(routed, model_dir, [{"mode": "reroute", "keep": 1.0}] * len(REQUESTS))
    ref = generate(plain, model_dir, [{}] * len(REQUESTS))
    assert _tokens(full) == _tokens(ref)
    for r, p in zip(full, ref, strict=True):
        assert _logprobs(r) == pytest.approx(_logprobs(p), abs=1e-4)
    # and below the full budget routing changes the output (the path really routes)
    low = generate(routed, model_dir, [{"mode": "reroute", "keep": 0.25}] * len(REQUESTS))
    assert any(
        _logprobs(r) != pytest.approx(_logprobs(p), abs=1e-4) for r, p in zip(low, ref, strict=True)
    )


def _mrope_positions(ids: list[int], image_token_id: int, grids: list[tuple[int, int]]):
    """Qwen2-VL-style M-RoPE positions, computed here from the image grids: text runs
    on at one past the largest position so far (all three rows equal), an image's
    tokens get (t, h, w) = start + (0, row, column) of its merged grid."""
    rows: list[list[int]] = [[], [], []]
    nxt, i, images = 0, 0, iter(grids)
    while i < len(ids):
        if ids[i] != image_token_id:
            for r in rows:
                r.append(nxt)
            nxt, i = nxt + 1, i + 1
            continue
        gh, gw = next(images)
        for h in range(gh):
            for w in range(gw):
                rows[0].append(nxt)
                rows[1].append(nxt + h)
                rows[2].append(nxt + w)
        nxt, i = nxt + max(gh, gw), i + gh * gw
    return torch.tensor(rows)


def test_positions_are_the_models(arch, captured, model_dir):
    """The reference starts from the positions vLLM gives layer 0: for an M-RoPE model
    they are 3-D and follow the M-RoPE rule; otherwise 0..n-1."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=True)
    for i, spec in enumerate(REQUESTS):
        got = captured[i]["positions"]
        ids = captured[i]["input_ids"][0].tolist()
        if not ARCHS[arch].mrope:
            assert got.tolist() == list(range(len(ids)))
            continue
        merge = config.vision_config.spatial_merge_size
        patch = config.vision_config.patch_size
        size = spec[1]  # square test images, resized to multiples of patch * merge
        side = size // (patch * merge)
        expected = _mrope_positions(ids, config.image_token_id, [(side, side)])
        assert got.shape == (3, len(ids))
        assert torch.equal(got, expected)
        assert not torch.equal(got[1], got[2])  # really 3-D: rows and columns differ


def test_positions_survive_compaction(routed, text_model, captured, model_dir):
    """Guard: the same routed engine with compaction renumbering the active rows'
    positions (as if they were their compacted KV slots) no longer matches the
    reference, so the equality above depends on positions surviving the gather."""
    cfg = {**CONFIGS["pdrop-reroute"], "reroute_every": 0}

    def break_positions(worker):
        # the gather of a segment's active rows (worker/segments.py, once per segment)
        import vllm_recroute.worker.segments as step

        original = step.take_positions

        def renumbered(positions, rows):
            kept = original(positions, rows)
            first = kept[..., :1]
            return first + torch.arange(rows.numel(), device=kept.device)

        worker._recroute_take_positions = original
        step.take_positions = renumbered

    def restore(worker):
        import vllm_recroute.worker.segments as step

        step.take_positions = worker._recroute_take_positions

    routed.collective_rpc(break_positions)
    try:
        broken = _tokens(generate(routed, model_dir, [cfg] * len(REQUESTS)))
    finally:
        routed.collective_rpc(restore)
    expected = [_reference(text_model, captured[i], cfg) for i in range(len(REQUESTS))]
    assert broken != expected
    assert _tokens(generate(routed, model_dir, [cfg] * len(REQUESTS))) == expected


# ------------------------------------------------------------------ over HTTP

# vLLM's largest dummy input for these is a video (its log line names the modality)
PROFILED_WITH_VIDEO = ("keye", "minicpmv")


@pytest.fixture(scope="module", autouse=True)
def _server_launch(request, arch, model_dir, tmp_path_factory):
    """The README's serve of this architecture (tests/e2e/test_tiny_models.py starts the
    other architectures so), started with the module's first test of the architecture when
    this run has HTTP tests for it, so that its startup overlaps the engine tests."""
    from tests.e2e.helpers import README_HARNESS_FLAGS, Launch, readme_flags

    wanted = any(
        "server" in item.fixturenames and getattr(item, "callspec", None) is not None
        and item.callspec.params.get("arch") == arch
        for item in request.session.items
    )  # fmt: skip
    if not wanted:
        yield None
        return
    log = Path(tmp_path_factory.mktemp(f"serve-{arch}")) / "server.log"
    launch = Launch(model_dir, log, None, readme_flags(model_dir) + README_HARNESS_FLAGS)
    yield launch
    launch.stop()


@pytest.fixture(scope="module")
def server(_server_launch):
    """Compute-only pdrop as the server default (the README's), which each request below
    overrides whole."""
    return _server_launch.ready()


def test_served_the_readme_way(arch, server, model_dir):
    from tests.e2e.helpers import messages, post_chat, readme_flags

    assert "--trust-remote-code" in readme_flags(model_dir)  # config and processors are remote
    response = post_chat(server["base"], {"messages": messages()})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] is not None
    if arch in PROFILED_WITH_VIDEO:  # the startup path the README way takes was taken
        assert "video items of the maximum feature size" in server["log"].read_text()


@pytest.mark.parametrize(
    "name",
    [
        "fastv-reroute",
        "fastv-remove",
        "off",
        "pdrop-reroute-keynorm-block",
        "pdrop-avg-tokens",
        "custom-reroute-question",
    ],
)
def test_served_with_an_image_matches_reference(server, text_model, captured, model_dir, name):
    from openai import OpenAI

    from tests.e2e.helpers import image_data_url
    from vllm_recroute.tiny import make_test_image

    seeds, size, question = REQUESTS[0]
    client = OpenAI(base_url=server["base"] + "/v1", api_key="none", max_retries=0)
    content = [
        {
            "type": "image_url",
            "image_url": {"url": image_data_url(make_test_image(seeds[0], size))},
        },
        {"type": "text", "text": question},
    ]
    resp = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": content}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={
            "ignore_eos": True,
            "return_token_ids": True,
            # vllm_xargs takes scalars only: list options travel as JSON text
            "vllm_xargs": {
                k: json.dumps(v) if isinstance(v, list) else v
                for k, v in xargs(CONFIGS[name]).items()
            },
        },
    )
    data = resp.model_dump()
    assert data["prompt_token_ids"] == captured[0]["input_ids"][0].tolist()
    expected = oracle_generate(
        text_model, captured[0], RoutingConfig.from_dict(CONFIGS[name]), MAX_TOKENS
    )
    assert data["choices"][0]["token_ids"] == expected, name

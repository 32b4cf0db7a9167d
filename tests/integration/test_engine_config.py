"""The config hook: what a routed architecture changes in vLLM's engine config, and what
it refuses at startup. Builds VllmConfig in-process (no engine, a few seconds each)."""

from __future__ import annotations

import pytest

from tests.helpers import ROUTED_IDEFICS3


def _engine_config(model, arch: str | None, recroute=None, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    args = dict(model=str(model), max_model_len=1024, enable_prefix_caching=True, **kwargs)
    if arch:
        args["hf_overrides"] = {"architectures": [arch]}
    if recroute is not None:
        args["additional_config"] = {"recroute": recroute}
    return EngineArgs(**args).create_engine_config()


def test_routed_arch_turns_off_prefix_caching_keeps_chunking(tiny_idefics3):
    cfg = _engine_config(
        tiny_idefics3, ROUTED_IDEFICS3, {"schedule": "pdrop"}, max_num_batched_tokens=64
    )

    from vllm_recroute.sched import SCHEDULER_PATH

    assert cfg.cache_config.enable_prefix_caching is False
    # chunked_prefill "routed" (default): vLLM's chunking, routed prompts aligned (sched/)
    assert cfg.scheduler_config.enable_chunked_prefill is True
    assert cfg.scheduler_config.max_num_batched_tokens == 64
    assert cfg.scheduler_config.scheduler_cls == SCHEDULER_PATH


def test_chunked_prefill_off_keeps_prompts_whole(tiny_idefics3):
    cfg = _engine_config(
        tiny_idefics3,
        ROUTED_IDEFICS3,
        {"chunked_prefill": "off"},
        enable_chunked_prefill=True,
        max_num_batched_tokens=64,
    )
    assert cfg.scheduler_config.enable_chunked_prefill is False
    assert cfg.scheduler_config.max_num_batched_tokens >= 1024
    assert cfg.scheduler_config.scheduler_cls is None


def test_own_scheduler_class_is_kept_with_a_warning(tiny_idefics3, caplog):
    mine = "vllm.v1.core.sched.scheduler.Scheduler"
    with caplog.at_level("WARNING", logger="vllm_recroute"):
        cfg = _engine_config(tiny_idefics3, ROUTED_IDEFICS3, {}, scheduler_cls=mine)
    assert cfg.scheduler_config.scheduler_cls == mine
    assert "split by chunked prefill run unrouted" in caplog.text


def test_kv_release_keeps_prefix_caching(tiny_idefics3):
    # per-stage groups let routed stages cache only text before the first image
    cfg = _engine_config(tiny_idefics3, ROUTED_IDEFICS3, {"schedule": "pdrop", "kv_release": True})
    assert cfg.cache_config.enable_prefix_caching is True


def test_parked_tier_refuses_quantized_kv_cache(tiny_idefics3):
    with pytest.raises(ValueError, match=r"recroute\.parked_bytes: .*unquantized KV cache"):
        _engine_config(
            tiny_idefics3, ROUTED_IDEFICS3, {"parked_bytes": 1 << 20}, kv_cache_dtype="fp8"
        )


def test_plain_architecture_untouched_by_plugin(tiny_idefics3):
    cfg = _engine_config(tiny_idefics3, None)
    assert cfg.cache_config.enable_prefix_caching is True


@pytest.mark.parametrize(
    ("recroute", "field", "words"),
    [
        ({"mode": "on"}, "recroute.mode", "off, reroute, remove"),
        ({"schedule": "fastv", "keep": 1.5}, "recroute.keep", "(0, 1]"),
        ({"schedule": "sparse"}, "recroute.schedule", "fastv, pdrop, custom"),
        ({"chunked_prefill": "on"}, "recroute.chunked_prefill", "routed, off"),
        ({"chunked_prefill": "fallback"}, "recroute.chunked_prefill", "former 'fallback'"),
        ({"kep": 0.5}, "recroute.kep", "keep"),
    ],
)
def test_invalid_config_is_a_startup_error_naming_the_field(tiny_idefics3, recroute, field, words):
    # vLLM's pydantic VllmConfig wraps the hook's error; the message must survive intact.
    with pytest.raises(ValueError) as info:
        _engine_config(tiny_idefics3, ROUTED_IDEFICS3, recroute)
    assert f"{field}: " in str(info.value)
    assert words in str(info.value)


def test_mm_prefix_models_refuse_routing(tiny_paligemma):
    from tests.helpers import ROUTED_PALIGEMMA

    with pytest.raises(ValueError, match=r"recroute\.mode: .*multimodal-prefix"):
        _engine_config(
            tiny_paligemma,
            None,
            {"mode": "reroute"},
            hf_overrides={"architectures": [ROUTED_PALIGEMMA], "is_mm_prefix_lm": True},
        )
    # Off stays possible (plain model behaviour).
    _engine_config(
        tiny_paligemma,
        None,
        {"mode": "off"},
        hf_overrides={"architectures": [ROUTED_PALIGEMMA], "is_mm_prefix_lm": True},
    )


def test_speculative_decoding_refused_with_routing(tiny_idefics3):
    spec = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}
    with pytest.raises(ValueError, match=r"recroute\.mode: .*speculative"):
        _engine_config(tiny_idefics3, ROUTED_IDEFICS3, {"mode": "reroute"}, speculative_config=spec)


def test_pipeline_parallelism_is_refused_with_the_reason(tiny_idefics3):
    from vllm.config import ParallelConfig, VllmConfig

    from vllm_recroute.engine_setup import apply_routing_requirements

    cfg = _engine_config(tiny_idefics3, ROUTED_IDEFICS3, {"schedule": "pdrop"})
    pp = VllmConfig.__new__(VllmConfig)  # the hook only reads these sections
    pp.__dict__.update(cfg.__dict__, parallel_config=ParallelConfig(pipeline_parallel_size=2))
    with pytest.raises(ValueError, match=r"--pipeline-parallel-size must be 1"):
        apply_routing_requirements(pp)


@pytest.fixture
def triton_host(monkeypatch):
    """A host where vLLM would pick Model Runner V2 (every CUDA host has Triton)."""
    import vllm.config.vllm as vllm_config_module

    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", True)
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)


def test_routed_archs_select_the_v1_runner_on_a_triton_host(tiny_idefics3, triton_host):
    import vllm_recroute

    vllm_recroute.register()
    plain = _engine_config(tiny_idefics3, None)
    assert plain.use_v2_model_runner  # guard: this host would give plain vLLM V2
    routed = _engine_config(tiny_idefics3, ROUTED_IDEFICS3, {"schedule": "pdrop"})
    assert routed.use_v2_model_runner is False


def test_forcing_v2_for_a_routed_arch_is_a_startup_error_naming_the_setting(
    tiny_idefics3, triton_host, monkeypatch
):
    import vllm_recroute

    vllm_recroute.register()
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(ValueError, match=r"vllm-recroute routed architectures.*VLLM_USE_V2"):
        _engine_config(tiny_idefics3, ROUTED_IDEFICS3, {"schedule": "pdrop"})


def test_routed_arch_keeps_vllms_default_compilation(tiny_idefics3):
    from vllm.config import CompilationMode

    plain = _engine_config(tiny_idefics3, None)
    routed = _engine_config(tiny_idefics3, ROUTED_IDEFICS3, {"schedule": "pdrop"})
    # vLLM CPU's default (DYNAMO_TRACE_ONCE + inductor), not forced eager
    assert plain.compilation_config.mode == CompilationMode.DYNAMO_TRACE_ONCE
    assert routed.compilation_config.mode == plain.compilation_config.mode
    assert routed.compilation_config.backend == plain.compilation_config.backend
    assert routed.model_config.enforce_eager is False
    eager = _engine_config(
        tiny_idefics3, ROUTED_IDEFICS3, {"schedule": "pdrop"}, enforce_eager=True
    )
    assert eager.compilation_config.mode == CompilationMode.NONE  # still the user's choice


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, "PIECEWISE"),  # unset: vLLM would default to FULL_AND_PIECEWISE on CUDA
        ("FULL_AND_PIECEWISE", "PIECEWISE"),
        ("FULL_DECODE_ONLY", "NONE"),
        ("FULL", "NONE"),
        ("PIECEWISE", "PIECEWISE"),
        ("NONE", "NONE"),
    ],
)
def test_cuda_graphs_stay_piecewise(given, expected):
    """Full CUDA graphs would replay baked attention metadata; a routed stage installs
    its own per layer (CUDA hosts; the CPU platform turns graphs off anyway)."""
    from types import SimpleNamespace

    from vllm.config.compilation import CUDAGraphMode

    from vllm_recroute.engine_setup import _keep_graphs_piecewise

    comp = SimpleNamespace(cudagraph_mode=None if given is None else CUDAGraphMode[given])
    _keep_graphs_piecewise(SimpleNamespace(compilation_config=comp))
    assert comp.cudagraph_mode == CUDAGraphMode[expected]


# ------------------------------------------------------------------ refused GPU-host settings


def _routed_config_with(model, **sections):
    """A routed config (built once through the hook) with ``sections`` replaced, for the
    hook to check again (it only reads these sections)."""
    import copy

    from vllm.config import VllmConfig

    cfg = _engine_config(model, ROUTED_IDEFICS3, {"schedule": "pdrop"})
    out = VllmConfig.__new__(VllmConfig)
    out.__dict__.update(cfg.__dict__)
    for name, changes in sections.items():
        section = copy.deepcopy(getattr(cfg, name))
        for key, value in changes.items():
            setattr(section, key, value)
        out.__dict__[name] = section
    return out


def _refusal(vllm_config) -> str:
    from vllm_recroute.engine_setup import RefusedSettingError, apply_routing_requirements

    with pytest.raises(RefusedSettingError) as info:
        apply_routing_requirements(vllm_config)
    return str(info.value)


def test_breakable_cudagraphs_are_refused(tiny_idefics3, monkeypatch):
    monkeypatch.setenv("VLLM_USE_BREAKABLE_CUDAGRAPH", "1")
    with pytest.raises(ValueError, match=r"VLLM_USE_BREAKABLE_CUDAGRAPH: .*=0"):
        _engine_config(tiny_idefics3, ROUTED_IDEFICS3, {"schedule": "pdrop"})
    _engine_config(tiny_idefics3, ROUTED_IDEFICS3, {"mode": "off"})  # unrouted: allowed


def test_inductor_graph_partition_is_refused(tiny_idefics3):
    cfg = _routed_config_with(
        tiny_idefics3, compilation_config={"use_inductor_graph_partition": True}
    )
    assert "compilation_config.use_inductor_graph_partition: " in _refusal(cfg)


@pytest.mark.parametrize(
    "fusion", ["fuse_rope_kvcache", "fuse_qk_norm_rope_kvcache", "fuse_rope_kvcache_cat_mla"]
)
def test_rope_kv_cache_fusions_are_refused(tiny_idefics3, fusion):
    import copy

    cfg = _routed_config_with(tiny_idefics3)
    comp = copy.deepcopy(cfg.compilation_config)
    setattr(comp.pass_config, fusion, True)
    cfg.__dict__["compilation_config"] = comp
    assert f"compilation_config.pass_config.{fusion}: " in _refusal(cfg)


def test_unset_kv_write_fusions_are_pinned_off(tiny_idefics3):
    from vllm_recroute.engine_setup import KV_WRITE_FUSIONS

    comp = _engine_config(tiny_idefics3, ROUTED_IDEFICS3, {}).compilation_config
    assert comp.use_inductor_graph_partition is False
    assert all(getattr(comp.pass_config, name) is False for name in KV_WRITE_FUSIONS)


@pytest.mark.parametrize(
    ("changes", "setting"),
    [
        ({"enable_dbo": True}, "parallel_config.enable_dbo"),
        ({"ubatch_size": 2}, "parallel_config.enable_dbo"),
        ({"decode_context_parallel_size": 2}, "parallel_config.decode_context_parallel_size"),
        ({"prefill_context_parallel_size": 2}, "parallel_config.prefill_context_parallel_size"),
    ],
)
def test_micro_batching_and_context_parallelism_are_refused(tiny_idefics3, changes, setting):
    cfg = _routed_config_with(tiny_idefics3, parallel_config=changes)
    message = _refusal(cfg)
    assert f"{setting}: " in message
    flag = "--enable-dbo" if "dbo" in setting else "-".join(setting.split(".")[1].split("_"))
    assert flag in message


def test_refusals_only_apply_while_routing(tiny_idefics3):
    from vllm_recroute.engine_setup import apply_routing_requirements

    cfg = _routed_config_with(tiny_idefics3, parallel_config={"enable_dbo": True})
    cfg.additional_config = {"recroute": {"mode": "off"}}
    apply_routing_requirements(cfg)


def test_expandable_segments_get_the_plugins_error(tiny_idefics3, monkeypatch):
    # vLLM would refuse it later blaming "KV connector RecrouteConnector"; ours comes first
    # and applies with routing off too (the connector is installed either way).
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    for recroute in ({"schedule": "pdrop"}, {"mode": "off"}):
        with pytest.raises(ValueError, match=r"PYTORCH_CUDA_ALLOC_CONF: .*remove"):
            _engine_config(tiny_idefics3, ROUTED_IDEFICS3, recroute)


def test_sleep_mode_is_refused_for_routed_architectures(tiny_idefics3, monkeypatch):
    """Sleep mode discards or remaps the KV cache routing state points into: refused with
    the setting's name for a routed architecture (any request may route, so with the
    server's mode off too), allowed for the plain one. The CPU platform has no sleep mode,
    so the test lends it one (the refusal is ours, not the platform's)."""
    from vllm.platforms import current_platform

    from vllm_recroute.connector.connector import RecrouteConnector

    monkeypatch.setattr(type(current_platform), "is_sleep_mode_available", lambda self: True)
    for recroute in ({"schedule": "pdrop"}, {"mode": "off"}):
        with pytest.raises(ValueError, match=r"enable_sleep_mode: .*routed architectures"):
            _engine_config(tiny_idefics3, ROUTED_IDEFICS3, recroute, enable_sleep_mode=True)
    _engine_config(tiny_idefics3, None, None, enable_sleep_mode=True)  # plain: vLLM's own
    assert RecrouteConnector.supports_sleep_mode(None) is False  # vLLM 0.33's hook

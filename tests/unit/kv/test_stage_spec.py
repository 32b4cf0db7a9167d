"""RoutedStageSpec: registration and how vLLM 0.32 forms KV-cache groups from it."""

from __future__ import annotations

import pytest
import torch
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from vllm_recroute.kv.manager import RoutedStageManager, register_stage_spec
from vllm_recroute.kv.spec import RoutedStageSpec, check_stage_groups, stage_spec_from

BASE = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float32)


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_stage_spec()


@pytest.fixture(scope="module")
def vllm_config():
    from vllm.config import VllmConfig

    config = VllmConfig()
    config.cache_config.kv_cache_layout = "LBHNC"  # resolved by the engine core normally
    config.scheduler_config.disable_hybrid_kv_cache_manager = False
    return config


def layer(i: int) -> str:
    return f"model.layers.{i}.self_attn.attn"


def stage_specs(stages: list[int]) -> dict[str, FullAttentionSpec]:
    return {layer(i): stage_spec_from(BASE, s) for i, s in enumerate(stages)}


def test_registration_is_idempotent_and_keeps_builtins():
    register_stage_spec()
    register_stage_spec()
    spec = stage_spec_from(BASE, 1)
    assert KVCacheSpecRegistry.get_manager_class(spec) is RoutedStageManager
    assert KVCacheSpecRegistry.get_uniform_type_base_spec(spec) is RoutedStageSpec
    # the built-in specs were registered before ours (the registry only self-populates
    # while empty)
    assert KVCacheSpecRegistry.get_manager_class(BASE) is FullAttentionManager


def test_stage_spec_keeps_the_layout_of_the_layer():
    spec = stage_spec_from(BASE, 2)
    assert spec.stage == 2
    assert spec.page_size_bytes == BASE.page_size_bytes
    assert spec.block_size == BASE.block_size
    assert spec.prefix_cacheable  # stays in the hybrid hit minimum (reports 0 hits)


def test_stage_spec_refuses_non_full_attention_layers():
    swa = SlidingWindowSpec(
        block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float32, sliding_window=8
    )
    with pytest.raises(ValueError, match="plain FullAttentionSpec"):
        stage_spec_from(swa, 1)
    with pytest.raises(ValueError, match="plain FullAttentionSpec"):
        stage_spec_from(stage_spec_from(BASE, 1), 2)
    with pytest.raises(ValueError, match="stage must be"):
        RoutedStageSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float32, stage=-1)


def test_merge_same_stage_only():
    a, b = stage_spec_from(BASE, 1), stage_spec_from(BASE, 1)
    merged = RoutedStageSpec.merge([a, b])
    assert isinstance(merged, RoutedStageSpec) and merged.stage == 1
    with pytest.raises(AssertionError, match="different routing stages"):
        RoutedStageSpec.merge([a, stage_spec_from(BASE, 2)])
    with pytest.raises(AssertionError):
        RoutedStageSpec.merge([a, BASE])


def test_block_table_row_has_room_for_released_holes(vllm_config):
    spec = stage_spec_from(BASE, 1)
    assert BASE.max_num_blocks_per_req(vllm_config, 1024) == 64
    assert spec.max_num_blocks_per_req(vllm_config, 1024) == 2 * 64 + 1


@pytest.mark.parametrize(
    ("stages", "expected"),
    [
        # pdrop-like: equal stages -> one group per stage
        ([0, 0, 1, 1, 2, 2], [(0, [0, 1]), (1, [2, 3]), (2, [4, 5])]),
        # fastv-like 2 + 6: vLLM makes every group 2 layers; stage 1 spans 3 groups
        ([0, 0, 1, 1, 1, 1, 1, 1], [(0, [0, 1]), (1, [2, 5]), (1, [3, 6]), (1, [4, 7])]),
        # 3 + 7: groups of 3 layers, stage 1 padded (vLLM warns about the waste)
        (
            [0, 0, 0, 1, 1, 1, 1, 1, 1, 1],
            [(0, [0, 1, 2]), (1, [3, 6, 9]), (1, [4, 7]), (1, [5, 8])],
        ),
    ],
)
def test_vllm_forms_one_group_set_per_stage(vllm_config, stages, expected):
    from vllm_recroute.vllm_view.compat import get_kv_cache_groups

    groups = get_kv_cache_groups(vllm_config, stage_specs(stages))
    got = [(g.kv_cache_spec.stage, [int(n.split(".")[2]) for n in g.layer_names]) for g in groups]
    assert got == expected
    assert all(type(g.kv_cache_spec) is RoutedStageSpec for g in groups)
    by_stage = check_stage_groups(groups, {layer(i): s for i, s in enumerate(stages)})
    assert sorted(by_stage) == sorted(set(stages))


def test_a_plain_first_layer_collapses_all_groups(vllm_config):
    """Why stage 0 layers must report RoutedStageSpec too: FullAttentionSpec.merge accepts
    the subclass, and vLLM then builds one group; the startup guard catches it."""
    from vllm_recroute.vllm_view.compat import get_kv_cache_groups

    stages = [0, 0, 1, 1]
    specs = stage_specs(stages)
    specs[layer(0)] = specs[layer(1)] = BASE
    groups = get_kv_cache_groups(vllm_config, specs)
    assert len(groups) == 1
    with pytest.raises(ValueError, match="mixes routing stages"):
        check_stage_groups(groups, {layer(i): s for i, s in enumerate(stages)})


def test_stage_groups_need_the_hybrid_kv_cache_manager():
    """With HMA disabled (e.g. by a KV connector that does not implement SupportsHMA),
    vLLM tries to unify all specs into one type and fails at startup: loud, not silent."""
    from vllm.config import VllmConfig

    from vllm_recroute.vllm_view.compat import get_kv_cache_groups

    config = VllmConfig()
    config.cache_config.kv_cache_layout = "LBHNC"
    config.scheduler_config.disable_hybrid_kv_cache_manager = True
    with pytest.raises(ValueError, match="Failed to promote"):
        get_kv_cache_groups(config, stage_specs([0, 0, 1, 1]))

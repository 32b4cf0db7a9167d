"""KV-cache spec of a routing stage (scheduler and worker side, no torch state).

Every decoder layer of a routed model reports a :class:`RoutedStageSpec` carrying the index
of its routing stage (stage 0 included). vLLM forms KV-cache groups from per-layer specs
(`get_kv_cache_groups`: `vllm/v1/core/kv_cache_planning.py` in 0.33, `kv_cache_utils.py` in
0.32; `vllm_view.compat` finds it in either); two specs of different stages
refuse to merge (:meth:`RoutedStageSpec.merge`) and are not "uniform type"
(:meth:`RoutedStageSpec.is_uniform_with_collection`), so each stage gets its own group(s),
its own block table and its own :class:`~vllm_recroute.kv.manager.RoutedStageManager`,
all on the one shared ``BlockPool`` (registered with vLLM by
``kv.manager.register_stage_spec``). See ``docs/parked_tier.md`` for the full design.

Why *every* layer, stage 0 included: if the first layer reported a plain
``FullAttentionSpec``, ``FullAttentionSpec.merge`` would accept the stage specs (they are
subclasses with equal ``AttentionSpec`` fields) and vLLM would put all layers in one group.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec, KVCacheSpec

__all__ = [
    "RoutedStageSpec",
    "check_stage_groups",
    "stage_spec_from",
]


@dataclass(frozen=True, kw_only=True)
class RoutedStageSpec(FullAttentionSpec):
    """Full attention over a request's *compacted* token sequence at one routing stage.

    Layout is exactly ``FullAttentionSpec`` (same page size, same worker-side tensors and
    attention backends); only block management differs (see ``RoutedStageManager``).
    """

    stage: int = 0
    """Routing stage of the layer; 0 = layers before the first router point."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stage < 0:
            raise ValueError(f"stage must be >= 0, got {self.stage}")
        if self.sliding_window is not None or self.attention_chunk_size is not None:
            raise ValueError("routed stages support full attention layers only")

    # Grouping ---------------------------------------------------------------------------

    @classmethod
    def merge(cls, specs: list[Any]) -> RoutedStageSpec:
        """Merge specs of one group; raises ``AssertionError`` (what vLLM's grouping code
        catches, `is_kv_cache_spec_uniform` and
        `_get_kv_cache_groups_uniform_page_size`, in 0.33's `kv_cache_planning.py`, 0.32's
        `kv_cache_utils.py`) when stages or types differ."""
        assert all(isinstance(s, RoutedStageSpec) for s in specs), (
            "a routed-stage KV cache group holds RoutedStageSpec layers only"
        )
        stages = {s.stage for s in specs}
        assert len(stages) == 1, f"layers of different routing stages {sorted(stages)}"
        merged = super().merge(specs)  # FullAttentionSpec checks; drops `stage`
        return replace(merged, stage=stages.pop())

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        """Only layers of the same stage may share one ``UniformTypeKVCacheSpecs`` group
        (`kv_cache_interface.py:UniformTypeKVCacheSpecs.is_uniform_type` asks the first
        layer's spec)."""
        return all(
            isinstance(s, RoutedStageSpec) and s.stage == self.stage
            for s in kv_cache_specs.values()
        )

    # Block table --------------------------------------------------------------------------

    def max_num_blocks_per_req(self, vllm_config: Any, max_len: int) -> int:
        """Worker block-table row width. A stage group's row is append-only on the worker
        while released tail blocks leave holes in it (see `RoutedStageManager`): at most
        ``cdiv(max_len, block_size)`` live entries plus as many released ones, plus one
        for a partial block at the release point."""
        return 2 * super().max_num_blocks_per_req(vllm_config, max_len) + 1


def stage_spec_from(spec: KVCacheSpec, stage: int) -> RoutedStageSpec:
    """The stage spec for a layer whose attention module reported ``spec``.

    Only plain ``FullAttentionSpec`` layers can be routed (no MLA, sink, sliding window,
    chunked-local: their managers or kernels have their own block semantics).
    """
    if type(spec) is not FullAttentionSpec:
        raise ValueError(
            f"routed stages need plain FullAttentionSpec layers, got {type(spec).__name__}"
        )
    values = {f.name: getattr(spec, f.name) for f in fields(spec) if f.init}
    return RoutedStageSpec(**values, stage=stage)


def check_stage_groups(
    groups: Iterable[KVCacheGroupSpec], stage_of_layer: Mapping[str, int]
) -> dict[int, list[int]]:
    """Startup guard for the engine integration: every routed layer sits in a group of its
    own stage. Returns ``stage -> [group ids]`` (a stage may span several groups because
    vLLM gives all groups the same number of layers). Raises ``ValueError`` otherwise."""
    out: dict[int, list[int]] = {}
    for gid, group in enumerate(groups):
        spec = group.kv_cache_spec
        stages = {stage_of_layer[n] for n in group.layer_names if n in stage_of_layer}
        if not stages:
            continue
        if not isinstance(spec, RoutedStageSpec) or stages != {spec.stage}:
            raise ValueError(
                f"KV cache group {gid} ({type(spec).__name__}) mixes routing stages "
                f"{sorted(stages)}: per-stage KV groups were not formed"
            )
        out.setdefault(spec.stage, []).append(gid)
    return out

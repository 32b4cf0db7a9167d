"""KV-cache groups, block tables and per-layer attention metadata as the worker sees
them (the runner's `attn_groups`, `kv_cache_config`, `input_batch.block_table`, and the
forward context's per-layer metadata)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class GroupInfo:
    """A KV-cache group as a routed layer sees it."""

    gid: int
    block_size: int
    attn_group: Any  # vLLM AttentionGroup (its metadata builder)


def kv_groups_of_layers(runner: Any, layer_names: Iterable[str]) -> dict[str, GroupInfo]:
    """KV-cache group of each named attention layer (missing: not in any group)."""
    wanted = set(layer_names)
    out: dict[str, GroupInfo] = {}
    for gid, attn_groups in enumerate(runner.attn_groups):
        spec = runner.kv_cache_config.kv_cache_groups[gid].kv_cache_spec
        for group in attn_groups:
            for name in wanted & set(group.layer_names):
                out[name] = GroupInfo(gid, spec.block_size, group)
    return out


def kv_cache_groups(runner: Any) -> list[Any]:
    return list(runner.kv_cache_config.kv_cache_groups)


def block_table(runner: Any, gid: int, num_reqs: int) -> tuple[torch.Tensor, list[int]]:
    """The group's CPU block table rows ``[:num_reqs]`` and each row's width."""
    bt = runner.input_batch.block_table[gid]
    widths = [int(w) for w in bt.num_blocks_per_row[:num_reqs]]
    return bt.get_cpu_tensor()[:num_reqs], widths


def live_block_table(
    runner: Any, gid: int, req_ids: tuple[str, ...], dead_rows: Any
) -> torch.Tensor:
    """The group's block table with released row entries removed (``dead_rows``:
    kv/table_view.ReleasedRows): row ``r``'s live entries, in order."""
    table, widths = block_table(runner, gid, len(req_ids))
    return dead_rows.compact_table(table, widths, req_ids, gid)


def table_device(runner: Any, gid: int, num_reqs: int) -> torch.device:
    return runner.input_batch.block_table[gid].get_device_tensor(num_reqs).device


def common_attention_metadata(
    *,
    qsl: torch.Tensor,
    seq_lens: torch.Tensor,
    num_computed: torch.Tensor,
    block_table_tensor: torch.Tensor,
    slot_mapping: torch.Tensor,
    device: torch.device,
) -> Any:
    """A `CommonAttentionMetadata` for a compacted view of the step (causal)."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    n = int(qsl.numel()) - 1
    counts = qsl.diff()
    return CommonAttentionMetadata(
        query_start_loc=qsl.to(device),
        query_start_loc_cpu=qsl,
        seq_lens=seq_lens.to(device),
        seq_lens_cpu_upper_bound=seq_lens,
        num_reqs=n,
        num_actual_tokens=int(qsl[-1]),
        max_query_len=int(counts.max()) if n else 0,
        max_seq_len=int(seq_lens.max()) if n else 0,
        block_table_tensor=block_table_tensor.to(device),
        slot_mapping=slot_mapping.to(device),
        causal=True,
        is_prefilling=num_computed == 0,
    )


def install_layer_attention(layer_name: str, metadata: Any, slot_mapping: torch.Tensor) -> None:
    """Make one attention layer use ``metadata`` / ``slot_mapping`` for this forward
    (vLLM's attention reads both from the forward context, keyed by layer name)."""
    from vllm.forward_context import get_forward_context

    ctx = get_forward_context()
    if not isinstance(ctx.attn_metadata, dict):
        raise RuntimeError("vllm-recroute: micro-batched attention metadata is not supported")
    ctx.attn_metadata[layer_name] = metadata
    ctx.slot_mapping[layer_name] = slot_mapping

"""KV-cache groups, block tables and per-layer attention metadata as the worker sees
them (the runner's `attn_groups`, `kv_cache_config`, `input_batch.block_table`, and the
forward context's per-layer metadata)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch


@dataclass(frozen=True)
class GroupInfo:
    """A KV-cache group as a routed layer sees it."""

    gid: int
    block_size: int
    attn_group: Any  # vLLM AttentionGroup (vLLM's own metadata builder: stage 0's)
    segments: SegmentBuffers | None = field(default=None, compare=False)

    def io(self, start: int) -> SegmentIO:
        """The persistent buffers and builder of the routed segment starting at ``start``."""
        if self.segments is None:
            raise RuntimeError("vllm-recroute: GroupInfo built without segment buffers")
        return self.segments.at(start)


def kv_groups_of_layers(runner: Any, layer_names: Iterable[str]) -> dict[str, GroupInfo]:
    """KV-cache group of each named attention layer (missing: not in any group)."""
    wanted = set(layer_names)
    out: dict[str, GroupInfo] = {}
    for gid, attn_groups in enumerate(runner.attn_groups):
        spec = runner.kv_cache_config.kv_cache_groups[gid].kv_cache_spec
        for group in attn_groups:
            names = wanted & set(group.layer_names)
            if not names:
                continue
            buffers = SegmentBuffers(group, runner.vllm_config, runner.device)
            for name in names:
                out[name] = GroupInfo(gid, spec.block_size, group, buffers)
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


@dataclass(frozen=True)
class CompactedIndices:
    """One KV group's compacted view of a routed segment: on the host (bookkeeping, the
    builders' CPU fields) or their device copies (what kernels read)."""

    qsl: torch.Tensor  # [n + 1] int32
    seq_lens: torch.Tensor  # [n] int32
    block_table: torch.Tensor  # [n, width] int32, width = the widest row the step needs
    slot_mapping: torch.Tensor  # [rows] int64
    rows: torch.Tensor | None = None  # [active rows] int64, the segment's active rows

    @property
    def num_int64(self) -> int:
        return self.slot_mapping.numel() + (0 if self.rows is None else self.rows.numel())

    @property
    def num_int32(self) -> int:
        return self.qsl.numel() + self.seq_lens.numel() + self.block_table.numel()


class SegmentIO:
    """Persistent buffers and metadata builder of one routed segment (its first layer) and
    KV group: the step's compacted indices cross to the device in one non-blocking copy
    from a staging buffer (pinned where CUDA is), and metadata is built by a builder of its
    own, never the one vLLM used for this step's stage-0 metadata.

    Why a builder of its own: some builders write persistent buffers in place and return
    views of them (FlashInfer's paged_kv_indptr / indices / last_page_len and its planned
    wrappers, `v1/attention/backends/flashinfer.py:FlashInferMetadataBuilder`), and so does
    `AttentionGroup.map_to_kernel_block_table` (`v1/worker/utils.py`, kernel_block_table)
    when kernel and manager block sizes differ: a second build through vLLM's builder
    would overwrite vLLM's own metadata of this step, and each segment's the one before.
    One builder per (segment, group), made as vLLM makes its own
    (`AttentionGroup.create_metadata_builders`), is rewritten only by its own next build,
    one step later, after the kernels that read it (same stream). FlashInfer's float
    workspace is only scratch during a run and is shared, as vLLM's V2 runner shares it
    between builders (`v1/worker/gpu/attn_utils.py`), instead of ~400 MiB per segment.

    Why two staging buffers: vLLM rewrites its own pinned inputs (CpuGpuBuffer) only inside
    `GPUModelRunner.synchronize_input_prep`, after waiting for `prepare_inputs_event`,
    recorded at the end of the previous step's input preparation. Our copies are enqueued
    later (before or during the forward), so that event does not cover them; and under
    async scheduling the engine core runs step N+1 (its forward included) before it waits
    for step N's output (`v1/engine/core.py:step_with_batch_queue`, a queue of 2), so step
    N's copy from a staging buffer may still be pending when step N+1 writes. Steps
    alternate between two buffers: the one step N used is rewritten at step N+2, which
    is scheduled only after step N's output came back (its sampled tokens' device-to-host
    copy follows step N's forward, and so our copies, on the stream). The event recorded
    after each copy makes that a checked guarantee rather than an assumption (normally
    it has completed and ``synchronize`` returns at once). A grown buffer replaces the old
    one; PyTorch's pinned allocator keeps a buffer with a pending copy alive until the copy
    is done. The device buffer needs no such care: its next write is a copy enqueued on
    the same stream after every kernel that read it."""

    def __init__(self, attn_group: Any, vllm_config: Any, device: torch.device) -> None:
        self._vllm_group = attn_group
        self._vllm_config = vllm_config
        self._device = device
        self._group: Any = None
        self._staging: list[torch.Tensor | None] = [None, None]
        self._events: list[Any] = [None, None]
        self._turn = 0
        self._dev: torch.Tensor | None = None

    def build(self, cm: Any) -> Any:
        """This segment's metadata, from its own builder."""
        if self._group is None:
            self._group = own_attention_group(self._vllm_group, self._vllm_config, self._device)
        return self._group.build_metadata(cm)

    def send(self, host: CompactedIndices, device: torch.device) -> CompactedIndices:
        """``host`` on ``device``: one packed copy (none on a CPU device)."""
        if device.type == "cpu":
            return host
        n64, n32 = host.num_int64, host.num_int32
        total = 2 * n64 + n32  # int64 entries first, as int32 pairs: aligned views
        staging = self._staging_buffer(total)
        _pack(staging, host, n64)
        dev = self._device_buffer(total, device)
        dev[:total].copy_(staging[:total], non_blocking=True)
        self._record_copy()
        return _unpack(dev, host, n64)

    def _staging_buffer(self, total: int) -> torch.Tensor:
        self._turn ^= 1
        event = self._events[self._turn]
        if event is not None:
            event.synchronize()  # the copy two steps ago from this buffer (normally done)
        buf = self._staging[self._turn]
        if buf is None or buf.numel() < total:
            size = max(total, 2 * (0 if buf is None else buf.numel()))
            buf = torch.empty(size, dtype=torch.int32, pin_memory=torch.cuda.is_available())
            self._staging[self._turn] = buf
        return buf

    def _device_buffer(self, total: int, device: torch.device) -> torch.Tensor:
        if self._dev is None or self._dev.numel() < total:
            size = max(total, 2 * (0 if self._dev is None else self._dev.numel()))
            self._dev = torch.empty(size, dtype=torch.int32, device=device)
        return self._dev

    def _record_copy(self) -> None:
        if self._device.type == "cuda" and torch.cuda.is_available():
            event = self._events[self._turn] or torch.cuda.Event()
            event.record()
            self._events[self._turn] = event


def _pack(buf: torch.Tensor, host: CompactedIndices, n64: int) -> None:
    wide = buf[: 2 * n64].view(torch.int64)
    t = host.slot_mapping.numel()
    wide[:t].copy_(host.slot_mapping)
    if host.rows is not None:
        wide[t:n64].copy_(host.rows)
    at = 2 * n64
    for part in (host.qsl, host.seq_lens, host.block_table):
        k = part.numel()
        buf[at : at + k].copy_(part.reshape(-1))
        at += k


def _unpack(dev: torch.Tensor, host: CompactedIndices, n64: int) -> CompactedIndices:
    wide = dev[: 2 * n64].view(torch.int64)
    t = host.slot_mapping.numel()
    out = []
    at = 2 * n64
    for part in (host.qsl, host.seq_lens, host.block_table):
        k = part.numel()
        out.append(dev[at : at + k].view(part.shape))
        at += k
    rows = None if host.rows is None else wide[t:n64]
    return CompactedIndices(out[0], out[1], out[2], wide[:t], rows)


class SegmentBuffers:
    """A KV group's `SegmentIO`s, by the first layer of the routed segment (persistent:
    the same segments recur every step)."""

    def __init__(self, attn_group: Any, vllm_config: Any, device: Any) -> None:
        self._args = (attn_group, vllm_config, device)
        self._by_start: dict[int, SegmentIO] = {}

    def at(self, start: int) -> SegmentIO:
        io = self._by_start.get(start)
        if io is None:
            io = self._by_start[start] = SegmentIO(*self._args)
        return io


def own_attention_group(attn_group: Any, vllm_config: Any, device: Any) -> Any:
    """A copy of vLLM's ``AttentionGroup`` with builders (and kernel block table) of its
    own, made by vLLM's own `AttentionGroup.create_metadata_builders`
    (`v1/worker/utils.py`; the runner's call: `GPUModelRunner.initialize_metadata_builders`)
    with the kernel block size vLLM settled on for the group."""
    group = replace(
        attn_group, metadata_builders=[], kernel_block_table=None, kernel_block_offsets=None
    )
    group.create_metadata_builders(vllm_config, device, attn_group.kernel_block_size, 1)
    theirs, ours = attn_group.get_metadata_builder(0), group.get_metadata_builder(0)
    if hasattr(theirs, "_get_workspace_buffer") and hasattr(ours, "set_workspace_buffer"):
        ours.set_workspace_buffer(theirs._get_workspace_buffer())
    return group


def common_attention_metadata(
    host: CompactedIndices, dev: CompactedIndices, is_prefilling: torch.Tensor
) -> Any:
    """A `CommonAttentionMetadata` for a compacted view of the step (causal): device
    tensors from ``dev``, the CPU fields (``*_cpu*``, ``is_prefilling``, as vLLM's runner
    keeps them, `gpu_model_runner.py:_build_attention_metadata`) from ``host``."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    n = int(host.qsl.numel()) - 1
    counts = host.qsl.diff()
    return CommonAttentionMetadata(
        query_start_loc=dev.qsl,
        query_start_loc_cpu=host.qsl,
        seq_lens=dev.seq_lens,
        seq_lens_cpu_upper_bound=host.seq_lens,
        num_reqs=n,
        num_actual_tokens=int(host.qsl[-1]),
        max_query_len=int(counts.max()) if n else 0,
        max_seq_len=int(host.seq_lens.max()) if n else 0,
        block_table_tensor=dev.block_table,
        slot_mapping=dev.slot_mapping,
        causal=True,
        is_prefilling=is_prefilling,
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
